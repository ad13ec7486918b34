"""The whole pipeline as a hospital runs it: `aidx serve` in its own process (node, study
assembly, inference workers with the stand-in model, outbox), Orthanc as the PACS on both sides.

`Pipeline` writes one test's configuration, starts and kills `aidx serve`, reads the store that
the serving process writes (bounded polls only) and runs `aidx status --json`. The functions
below it read what reached Orthanc: a study's series by modality, and result files downloaded
through the REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread

from aidx.store.store import Store
from tests.dicom_node.aidx_process import AidxSetup
from tests.peers import LOOPBACK, Modality, Orthanc, PeerError, free_port, log_tail, poll_until

NODE_AET = "AIDX"
PACS = "PACS"  # the destination name in aidx's configuration
# How long one job may take at most on a loaded 2-core machine; polls fail after this.
JOB_DEADLINE_S = 90.0
# Sliding-window overlap that makes the stand-in model take seconds (cost grows as
# 1/(1 - overlap)³, about 400 times the default's): long enough to act while a job runs.
SLOW_OVERLAP = 0.9
# Loopback only: never route our requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pipeline_config(
    node_port: int,
    pacs_port: int,
    models_dir: Path,
    *,
    quiet_period_s: float = 1.0,
    overlap: float = 0.25,
    min_slices: int = 20,
    min_volume_mm3: float = 3000.0,
    workers: int = 1,
    priority_rules: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A configuration for `aidx serve` in a test: Orthanc as destination ``PACS``, the
    stand-in model, short quiet period and retry delays, no metrics port (tests run in
    parallel), one CPU thread for inference (the test machine has two cores). The stand-in
    flags soft tissue: ``min_volume_mm3`` keeps its large components only (about ten findings
    on the test phantoms instead of 18 to 170, each of which costs the SR and SEG time)."""
    return {
        "node": {
            "ae_title": NODE_AET,
            "port": node_port,
            "min_free_disk_mb": 0,
            "study_quiet_period_s": quiet_period_s,
        },
        "destinations": {PACS: {"ae_title": "ORTHANC", "host": LOOPBACK, "port": pacs_port}},
        "outbox": {
            "max_attempts": 100,
            "initial_backoff_s": 0.2,
            "max_backoff_s": 1.0,
            "poll_interval_s": 0.3,
        },
        "models": {"dir": str(models_dir), "default": "soft-tissue"},
        "inference": {
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": 1,
            "overlap": overlap,
            "min_volume_mm3": min_volume_mm3,
            "series": {"min_slices": min_slices},
        },
        "pipeline": {
            "workers": workers,
            "poll_interval_s": 0.5,
            "priority_rules": [dict(rule) for rule in priority_rules],
        },
        "metrics": {"port": 0},
    }


