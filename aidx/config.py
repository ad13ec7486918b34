"""Configuration: a typed schema, loaded from defaults, a YAML file and environment variables.

Precedence, lowest first: the schema's defaults (documented key by key in
``configs/default.yaml``), the file given with ``--config`` (or ``AIDX_CONFIG``), then
environment variables ``AIDX_<SECTION>__<KEY>`` (double underscore between levels, values parsed
as YAML scalars), then command-line flags. Unknown keys and bad values fail at start with the
key's path, where it came from, the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from aidx.config_base import StrictModel, https_refusal
from aidx.config_dicomweb import DicomwebConfig
from aidx.config_fhir import FhirConfig
from aidx.config_models import ModelsConfig
from aidx.config_node import (
    _DESTINATION_FORMS,
    AE_TITLE_PATTERN,
    Destination,
    DestinationConfig,
    NodeConfig,
    OutboxConfig,
    PeerConfig,
    TlsConfig,
)

# The node's sections live in aidx.config_node; callers import them from here with the rest.
__all__ = [
    "AE_TITLE_PATTERN",
    "AidxConfig",
    "ConfigError",
    "Destination",
    "DestinationConfig",
    "NodeConfig",
    "OutboxConfig",
    "PeerConfig",
    "TlsConfig",
    "default_data_dir",
    "load_config",
]

ENV_PREFIX = "AIDX_"
ENV_CONFIG_FILE = "AIDX_CONFIG"
DEFAULT_DATA_DIR = Path("aidx-data")  # relative to the folder a command runs in
# Where `aidx serve` records its data folder, so that a command run from another folder finds
# the running store (XDG state home; AIDX_STATE_DIR overrides it, e.g. for tests).
ENV_STATE_DIR = "AIDX_STATE_DIR"


class LogConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class DemoConfig(StrictModel):
    output: Path | None = None
    seed: int = Field(default=20261128, ge=0)
    slices: int = Field(default=300, ge=8, le=2000)
    matrix: int = Field(default=512, ge=64, le=1024)
    nodules: int = Field(default=3, ge=0, le=50)
    patient_name: str = "DEMO^CHEST PHANTOM"


class StoreConfig(StrictModel):
    url: str | None = None


class RetentionConfig(StrictModel):
    # Which received images `aidx serve` deletes (aidx.store.retention; configs/default.yaml).
    images_days: float | None = Field(default=None, gt=0)
    max_disk_percent: float | None = Field(default=None, gt=0, le=100)
    interval_s: float = Field(default=3600.0, gt=0)

    def enabled(self) -> bool:
        return self.images_days is not None or self.max_disk_percent is not None


class StorageConfig(StrictModel):
    # Where received images (spool/), results (results/) and signed reports (signed/) live: a
    # shared mount (NFS, SMB, CephFS) when several hosts share a store; null: data_dir. Each
    # host's own state (SQLite index, run/, logs, keys) stays in data_dir. The store records
    # paths relative to the root, so each host may mount it at its own path.
    root: Path | None = None
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


class SeriesRulesConfig(StrictModel):
    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    min_slices: int = Field(default=20, ge=2)
    max_slice_thickness_mm: float = Field(default=5.0, gt=0)
    max_axial_tilt_deg: float = Field(default=10.0, ge=0, le=90)
    exclude_image_types: list[str] = Field(
        default_factory=lambda: ["LOCALIZER", "DERIVED", "SECONDARY", "PROJECTION"]
    )


Provider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
DEFAULT_PROVIDERS: list[Provider] = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
]


class InferenceConfig(StrictModel):
    providers: list[Provider] = Field(default_factory=lambda: list(DEFAULT_PROVIDERS))
    intra_op_threads: int | None = Field(default=None, ge=1)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    mode: Literal["sliding", "whole"] = "sliding"
    fp16: bool = False
    io_binding: bool = False
    min_volume_mm3: float = Field(default=5.0, ge=0)
    merge_distance_mm: float = Field(default=5.0, ge=0)
    series: SeriesRulesConfig = Field(default_factory=SeriesRulesConfig)


OutputKind = Literal["sr", "seg", "key_images", "kos", "sr_cornerstone"]


class RouteConfig(StrictModel):
    """Which series a model reads and where its results go."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    # Model reference: NAME (its active version) or NAME@VERSION; empty means models.default.
    model: str = ""
    # Extra conditions on top of inference.series (empty lists match anything).
    calling_ae_titles: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    series_description: str = ""  # a regular expression searched in SeriesDescription
    # Destination name -> what to send there; empty means sr and seg to every destination.
    outputs: dict[str, list[OutputKind]] = Field(default_factory=dict)
    # pipeline.queue celery: the broker queue of a study this route applies to (a GPU model's
    # route: a queue that only GPU hosts' `aidx worker --queue` consume); "": pipeline.celery.queue.
    queue: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _pattern_compiles(self) -> RouteConfig:
        try:
            re.compile(self.series_description)
        except re.error as exc:
            raise ValueError(f"series_description is not a regular expression: {exc}") from None
        return self


