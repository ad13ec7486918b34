"""Inference workers: take a job from the store, run every route's model on the study, record
the results and queue their deliveries.

A worker holds a lease on its running job and renews it from a heartbeat thread; if the process
dies, the job is taken again (see :mod:`aidx.store.jobs`). Results are written to
``<data_dir>/results/<study>/v<version>/<route>/`` with UIDs derived from the study, series, model
version and study version, so a job run twice writes the same objects and the PACS keeps one
copy. ``aidx serve`` runs workers in its process (woken when a study completes); ``aidx worker``
runs them apart, against the same store.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from aidx.config import AidxConfig
from aidx.config_fhir import OUTBOX_DESTINATION
from aidx.deflate import read_header
from aidx.logs import exception_text, patient_values, patient_values_of, redact
from aidx.store.jobs import Delivery, Job, ResultRecord, worker_name
from aidx.store.shadow import ShadowRun
from aidx.store.store import Store
from models.registry import ModelError, Registry, site_registry

from .routing import Route, routes

if TYPE_CHECKING:
    # The inference stack (ONNX Runtime, SciPy, highdicom: about a second of imports) is loaded
    # by the first job, not by every process that holds a pool (the supervised node holds one
    # with no workers).
    from inference.detector import Detector
    from inference.fhir_report import FhirSettings
    from inference.pipeline import InferenceResult
    from inference.runner import OnnxRunner

log = logging.getLogger("aidx.worker")


class Worker:
    """One inference worker thread."""

    def __init__(
        self,
        config: AidxConfig,
        store: Store,
        n: int = 0,
        registry: Registry | None = None,
        on_results: Callable[[], None] | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.name = worker_name(n)
        self.registry = registry or site_registry(config.models_dir())
        self.on_results = on_results
        self.poll_interval_s = poll_interval_s
        self.runners: dict[Path, OnnxRunner | Detector] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: int | None = None

    # ------------------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"aidx-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop taking jobs. A job still running after ``timeout`` is left as it is: the thread
        is a daemon, and the job (its worker process gone) is taken again at the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self.current_job is not None:
                log.info(
                    "job %d still running at shutdown; it will be run again at the next start",
                    self.current_job,
                )

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def notify(self, *_args: Any) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("worker %s: unexpected error; continuing", self.name)
                worked = False
            if not worked:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()

    # -------------------------------------------------------------------------------- jobs
    def run_once(self) -> bool:
        """Take and run one job, or when none waits one shadow run; False when both queues
        were empty."""
        job = self.store.claim_job(self.name, self.config.pipeline.lease_s)
        if job is None:
            return self.run_shadow_once()
        self._run_claimed(job)
        return True

    def run_shadow_once(self) -> bool:
        """Take and run one shadow run (a challenger on a study whose job finished); False
        when none waits."""
        run = self.store.claim_shadow(self.name, self.config.pipeline.lease_s)
        if run is None:
            return False
        self.current_job = run.job_id
        heartbeat = threading.Event()
        renew = self.store.renew_shadow_lease
        beat = threading.Thread(
            target=self._heartbeat_of,
            args=(run.id, run.study_uid, renew, heartbeat),
            name="aidx-lease",
            daemon=True,
        )
        beat.start()
        try:
            files = [Path(r["path"]) for r in self.store.study_instances(run.study_uid)]
            with patient_values(_patient_values(files, self.config.node.max_dataset_bytes)):
                self._run_shadow(run, files)
        finally:
            heartbeat.set()
            beat.join()
            self.current_job = None
        return True

    def run_job_id(self, job_id: int, takeover: bool = False) -> bool:
        """Take and run job ``job_id`` (a task from the broker, aidx.pipeline.dispatch); False
        when it is not this worker's to run (done, superseded, or held by a live worker)."""
        job = self.store.claim_job_id(job_id, self.name, self.config.pipeline.lease_s, takeover)
        if job is None:
            return False
        self._run_claimed(job)
        return True

    def _run_claimed(self, job: Job) -> None:
        self.current_job = job.id
        heartbeat = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(job, heartbeat), name="aidx-lease", daemon=True
        )
        beat.start()
        try:
            self._run_job(job)
        finally:
            heartbeat.set()
            beat.join()
            self.current_job = None

    def _heartbeat(self, job: Job, done: threading.Event) -> None:
        self._heartbeat_of(job.id, job.study_uid, self.store.renew_lease, done)

    def _heartbeat_of(
        self,
        lease_id: int,
        study_uid: str,
        renew: Callable[[int, str, float], bool],
        done: threading.Event,
    ) -> None:
        lease_s = self.config.pipeline.lease_s
        while not done.wait(lease_s / 3):
            if not renew(lease_id, self.name, lease_s):
                log.warning("lease %d lost (study_uid=%s)", lease_id, study_uid)
                return

    def _run_job(self, job: Job) -> None:
        files = [Path(r["path"]) for r in self.store.study_instances(job.study_uid)]
        # Whatever the libraries log or raise while this study is worked on, its patient's
        # values never reach the log, the job's reason or the study's events.
        with patient_values(_patient_values(files, self.config.node.max_dataset_bytes)):
            self._run_study(job, files)

    def _run_study(self, job: Job, files: list[Path]) -> None:
        started = time.perf_counter()
        log.info(
            "job %d: running study_uid=%s version=%d attempt=%d priority=%d",
            job.id,
            job.study_uid,
            job.study_version,
            job.attempts,
            job.priority,
        )
        try:
            records, deliveries, reasons, shadows = self._routes(job, files)
        except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost
            reason = exception_text(exc)  # no patient values, no values a library quoted
            retry = not isinstance(exc, ModelError | ValueError)
            state = self.store.fail_job(
                job, self.name, reason, self.config.pipeline.max_attempts, retry
            )
            log.error("job %d: %s (study_uid=%s): %s", job.id, state, job.study_uid, reason)
            return
        if not records:
            reason = redact("; ".join(reasons) or "no route applies to the study")
            self.store.job_not_applicable(job, self.name, reason)
            log.info("job %d: not applicable (study_uid=%s): %s", job.id, job.study_uid, reason)
            return
        seconds = time.perf_counter() - started
        if not self.store.finish_job(job, self.name, records, deliveries, seconds, shadows):
            log.warning("job %d: taken by another worker meanwhile; results dropped", job.id)
            return
        log.info(
            "job %d: results ready in %.1f s (study_uid=%s, %d deliveries)",
            job.id,
            seconds,
            job.study_uid,
            len(deliveries),
        )
        if self.on_results is not None:
            self.on_results()

    def _routes(
        self, job: Job, files: list[Path]
    ) -> tuple[list[ResultRecord], list[Delivery], list[str], list[str]]:
        """Each route's results and deliveries, the reasons of routes that did not apply, and
        the challengers (name@version) to run in shadow on the study afterwards."""
        from inference.fhir_report import fhir_settings  # noqa: PLC0415 - see TYPE_CHECKING
        from inference.pipeline import NotApplicableError, infer_files  # noqa: PLC0415

        study = self.store.study(job.study_uid) or {}
        previous = self._previous_report(job)
        records: list[ResultRecord] = []
        deliveries: list[Delivery] = []
        reasons: list[str] = []
        shadows: set[str] = set()
        for route in routes(self.config):
            if not route.accepts_caller(str(study.get("calling_ae", ""))):
                reasons.append(f"route {route.name}: calling AE not routed")
                continue
            model = self.registry.resolve(route.model, self.config.models.default)
            out_dir = self._result_dir(job.study_uid, job.study_version, route.name)
            try:
                result = infer_files(
                    files,
                    out_dir,
                    self.config,
                    model,
                    rules=route.rules,
                    key_images=route.key_images,
                    kos=route.kos,
                    cornerstone_sr=route.cornerstone_sr,
                    revision=job.study_version,
                    previous_versions=previous,
                    runners=self.runners,
                )
            except NotApplicableError as exc:
                reasons.append(f"route {route.name}: {exc}")
                continue
            records.append(_record(result, model.ref))
            deliveries.extend(_deliveries(job, route, result, model.ref))
            fhir = fhir_settings(self.config, "preliminary")
            if fhir is not None:
                deliveries.append(_fhir_delivery(result, model.ref, fhir))
            shadow = self.registry.shadow(model.card.name)
            # (a route pinned to the challenger's version already runs it live)
            if (
                shadow is not None
                and shadow.route in (None, route.name)
                and shadow.ref != model.ref
            ):
                shadows.add(shadow.ref)
        return records, deliveries, reasons, sorted(shadows)

    def _result_dir(self, study_uid: str, version: int, route: str, shadow: bool = False) -> Path:
        folder = self.config.storage_root() / "results" / study_uid / f"v{version}"
        return folder / "shadow" / route if shadow else folder / route

    def _run_shadow(self, run: ShadowRun, files: list[Path]) -> None:
        """The challenger on every route of its model (the shadow's route only, if it names
        one) that applies to the study: the results are stored, nothing is sent."""
        started = time.perf_counter()
        name = run.model.partition("@")[0]
        shadow = self.registry.shadow(name)
        if shadow is None or shadow.ref != run.model:
            now = shadow.ref if shadow else "off"
            reason = f"shadow mode of {name} changed since the run was queued (now: {now})"
            self.store.shadow_not_applicable(run, self.name, reason)
            log.info("shadow run %d: %s (study_uid=%s)", run.id, reason, run.study_uid)
            return
        from inference.pipeline import NotApplicableError, infer_files  # noqa: PLC0415

        reasons: list[str] = []
        records: list[ResultRecord] = []
        try:
            challenger = self.registry.resolve(run.model, self.config.models.default)
            study = self.store.study(run.study_uid) or {}
            for route in routes(self.config):
                champion = route.model or self.config.models.default
                if champion.partition("@")[0] != name or champion == run.model:
                    continue
                if shadow.route not in (None, route.name):
                    continue
                if not route.accepts_caller(str(study.get("calling_ae", ""))):
                    continue
                try:
                    result = infer_files(
                        files,
                        self._result_dir(run.study_uid, run.study_version, route.name, True),
                        self.config,
                        challenger,
                        rules=route.rules,
                        revision=run.study_version,
                        runners=self.runners,
                    )
                except NotApplicableError as exc:
                    reasons.append(f"route {route.name}: {exc}")
                    continue
                records.append(_record(result, challenger.ref))
        except Exception as exc:  # noqa: BLE001 - recorded on the shadow run, never lost
            reason = exception_text(exc)
            retry = not isinstance(exc, ModelError | ValueError)
            state = self.store.fail_shadow(
                run, self.name, reason, self.config.pipeline.max_attempts, retry
            )
            log.error("shadow run %d: %s (study_uid=%s): %s", run.id, state, run.study_uid, reason)
            return
        if not records:
            reason = redact("; ".join(reasons) or f"no route of {name} applies to the study")
            self.store.shadow_not_applicable(run, self.name, reason)
            log.info("shadow run %d: not applicable (study_uid=%s)", run.id, run.study_uid)
            return
        seconds = time.perf_counter() - started
        if self.store.finish_shadow(run, self.name, records, seconds):
            log.info(
                "shadow run %d: %s results in %.1f s (study_uid=%s; stored, not sent)",
                run.id,
                run.model,
                seconds,
                run.study_uid,
            )

    def _previous_report(self, job: Job) -> list[Dataset]:
        """The SR of the study's last earlier version, which a new result supersedes."""
        row = self.store.previous_result(job.study_uid, job.study_version)
        if row is None:
            return []
        try:
            return [dcmread(row["sr_path"], stop_before_pixels=True)]
        except (OSError, ValueError) as exc:
            log.warning("job %d: previous report unreadable: %s", job.id, exc)
            return []


