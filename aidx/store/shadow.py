"""Shadow runs in the store: a challenger model read a live study after the champion's job.

``aidx models shadow NAME@VERSION`` names a challenger; when a champion's job of that model
finishes, :meth:`aidx.store.jobs.JobQueue.finish_job` queues one shadow run for it in the same
transaction (``shadow_runs``, unique per job and challenger, so a job finished twice queues
one). A worker takes a shadow run only when no live job waits (:meth:`ShadowQueue.claim_shadow`
after ``claim_job`` found nothing): the challenger never delays a radiologist's result. It
holds a lease like a job (a dead worker's run is taken again), and its results are ``results``
rows of the champion's job with ``shadow`` set: written beside the champion's, never queued to
the outbox, never on the worklist (``ui.review``), compared with the signed reads by
``aidx models report`` (``ui.evidence``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from .jobs import ResultRecord, add_event, claim_first, held_as_read, pid_alive, replace_results
from .schema import shadow_runs

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
NOT_APPLICABLE = "not_applicable"


@dataclass(frozen=True)
class ShadowRun:
    id: int
    job_id: int
    study_uid: str
    study_version: int
    model: str  # the challenger, name@version
    attempts: int
    worker: str | None


class ShadowQueue:
    """Shadow-run operations of the store (mixed into :class:`aidx.store.store.Store`)."""

    engine: Engine

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def claim_shadow(
        self,
        worker: str,
        lease_s: float,
        now: float | None = None,
        alive: Callable[[int], bool] = pid_alive,
    ) -> ShadowRun | None:
        """Take the oldest queued shadow run, or a running one whose worker is gone."""
        at = time.time() if now is None else now
        return claim_first(
            self.engine,
            shadow_runs,
            (shadow_runs.c.created_at, shadow_runs.c.id),
            worker,
            at,
            alive,
            lambda row: self._take_shadow(row, worker, lease_s, at),
        )

    def _take_shadow(self, row: Any, worker: str, lease_s: float, now: float) -> ShadowRun | None:
        with self._write() as conn:
            taken = conn.execute(
                update(shadow_runs)
                .where(held_as_read(shadow_runs, row))
                .values(
                    state=RUNNING,
                    worker=worker,
                    lease_until=now + lease_s,
                    attempts=shadow_runs.c.attempts + 1,
                    updated_at=now,
                )
            ).rowcount
            if not taken:
                return None  # another worker was faster; claim_first reads again
            add_event(conn, row.study_uid, "shadow_started", row.job_id, row.model, now)
        return ShadowRun(
            id=int(row.id),
            job_id=int(row.job_id),
            study_uid=str(row.study_uid),
            study_version=int(row.study_version),
            model=str(row.model),
            attempts=int(row.attempts or 0) + 1,
            worker=worker,
        )

    def renew_shadow_lease(self, run_id: int, worker: str, lease_s: float) -> bool:
        now = time.time()
        with self._write() as conn:
            return bool(
                conn.execute(
                    update(shadow_runs)
                    .where((shadow_runs.c.id == run_id) & (shadow_runs.c.worker == worker))
                    .where(shadow_runs.c.state == RUNNING)
                    .values(lease_until=now + lease_s, updated_at=now)
                ).rowcount
            )

    def finish_shadow(
        self, run: ShadowRun, worker: str, records: Sequence[ResultRecord], inference_s: float
    ) -> bool:
        """Record the challenger's results (``shadow`` rows of the champion's job, replacing
        those of an earlier attempt); nothing is queued to the outbox. False (nothing changed)
        when the run is no longer this worker's."""
        now = time.time()
        with self._write() as conn:
            if not self._ours(conn, run, worker):
                return False
            replace_results(
                conn, run.job_id, run.study_uid, run.study_version, records, now, shadow=True
            )
            self._close(conn, run, DONE, None, now, inference_s)
            add_event(
                conn,
                run.study_uid,
                "shadow_done",
                run.job_id,
                f"{run.model}: {sum(r.finding_count for r in records)} findings "
                f"in {inference_s:.1f} s",
                now,
            )
            return True

    def fail_shadow(
        self, run: ShadowRun, worker: str, reason: str, max_attempts: int, retry: bool = True
    ) -> str:
        """A shadow run that raised: queued again while attempts remain, else failed."""
        now = time.time()
        state = QUEUED if retry and run.attempts < max_attempts else FAILED
        with self._write() as conn:
            if self._ours(conn, run, worker):
                self._close(conn, run, state, reason, now, None)
                add_event(conn, run.study_uid, f"shadow_{state}", run.job_id, reason, now)
        return state

    def shadow_not_applicable(self, run: ShadowRun, worker: str, reason: str) -> None:
        now = time.time()
        with self._write() as conn:
            if self._ours(conn, run, worker):
                self._close(conn, run, NOT_APPLICABLE, reason, now, None)
                add_event(conn, run.study_uid, "shadow_not_applicable", run.job_id, reason, now)

    def shadow_run_rows(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        query = select(shadow_runs).order_by(shadow_runs.c.id)
        if study_uid is not None:
            query = query.where(shadow_runs.c.study_uid == study_uid)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    @staticmethod
    def _ours(conn: Connection, run: ShadowRun, worker: str) -> bool:
        return (
            conn.execute(
                select(shadow_runs.c.id).where(
                    (shadow_runs.c.id == run.id)
                    & (shadow_runs.c.worker == worker)
                    & (shadow_runs.c.state == RUNNING)
                )
            ).first()
            is not None
        )

    @staticmethod
    def _close(
        conn: Connection,
        run: ShadowRun,
        state: str,
        reason: str | None,
        now: float,
        inference_s: float | None,
    ) -> None:
        conn.execute(
            update(shadow_runs)
            .where(shadow_runs.c.id == run.id)
            .values(
                state=state,
                reason=reason,
                worker=None,
                lease_until=None,
                updated_at=now,
                finished_at=None if state == QUEUED else now,
                inference_s=inference_s,
            )
        )