class PriorityRuleConfig(StrictModel):
    """A study matching every condition given gets this priority (the highest match wins)."""

    priority: int = Field(ge=1, le=100)
    calling_ae_titles: list[str] = Field(default_factory=list)
    # DICOM keyword -> regular expression its value must match,
    # e.g. {RequestedProcedurePriority: STAT}.
    attributes: dict[str, str] = Field(default_factory=dict)
    study_description: str = ""  # a regular expression searched in StudyDescription

    @model_validator(mode="after")
    def _some_condition(self) -> PriorityRuleConfig:
        if not (self.calling_ae_titles or self.attributes or self.study_description):
            raise ValueError("give calling_ae_titles, attributes or study_description")
        for pattern in [self.study_description, *self.attributes.values()]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return self


class CeleryConfig(StrictModel):
    """Dispatch of jobs through Celery and a broker (``pipeline.queue: celery``; the ``[scale]``
    extra): several hosts' `aidx worker` processes share the work, the store stays the ledger."""

    # The broker (RabbitMQ): amqp://user:password@host:5672/vhost (the password is masked).
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    # The queue jobs are published to, and that `aidx worker` consumes by default.
    queue: str = Field(default="aidx", min_length=1, max_length=200)
    # RabbitMQ priority levels: a job's priority (0-100, pipeline.priority_rules) maps onto 0..N.
    max_priority: int = Field(default=9, ge=1, le=255)
    # Seconds between the node's looks for queued jobs not yet published (a broker that was
    # down, a node restarted): each is published again; a task delivered twice runs once.
    republish_interval_s: float = Field(default=30.0, gt=0)


class PipelineConfig(StrictModel):
    # Inference workers that `aidx serve` runs in its own process (0: run `aidx worker` apart).
    workers: int = Field(default=1, ge=0, le=64)
    # How jobs reach the workers: "store" (workers claim them from the store; one host, or
    # several on PostgreSQL) or "celery" (a task per job on a broker; pipeline.celery).
    queue: Literal["store", "celery"] = "store"
    celery: CeleryConfig = Field(default_factory=CeleryConfig)
    # A running job's worker renews its lease; a job whose lease ran out is taken again.
    lease_s: float = Field(default=120.0, ge=5)
    # Attempts at a job before it is marked failed.
    max_attempts: int = Field(default=3, ge=1)
    # How often separate worker processes look for queued jobs (in-process ones are woken).
    poll_interval_s: float = Field(default=2.0, gt=0)
    # Niceness of the worker processes (0-19): inference takes the CPU the node does not need.
    worker_nice: int = Field(default=10, ge=0, le=19)
    routes: list[RouteConfig] = Field(default_factory=list)
    priority_rules: list[PriorityRuleConfig] = Field(default_factory=list)


class MetricsConfig(StrictModel):
    # HTTP endpoint for /metrics (Prometheus) and /healthz; port 0 turns it off.
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