def _patient_values(files: list[Path], max_inflated: int) -> set[str]:
    """The patient's values in the study's first readable image (see ``patient_values_of``)."""
    for path in files[:3]:
        try:
            return patient_values_of(read_header(path, max_inflated))
        except (OSError, ValueError, InvalidDicomError, zlib.error):
            continue  # the job itself will say why the image cannot be read
    return set()


def _record(result: InferenceResult, model_ref: str) -> ResultRecord:
    findings = result.report.findings
    return ResultRecord(
        series_uid=result.report.series_instance_uid,
        model=model_ref,
        findings_path=str(result.findings_path),
        sr_path=str(result.sr_path),
        sr_sop_uid=str(dcmread(result.sr_path, stop_before_pixels=True).SOPInstanceUID),
        seg_path=str(result.seg_path) if result.seg_path else None,
        finding_count=len(findings),
        max_probability=max((f.probability for f in findings), default=None),
    )


def _deliveries(job: Job, route: Route, result: InferenceResult, model_ref: str) -> list[Delivery]:
    out = []
    for destination, kinds in sorted(route.outputs.items()):
        files = [str(result.sr_path)] if "sr" in kinds else []
        if "sr_cornerstone" in kinds and result.cornerstone_sr_path is not None:
            files.append(str(result.cornerstone_sr_path))
        if "seg" in kinds and result.seg_path is not None:
            files.append(str(result.seg_path))
        if "key_images" in kinds:
            files.extend(str(p) for p in result.key_images)
        if "kos" in kinds and result.kos_path is not None:
            files.append(str(result.kos_path))
        if files:
            key = f"result:{job.study_uid}:v{job.study_version}:{route.name}:{model_ref}"
            out.append(Delivery(destination, key, files, result.report.series_instance_uid))
    return out


