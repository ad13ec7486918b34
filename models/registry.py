"""The model registry (torch-free): versioned ONNX models, each with a model card.

A model version is a folder ``<root>/<name>/<version>/`` holding ``model.onnx`` and ``card.json``.
The card says what the network is, what it expects and returns, how it was trained and
evaluated, what it is for and not for, and the sha256 of its ONNX file, in the spirit of MONAI
bundle metadata. A card that does not match its file (hash, input or output) is refused.
``registry.json`` in the writable root records the active version of each model, the
promotion history (for rollback) and the challenger in shadow mode, if any (``aidx models
shadow``); it is replaced atomically. A card also keeps the promotion gate's evaluations of its
model against the champion of the day (``gate``; ``aidx models gate-evaluate``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ONNX_FILE = "model.onnx"
CARD_FILE = "card.json"
STATE_FILE = "registry.json"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class ModelError(ValueError):
    """A model or card that cannot be used; the message says which and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    # Static sizes as integers; dynamic axes as names (e.g. "depth").
    shape: list[int | str]
    dtype: Literal["float32", "float16"] = "float32"


class InputSpec(_Strict):
    tensor: TensorSpec
    spacing_mm: tuple[float, float, float]  # (z, y, x) in the LPS frame
    orientation: Literal["LPS"] = "LPS"
    hu_window: tuple[float, float]
    patch_size: tuple[int, int, int]  # sliding-window patch (z, y, x)


class Calibration(_Strict):
    """A finding's probability from its connected component (Platt scaling), fitted by
    ``aidx calibrate`` on cases that neither training nor the evaluation used:
    ``p = sigmoid(intercept + volume_coef * ln(1 + volume_mm3) + max_coef * logit(max))``, where
    the component is the region at or above ``segmentation_threshold`` and ``max`` its highest
    voxel probability. Without it, a finding's probability is that maximum, which a network
    trained with Dice loss saturates at 1.0 for true and false findings alike."""

    segmentation_threshold: float = Field(default=0.5, gt=0, lt=1)
    intercept: float
    volume_coef: float
    max_coef: float
    fitted_on: str  # the calibration data, in words


class OutputSpec(_Strict):
    tensor: TensorSpec
    kind: Literal["probability"] = "probability"  # per-voxel lesion probability, 0..1
    # Findings at or above this probability are reported (the calibrated one when calibrated).
    operating_threshold: float = Field(gt=0, lt=1)
    calibration: Calibration | None = None


class TrainingSpec(_Strict):
    data: str
    synthetic: bool
    command: str


class CandidateSettings(_Strict):
    """The candidate stage of a two-stage detector (``inference.candidates``)."""

    sigmas_mm: list[float] = Field(min_length=1)
    min_response: float = Field(gt=0)
    max_candidates: int = Field(ge=1)
    shape_power: float = Field(ge=0)
    lung_closing_mm: float = Field(gt=0)
    lung_margin_mm: float = Field(ge=0)
    # the width (mm) of the cube whose grey opening is subtracted before the blob pyramid (a
    # white top-hat: the chest wall and mediastinum go, a nodule on them stays; None: the blobs
    # of the image itself, as up to 0.6.1)
    background_mm: float | None = Field(default=None, gt=0, le=50)
    # the first-stage network (model.onnx) as a second candidate source: its probability peaks
    network: bool = False
    network_min_probability: float = Field(default=0.01, gt=0, lt=1)
    network_max_candidates: int = Field(default=100, ge=1)
    # its sliding window's overlap (None: the configuration's inference.overlap); its peaks
    # are candidates, not findings, so seams between windows cost little
    network_overlap: float | None = Field(default=None, ge=0, lt=1)
    # the margin (mm) around the lungs' box of its input (None: the fine grid's, 20 mm; the
    # margin holds body wall and mediastinum, where its peaks are no nodule)
    network_margin_mm: float | None = Field(default=None, ge=0, le=20)