class UiConfig(StrictModel):
    """The review app (``aidx ui``, and ``aidx serve`` unless ``enabled`` is false)."""

    enabled: bool = True
    # Niceness of the review app's process under `aidx serve` (0-19).
    nice: int = Field(default=5, ge=0, le=19)
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=0, le=65535)  # 0: any free port (tests)
    # HTTPS: required when host is not a loopback address (remote reading).
    certificate: Path | None = None
    private_key: Path | None = None
    session_idle_timeout_s: float = Field(default=30 * 60.0, gt=0)
    session_max_age_s: float = Field(default=12 * 3600.0, gt=0)
    lockout_threshold: int = Field(default=5, ge=1)  # consecutive failed logins that lock
    lockout_base_s: float = Field(default=30.0, gt=0)  # first lock; doubled per further failure
    lockout_max_s: float = Field(default=15 * 60.0, gt=0)
    # Where signed SRs go when the AI result went nowhere (e.g. a study run by `aidx infer`);
    # otherwise a signed SR follows the AI SR to each of its destinations.
    signoff_destinations: list[str] = Field(default_factory=list)
    organisation: str = ""  # the verifying organisation when a user has none
    # Origins (scheme://host[:port]) besides the app's own from which a browser may post to the
    # app: only for a reverse proxy that rewrites the Host header (ui/web_guard.py).
    trusted_origins: list[str] = Field(default_factory=list)
    # Failed (or still running) sign-ins one client address may make in the window; more: 429.
    login_rate_limit: int = Field(default=10, ge=1)
    login_rate_window_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _https_beyond_loopback(self) -> UiConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both ui.certificate and ui.private_key, or neither")
        return self

    @model_validator(mode="after")
    def _origins_are_origins(self) -> UiConfig:
        pattern = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")
        bad = [o for o in self.trusted_origins if not pattern.match(o)]
        if bad:
            raise ValueError(
                f"ui.trusted_origins: {', '.join(map(repr, bad))} not an origin: write "
                "scheme://host[:port], e.g. https://review.hospital.example, without a path"
            )
        return self

    @property
    def https(self) -> bool:
        return self.certificate is not None

    def refusal(self) -> str | None:
        """Why the app must not start as configured, or None."""
        return https_refusal(
            "ui", "review app serves patient images", self.host, self.certificate, self.private_key
        )


class AidxConfig(StrictModel):
    data_dir: Path = DEFAULT_DATA_DIR  # load_config resolves it (default_data_dir)
    log: LogConfig = Field(default_factory=LogConfig)
    node: NodeConfig = Field(default_factory=NodeConfig)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ui: UiConfig = Field(default_factory=UiConfig)
    dicomweb: DicomwebConfig = Field(default_factory=DicomwebConfig)
    fhir: FhirConfig = Field(default_factory=FhirConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    def demo_output(self) -> Path:
        return self.demo.output or self.data_dir / "demo"

    def storage_root(self) -> Path:
        """Received images, results and signed reports live under this (storage.root)."""
        root = Path(self.storage.root).expanduser() if self.storage.root else self.data_dir
        return root.resolve()

    def models_dir(self) -> Path:
        return self.models.dir or self.data_dir / "models"

    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{(self.data_dir / 'aidx.db').resolve()}"


class ConfigError(ValueError):
    """The configuration cannot be used; ``str()`` lists every problem with its fix."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        head = f"configuration error ({source})" if source else "configuration error"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AidxConfig:
    """The effective configuration.

    ``overrides`` maps dotted key paths (``"log.level"``) to values, for command-line flags.
    """
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG_FILE):
        path = Path(env[ENV_CONFIG_FILE])
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    if path is not None:
        file_data = _read_yaml(path)
        _merge(data, file_data, sources, str(path), ())
    _merge(data, _env_overrides(env), sources, "environment", ())
    for dotted, value in (overrides or {}).items():
        keys = tuple(dotted.split("."))
        _merge(data, _nest(keys, value), sources, "command line", ())
    if "data_dir" not in data:
        data["data_dir"] = str(default_data_dir(env))
    try:
        return AidxConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, AidxConfig, sources)) from None


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """This user's aidx state folder: AIDX_STATE_DIR, else $XDG_STATE_HOME/aidx, else
    ~/.local/state/aidx."""
    env = os.environ if env is None else env
    if env.get(ENV_STATE_DIR):
        return Path(env[ENV_STATE_DIR])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aidx"


def record_data_dir(data_dir: Path, env: Mapping[str, str] | None = None) -> None:
    """Remember the data folder of the `aidx serve` starting now (absolute), for commands run
    without one from another folder (:func:`default_data_dir`). Best effort: a state folder
    that cannot be written only loses the convenience."""
    record = state_dir(env) / "data-dir"
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{Path(data_dir).resolve()}\n", encoding="utf-8")
    except OSError:
        return


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The data folder when none is configured: ``./aidx-data`` if it exists here, else the one
    the last `aidx serve` recorded (if it still exists), else ``./aidx-data``; absolute, so that
    it means the same folder for every part of the command."""
    here = DEFAULT_DATA_DIR.resolve()
    if here.is_dir():
        return here
    try:
        recorded = Path((state_dir(env) / "data-dir").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return here
    return recorded if recorded.is_absolute() and recorded.is_dir() else here


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}; check the path given to --config"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"]) from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}"]
        ) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path} must hold a mapping of keys at the top level"])
    return loaded


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        keys = tuple(k.lower() for k in name[len(ENV_PREFIX) :].split("__"))
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw  # structured values belong in the file; keep the text as given
        merged = _nest(keys, value)
        _merge(out, merged, {}, name, ())
    return out