def _fhir_delivery(result: InferenceResult, model_ref: str, settings: FhirSettings) -> Delivery:
    """The preliminary FHIR DiagnosticReport of ``result``, written (validated) beside its SR,
    as one outbox item for the FHIR endpoint."""
    from inference.fhir_report import (  # noqa: PLC0415 - see TYPE_CHECKING
        build_report,
        item_key,
        read_sr,
        write_report,
    )

    report = build_report(read_sr(result.sr_path), model_ref, settings, datetime.now(UTC))
    path = write_report(report, result.sr_path.parent)
    return Delivery(
        OUTBOX_DESTINATION, item_key(report), [str(path)], result.report.series_instance_uid
    )


class WorkerPool:
    """``count`` workers sharing one model registry (``aidx serve`` and ``aidx worker``)."""

    def __init__(
        self,
        config: AidxConfig,
        store: Store,
        count: int,
        on_results: Callable[[], None] | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        registry = site_registry(config.models_dir())
        self.workers = [
            Worker(config, store, n, registry, on_results, poll_interval_s) for n in range(count)
        ]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def notify(self, *_args: Any) -> None:
        for w in self.workers:
            w.notify()

    def alive(self) -> bool:
        return all(w.alive() for w in self.workers)

    def busy(self) -> bool:
        """Whether a worker still runs a job (after :meth:`stop`: one left for the next start)."""
        return any(w.current_job is not None for w in self.workers)