class ClassifierSpec(_Strict):
    """The second stage: a crop classifier, a second ONNX graph in the model's folder."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: TensorSpec  # (batch, 2, crop, crop, crop): the crop and its twice-as-wide context
    output: TensorSpec  # (batch, 2): probability of a nodule, its diameter in mm
    crop_size: int = Field(ge=8)
    # the N most probable candidates are scored again in the 7 other flips of their crops and
    # the 8 verdicts averaged (test-time augmentation where it decides the ranking)
    augment_top: int = Field(default=0, ge=0)


class DetectorSpec(_Strict):
    """A two-stage detector: candidates on a fine grid inside the lungs, then a classifier on a
    crop around each (``inference.detector``). Its output's operating threshold and the
    findings' probabilities are the classifier's."""

    kind: Literal["two-stage"] = "two-stage"
    spacing_mm: float = Field(gt=0)  # the fine isotropic grid of the candidates and crops
    candidates: CandidateSettings
    classifier: ClassifierSpec


class GateEvaluation(_Strict):
    """One frozen-dataset comparison of this model (the challenger) with the champion of the
    day, recorded by ``aidx models gate-evaluate``: the paired bootstrap of the CPM difference
    (challenger - champion) of ``aidx compare``, and whether its lower bound clears the
    non-inferiority margin."""

    champion: str  # name@version
    dataset: str
    at: str  # ISO 8601 time of the evaluation
    cpm_champion: float
    cpm_challenger: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    bootstrap_samples: int
    margin: float  # passed: ci_low >= -margin
    passed: bool


class ModelCard(_Strict):
    """The card of one model version (card.json)."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")
    date: date
    network: str
    description: str
    input: InputSpec
    output: OutputSpec
    training: TrainingSpec
    evaluation: dict[str, float] = Field(default_factory=dict)
    detector: DetectorSpec | None = None  # a two-stage detector (None: findings from model.onnx)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    intended_use: str
    limitations: list[str]
    gate: list[GateEvaluation] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: cannot read the model card: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ModelError(f"{path}: invalid model card: {problems}") from None


@dataclass(frozen=True)
class Shadow:
    """The challenger of a model in shadow mode: run on live studies, never shown or sent."""

    name: str
    version: str
    route: str | None  # None: every route whose model is ``name``
    since: str  # ISO 8601

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ModelEntry:
    card: ModelCard
    folder: Path

    @property
    def onnx_path(self) -> Path:
        return self.folder / ONNX_FILE

    @property
    def ref(self) -> str:
        return f"{self.card.name}@{self.card.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(card: ModelCard, onnx_path: Path) -> None:
    """Check that the ONNX file is the one the card describes; raise ModelError if not."""
    actual = sha256_of(onnx_path)
    if actual != card.sha256:
        raise ModelError(
            f"{onnx_path}: sha256 {actual} differs from the card's {card.sha256}; "
            "the file was changed or the card belongs to another file"
        )
    import onnxruntime as ort  # noqa: PLC0415 - deferred: listing models needs no runtime

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{onnx_path}: ONNX Runtime cannot load it: {exc}") from exc
    for declared, actual_io, what in (
        (card.input.tensor, session.get_inputs(), "input"),
        (card.output.tensor, session.get_outputs(), "output"),
    ):
        if len(actual_io) != 1:
            raise ModelError(f"{onnx_path}: expected one {what}, the model has {len(actual_io)}")
        _compare(declared, actual_io[0], what, onnx_path)
    if card.detector is not None:
        _verify_classifier(card.detector.classifier, onnx_path.parent)


def _verify_classifier(spec: ClassifierSpec, folder: Path) -> None:
    """A two-stage detector's second graph: present, the card's file, with the card's IO."""
    import onnxruntime as ort  # noqa: PLC0415 - deferred: listing models needs no runtime

    path = folder / spec.file
    if not path.is_file():
        raise ModelError(f"{path}: the classifier the card names is missing from the model folder")
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ModelError(
            f"{path}: sha256 {actual} differs from the card's detector.classifier.sha256 "
            f"{spec.sha256}; the file was changed or the card belongs to another file"
        )
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    for declared, actual_io, what in (
        (spec.input, session.get_inputs(), "classifier input"),
        (spec.output, session.get_outputs(), "classifier output"),
    ):
        if len(actual_io) != 1:
            raise ModelError(f"{path}: expected one {what}, the model has {len(actual_io)}")
        _compare(declared, actual_io[0], what, path)