class Pipeline:
    """One test's `aidx serve`: configuration file, data folder, logs, and the store it writes."""

    def __init__(self, root: Path, models_dir: Path, **options: Any) -> None:
        node_port = free_port()
        self.pacs_port = free_port()  # Orthanc's DICOM port (see `pacs`)
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / "aidx.yaml"
        config = pipeline_config(node_port, self.pacs_port, models_dir, **options)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.root = root
        self.aidx = AidxSetup(config_path, root / "data", node_port)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._killed = False
        self._store: Store | None = None
        self._runs = 0

    @property
    def node_port(self) -> int:
        return self.aidx.node_port

    def modality(self) -> Modality:
        """This node as an Orthanc DicomModalities entry."""
        return (NODE_AET, LOOPBACK, self.aidx.node_port)

    def pacs(self, work_dir: Path) -> Orthanc:
        """The Orthanc (not started) that this node sends to, knowing the node as ``AIDX``;
        its storage lives in ``work_dir``, so a stopped one starts again with its studies."""
        return Orthanc(work_dir, modalities={NODE_AET: self.modality()}, dicom_port=self.pacs_port)

    # ------------------------------------------------------------------------------ process
    @contextmanager
    def serving(self) -> Iterator[subprocess.Popen[bytes]]:
        """`aidx serve`, ready when its port accepts connections, stopped with SIGTERM at the
        end of the block; unless `kill` ended it, it must exit cleanly (code 0)."""
        self._runs += 1
        log_path = self.root / f"serve-{self._runs}.log"
        self._killed = False
        with self.aidx.serve(log_path) as process:
            self._process, self._log_path = process, log_path
            try:
                yield process
            finally:
                self._process = None
        if not self._killed:
            assert process.returncode == 0, (
                f"aidx serve exited with code {process.returncode} on SIGTERM\n"
                + log_tail(log_path)
            )

    def kill(self) -> None:
        """SIGKILL `aidx serve` (a crash: no clean-up of any kind), and reap it."""
        assert self._process is not None, "aidx serve is not running"
        os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait(10)
        self._killed = True

    def wait(
        self,
        condition: Callable[[], bool],
        what: str,
        deadline_s: float = 30.0,
        seen: Callable[[], object] | None = None,
    ) -> None:
        """Poll ``condition`` for at most ``deadline_s``; fail early if `aidx serve` died. The
        failure carries the tail of its log, and ``seen()`` (what was found instead)."""
        try:
            poll_until(condition, deadline_s, what, process=self._process, log_path=self._log_path)
        except PeerError as exc:
            found = f"\nfound instead: {seen()}" if seen is not None else ""
            raise AssertionError(f"{exc}{found}") from exc

    # -------------------------------------------------------------------------------- store
    @property
    def store(self) -> Store:
        """The serving process's store, read from this process (SQLite in WAL mode)."""
        if self._store is None:
            self._store = Store.for_config(self.aidx.load())
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def jobs(self, study_uid: str) -> list[dict[str, Any]]:
        return self.store.study_jobs(study_uid)

    def events(self, study_uid: str) -> list[str]:
        return [str(e["event"]) for e in self.store.study_events(study_uid)]

    def job_state(self, study_uid: str, version: int = 1) -> str | None:
        for job in self.jobs(study_uid):
            if job["study_version"] == version:
                return str(job["state"])
        return None

    def wait_for_job(
        self, study_uid: str, states: Sequence[str], version: int = 1, deadline_s: float = 30.0
    ) -> dict[str, Any]:
        """Wait until the study's job of ``version`` is in one of ``states``; return its row."""
        self.wait(
            lambda: self.job_state(study_uid, version) in states,
            f"job of study {study_uid} v{version} to be {' or '.join(states)}",
            deadline_s,
            seen=lambda: (self.jobs(study_uid), self.events(study_uid)),
        )
        (job,) = [j for j in self.jobs(study_uid) if j["study_version"] == version]
        return job

    # ------------------------------------------------------------------------------- status
    def status(self, study_uid: str | None = None) -> dict[str, Any]:
        """``aidx status [UID] --json``, decoded."""
        args = ["status", *([study_uid] if study_uid else []), "--json"]
        done = self.aidx.run(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def status_text(self, study_uid: str | None = None) -> str:
        """``aidx status [UID]`` as a person reads it."""
        done = self.aidx.run("status", *([study_uid] if study_uid else []))
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


# ------------------------------------------------------------------------- Orthanc as the PACS
def study_uid(folder: Path) -> str:
    """The Study Instance UID of the DICOM files in ``folder``."""
    first = sorted(folder.glob("*.dcm"))[0]
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def push(orthanc: Orthanc, resources: Sequence[str]) -> None:
    """Orthanc C-STOREs studies or instances (Orthanc IDs) to aidx, as a PACS routes a study
    (POST /modalities/AIDX/store, synchronous); every instance must be accepted."""
    answer = orthanc.post(
        f"/modalities/{NODE_AET}/store", {"Resources": list(resources), "Synchronous": True}
    )
    assert isinstance(answer, dict), answer
    assert answer["FailedInstancesCount"] == 0, answer
    assert answer["InstancesCount"] > 0, answer


def upload_and_push(orthanc: Orthanc, folder: Path) -> str:
    """Store a study in Orthanc, then have Orthanc push it to aidx; returns its Study UID."""
    orthanc.upload_dir(folder)
    uid = study_uid(folder)
    study = orthanc.find_study(uid)
    assert study is not None, f"Orthanc did not index study {uid}"
    push(orthanc, [study])
    return uid


def study_series(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """The study's series in Orthanc by Modality (``CT``, ``SR``, ``SEG``); {} if absent."""
    study = orthanc.find_study(study_uid)
    if study is None:
        return {}
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.get(f"/studies/{study}/series"):
        modality = str(series["MainDicomTags"].get("Modality", ""))
        by_modality.setdefault(modality, []).append(series)
    return by_modality


def instance_counts(series: Mapping[str, list[dict[str, Any]]]) -> dict[str, int]:
    """How many instances each modality has, from `study_series`."""
    return {modality: sum(len(s["Instances"]) for s in found) for modality, found in series.items()}


def instance_ids(orthanc: Orthanc, study_uid: str, modality: str) -> list[str]:
    """Orthanc IDs of the study's instances of one modality."""
    series = study_series(orthanc, study_uid).get(modality, [])
    return sorted(str(i) for s in series for i in s["Instances"])


def download(orthanc: Orthanc, instance_id: str, path: Path) -> Path:
    """Save an instance's DICOM file as Orthanc stores it (GET /instances/{id}/file)."""
    with _OPENER.open(f"{orthanc.url}/instances/{instance_id}/file", timeout=60) as response:
        data: bytes = response.read()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def downloads(orthanc: Orthanc, study_uid: str, modality: str, folder: Path) -> list[Path]:
    """Every instance of one modality in the study, saved under ``folder``."""
    return [
        download(orthanc, instance, folder / f"{modality.lower()}-{instance}.dcm")
        for instance in instance_ids(orthanc, study_uid, modality)
    ]