def _nest(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return dict(out)


def _merge(
    base: dict[str, Any],
    new: Mapping[str, Any],
    sources: dict[tuple[str, ...], str],
    source: str,
    prefix: tuple[str, ...],
) -> None:
    for key, value in new.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            if not isinstance(base.get(key), dict):
                base[key] = {}
            _merge(base[key], value, sources, source, path)
            if not value:
                sources[path] = _source_name(source, path)
        else:
            base[key] = value
            sources[path] = _source_name(source, path)


def _source_name(source: str, path: tuple[str, ...]) -> str:
    return _env_name(path) if source == "environment" else source


def _env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(p.upper() for p in path)


def _describe(
    exc: ValidationError, model: type[BaseModel], sources: dict[tuple[str, ...], str]
) -> list[str]:
    problems = []
    for err in exc.errors():
        # A destination's form (its union tag) is not a key: left out, it picks the keys allowed.
        tags = [str(p) for p in err["loc"] if p in _DESTINATION_FORMS]
        loc = tuple(str(p) for p in err["loc"] if p not in _DESTINATION_FORMS)
        dotted = ".".join(loc)
        origin = _origin(loc, sources)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            if tags and len(loc) == 3:
                allowed = sorted(_DESTINATION_FORMS[tags[0]].model_fields)
                allowed[-1] += (
                    " (a destination is a DICOM AE, with ae_title, host and port, or a DICOMweb "
                    "root, with dicomweb: URL; not both)"
                )
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
            nested = _split_key(model, loc)
            if nested is not None and origin.startswith(f" (from {ENV_PREFIX}"):
                # AIDX_LOG_LEVEL for AIDX_LOG__LEVEL: one underscore where two divide the levels
                did_you_mean = (
                    f"; did you mean {_env_name(nested)}? (two underscores between levels)"
                )
            elif nested is not None:
                did_you_mean = f"; did you mean '{'.'.join(nested)}'?"
            problems.append(
                f"{dotted}: unknown key{origin}; allowed here: {', '.join(allowed)}{did_you_mean}"
            )
            continue
        if err["type"] == "value_error":
            reason = re.sub(r"^Value error, ", "", err["msg"])
            problems.append(f"{dotted}: {reason}{origin}")
            continue
        allowed_text = re.sub(r"^Input should be ", "", err["msg"])
        problems.append(f"{dotted}: got {err['input']!r}{origin}; allowed: {allowed_text}")
    return problems


def _origin(loc: tuple[str, ...], sources: dict[tuple[str, ...], str]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in sources:
            return f" (from {sources[loc[:n]]})"
    # an unknown section: where its first key came from (AIDX_LOGS__LEVEL for "logs")
    for path, source in sources.items():
        if path[: len(loc)] == loc:
            return f" (from {source})"
    return ""


def _split_key(model: type[BaseModel], loc: tuple[str, ...]) -> tuple[str, ...] | None:
    """An unknown key that is a section and one of its keys joined by ``_`` (``log_level``):
    the path it meant (``log``, ``level``), else None."""
    key = loc[-1]
    for i, char in enumerate(key):
        if char != "_":
            continue
        head, tail = key[:i], key[i + 1 :]
        if head in _allowed_keys(model, loc[:-1]) and tail in _allowed_keys(
            model, (*loc[:-1], head)
        ):
            return (*loc[:-1], head, tail)
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    current: Any = model
    for key in loc:
        field = current.model_fields.get(key) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        current = field.annotation
    return sorted(current.model_fields) if hasattr(current, "model_fields") else []