def _compare(declared: TensorSpec, actual: Any, what: str, path: Path) -> None:
    dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(actual.type, actual.type)
    shape = list(actual.shape)
    problems = []
    if actual.name != declared.name:
        problems.append(f"name {actual.name!r}, card says {declared.name!r}")
    if dtype != declared.dtype:
        problems.append(f"type {dtype}, card says {declared.dtype}")
    if len(shape) != len(declared.shape):
        problems.append(f"rank {len(shape)}, card says {len(declared.shape)}")
    else:
        for i, (a, d) in enumerate(zip(shape, declared.shape, strict=True)):
            if isinstance(d, int) != isinstance(a, int) or (isinstance(d, int) and a != d):
                problems.append(f"axis {i} is {a!r}, card says {d!r}")
    if problems:
        raise ModelError(f"{path}: the {what} does not match the card: {'; '.join(problems)}")


SHIPPED = Path(__file__).resolve().parent / "shipped"  # models shipped with aidx


def site_registry(models_dir: Path) -> Registry:
    """A site's registry: its own folder (``models.dir``) over the models shipped with aidx."""
    return Registry(models_dir, (SHIPPED,))


class Registry:
    """Model versions under ``root`` (writable) and ``shipped`` roots (read-only)."""

    def __init__(self, root: Path, shipped: tuple[Path, ...] = ()) -> None:
        self.root = root
        self.roots = (root, *shipped)

    # ------------------------------------------------------------------------------ reading
    def entries(self) -> list[ModelEntry]:
        found: dict[str, ModelEntry] = {}
        for root in self.roots:
            for card_path in sorted(root.glob(f"*/*/{CARD_FILE}")):
                card = ModelCard.load(card_path)
                found.setdefault(f"{card.name}@{card.version}", ModelEntry(card, card_path.parent))
        return sorted(found.values(), key=lambda e: (e.card.name, e.card.date, e.card.version))

    def get(self, name: str, version: str) -> ModelEntry:
        for entry in self.entries():
            if entry.card.name == name and entry.card.version == version:
                return entry
        known = ", ".join(e.ref for e in self.entries()) or "none"
        raise ModelError(f"no model {name}@{version} in the registry (registered: {known})")

    def active(self, name: str) -> ModelEntry | None:
        """The promoted version; without one, the newest version shipped with aidx."""
        version = self._state()["active"].get(name)
        if version:
            return self.get(name, version)
        shipped = [
            ModelEntry(ModelCard.load(card_path), card_path.parent)
            for root in self.roots[1:]
            for card_path in sorted(root.glob(f"{name}/*/{CARD_FILE}"))
        ]
        shipped = [e for e in shipped if e.card.name == name]
        return max(shipped, key=lambda e: (e.card.date, e.card.version)) if shipped else None

    def resolve(self, ref: str | None, default_name: str) -> ModelEntry:
        """``NAME@VERSION``, ``NAME`` (its active version) or None (the default model)."""
        name, _, version = (ref or default_name).partition("@")
        if version:
            entry = self.get(name, version)
        else:
            found = self.active(name)
            if found is None:
                raise ModelError(
                    f"no active version of model {name!r}: register one with "
                    "`aidx models register MODEL.onnx --card CARD.json` and promote it with "
                    f"`aidx models promote {name}@VERSION`"
                )
            entry = found
        verify(entry.card, entry.onnx_path)
        return entry

    # ------------------------------------------------------------------------------ writing
    def register(self, onnx_path: Path, card_path: Path) -> ModelEntry:
        card = ModelCard.load(card_path)
        verify(card, onnx_path)
        folder = self.root / card.name / card.version
        if folder.exists():
            existing = ModelCard.load(folder / CARD_FILE)
            if existing.sha256 == card.sha256:
                return ModelEntry(existing, folder)  # registering the same thing twice is a no-op
            raise ModelError(
                f"{card.name}@{card.version} is already registered with another file; "
                "give the new model a new version"
            )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self._ensure_root()))
        shutil.copyfile(onnx_path, staging / ONNX_FILE)
        if card.detector is not None:  # the second stage lies beside the first (verified)
            name = card.detector.classifier.file
            shutil.copyfile(onnx_path.parent / name, staging / name)
        (staging / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
        return ModelEntry(card, folder)

    def promote(self, name: str, version: str) -> ModelEntry:
        entry = self.get(name, version)
        verify(entry.card, entry.onnx_path)
        state = self._state()
        history = state["history"].setdefault(name, [])
        if not history and not state["active"].get(name):
            serving = self.active(name)  # the shipped default: where a rollback returns to
            if serving is not None and serving.card.version != version:
                history.append(serving.card.version)
        if state["active"].get(name) != version:
            history.append(version)
        state["active"][name] = version
        shadow = state.get("shadow", {}).get(name)
        if shadow is not None and shadow.get("version") == version:
            del state["shadow"][name]  # the challenger is the champion now
        self._save(state)
        return entry

    def shadow(self, name: str) -> Shadow | None:
        """The challenger of model ``name`` in shadow mode, if any."""
        found = self._state().get("shadow", {}).get(name)
        if not found:
            return None
        return Shadow(name, str(found["version"]), found.get("route"), str(found["since"]))

    def shadows(self) -> list[Shadow]:
        names = sorted(self._state().get("shadow", {}))
        return [s for s in (self.shadow(n) for n in names) if s is not None]

    def set_shadow(self, name: str, version: str, route: str | None, since: str) -> Shadow:
        """Run ``name@version`` in shadow of the active version of ``name``."""
        entry = self.get(name, version)
        verify(entry.card, entry.onnx_path)
        active = self.active(name)
        if active is not None and active.card.version == version:
            raise ModelError(
                f"{entry.ref} is the active version (the champion); shadow mode runs another "
                "version beside it"
            )
        state = self._state()
        state.setdefault("shadow", {})[name] = {"version": version, "route": route, "since": since}
        self._save(state)
        return Shadow(name, version, route, since)

    def clear_shadow(self, name: str) -> Shadow | None:
        """End shadow mode for ``name``; returns what it was (None: it was off)."""
        before = self.shadow(name)
        if before is not None:
            state = self._state()
            del state["shadow"][name]
            self._save(state)
        return before

    def record_gate(self, name: str, version: str, evaluation: GateEvaluation) -> ModelEntry:
        """Append a gate evaluation to the card of a registered (writable) model version."""
        entry = self.get(name, version)
        if entry.folder.resolve().parent.parent != self.root.resolve():
            raise ModelError(
                f"{entry.ref} ships with aidx ({entry.folder}) and its card cannot be changed; "
                "register a copy under a new version to evaluate it for promotion"
            )
        card = entry.card.model_copy(update={"gate": [*entry.card.gate, evaluation]})
        fd, temp = tempfile.mkstemp(prefix=".card-", dir=entry.folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(card.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        Path(temp).replace(entry.folder / CARD_FILE)
        return ModelEntry(card, entry.folder)

    def rollback(self, name: str) -> ModelEntry:
        state = self._state()
        history = state["history"].get(name, [])
        if len(history) < 2:
            raise ModelError(f"model {name!r} has no earlier promoted version to roll back to")
        history.pop()
        state["active"][name] = history[-1]
        self._save(state)
        return self.get(name, history[-1])

    def _ensure_root(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def _state(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        if not path.exists():
            return {"active": {}, "history": {}}
        try:
            state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable registry state: {exc}") from exc
        return state

    def _save(self, state: dict[str, Any]) -> None:
        root = self._ensure_root()
        fd, temp = tempfile.mkstemp(prefix=".registry-", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        Path(temp).replace(root / STATE_FILE)
