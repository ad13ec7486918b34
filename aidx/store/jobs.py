"""The job queue in the store: what study assembly records and inference workers take.

The interface is narrow on purpose: :meth:`JobQueue.claim_job`, :meth:`JobQueue.renew_lease`,
:meth:`JobQueue.finish_job`, :meth:`JobQueue.fail_job` and :meth:`JobQueue.job_not_applicable`.
A distributed engine can take over the queue by implementing the same five calls; the node and
the inference engine never see the queue.

Claims are optimistic (``UPDATE ... WHERE state = <as read>``), so several worker processes on
SQLite or PostgreSQL never take the same job. A running job carries a lease that its worker
renews; a job whose lease ran out, or whose worker process on this host is gone, is taken again
(crash recovery). Every change appends an event to the study's timeline.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Engine, Table, func, select, update

from .schema import events, jobs, outbox, results, shadow_runs, studies

# Job states.
T = TypeVar("T")

QUEUED = "queued"
RUNNING = "running"
RESULTS_READY = "results_ready"
SENT = "sent"
FAILED = "failed"
NOT_APPLICABLE = "not_applicable"
SUPERSEDED = "superseded"
JOB_STATES = (QUEUED, RUNNING, RESULTS_READY, SENT, FAILED, NOT_APPLICABLE, SUPERSEDED)
FINAL_STATES = (RESULTS_READY, SENT, FAILED, NOT_APPLICABLE, SUPERSEDED)


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    study_version: int
    state: str
    priority: int
    attempts: int
    worker: str | None
    created_at: float


@dataclass(frozen=True)
class ResultRecord:
    """One route's output of a job (see ``results`` in :mod:`aidx.store.schema`)."""

    series_uid: str
    model: str
    findings_path: str
    sr_path: str
    sr_sop_uid: str
    seg_path: str | None
    finding_count: int
    max_probability: float | None


@dataclass(frozen=True)
class Delivery:
    """Files of a job for one destination (one outbox item, one association)."""

    destination: str
    item_key: str
    files: list[str]
    series_uid: str | None = None


def worker_name(n: int = 0) -> str:
    """``host:pid:n``: lets a restarted process find the jobs its dead predecessor held."""
    return f"{socket.gethostname()}:{os.getpid()}:{n}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_event(
    conn: Connection,
    study_uid: str,
    event: str,
    job_id: int | None = None,
    detail: str | None = None,
    at: float | None = None,
) -> None:
    conn.execute(
        events.insert().values(
            study_uid=study_uid,
            job_id=job_id,
            event=event,
            at=time.time() if at is None else at,
            detail=detail,
        )
    )


class JobQueue:
    """Job operations of the store (mixed into :class:`aidx.store.store.Store`)."""

    engine: Engine

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    # --------------------------------------------------------------------------- workers
    def claim_job(
        self,
        worker: str,
        lease_s: float,
        now: float | None = None,
        alive: Callable[[int], bool] = pid_alive,
    ) -> Job | None:
        """Take the most urgent job: queued ones by priority then age, and running ones whose
        lease ran out or whose worker (a process on this host) is gone. Older versions of a
        study that a newer version has overtaken are marked superseded instead of run."""
        at = time.time() if now is None else now
        return claim_first(
            self.engine,
            jobs,
            (jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id),
            worker,
            at,
            alive,
            lambda row: self._take(row, worker, lease_s, at),
        )

    def claim_job_id(
        self,
        job_id: int,
        worker: str,
        lease_s: float,
        takeover: bool = False,
        now: float | None = None,
        alive: Callable[[int], bool] = pid_alive,
    ) -> Job | None:
        """Take job ``job_id`` for a task that names it (``pipeline.queue: celery``): a queued
        job, or a running one whose lease ran out or whose worker on this host is gone, or
        any running one when ``takeover`` (the broker delivered the task again because the
        consumer that had it is gone). None when the job is done, superseded, held by a live
        worker, or unknown: a task delivered twice runs once."""
        now = time.time() if now is None else now
        host = worker.split(":", 1)[0]
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None or row.state not in (QUEUED, RUNNING):
            return None
        if row.state == RUNNING and not (takeover or _abandoned(row, host, now, alive)):
            return None
        return self._take(row, worker, lease_s, now)

    def queued_jobs(self) -> list[tuple[int, int, str]]:
        """(id, priority, study UID) of every queued job, oldest first (published to the
        broker)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.priority, jobs.c.study_uid)
                .where(jobs.c.state == QUEUED)
                .order_by(jobs.c.created_at, jobs.c.id)
            ).all()
        return [(int(r[0]), int(r[1] or 0), str(r[2])) for r in rows]

    def _take(self, row: Any, worker: str, lease_s: float, now: float) -> Job | None:
        with self._write() as conn:
            newer = conn.execute(
                select(func.count())
                .select_from(jobs)
                .where(
                    (jobs.c.study_uid == row.study_uid) & (jobs.c.study_version > row.study_version)
                )
            ).scalar_one()
            condition = held_as_read(jobs, row)
            if newer:
                done = conn.execute(
                    update(jobs)
                    .where(condition)
                    .values(
                        state=SUPERSEDED,
                        reason="a later version of the study completed before this one ran",
                        worker=None,
                        lease_until=None,
                        updated_at=now,
                        finished_at=now,
                    )
                ).rowcount
                if done:
                    add_event(conn, row.study_uid, SUPERSEDED, row.id, at=now)
                return None
            changed = conn.execute(
                update(jobs)
                .where(condition)
                .values(
                    state=RUNNING,
                    worker=worker,
                    lease_until=now + lease_s,
                    attempts=jobs.c.attempts + 1,
                    started_at=now,
                    updated_at=now,
                )
            ).rowcount
            if not changed:
                return None  # another worker was faster; the caller looks again
            if row.state == RUNNING:
                add_event(
                    conn, row.study_uid, "requeued", row.id, f"worker {row.worker} is gone", now
                )
            add_event(conn, row.study_uid, "inference_started", row.id, worker, now)
            return Job(
                id=int(row.id),
                study_uid=str(row.study_uid),
                study_version=int(row.study_version),
                state=RUNNING,
                priority=int(row.priority or 0),
                attempts=int(row.attempts or 0) + 1,
                worker=worker,
                created_at=float(row.created_at),
            )

    def renew_lease(self, job_id: int, worker: str, lease_s: float) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        now = time.time()
        with self._write() as conn:
            return bool(
                conn.execute(
                    update(jobs)
                    .where((jobs.c.id == job_id) & (jobs.c.worker == worker))
                    .where(jobs.c.state == RUNNING)
                    .values(lease_until=now + lease_s, updated_at=now)
                ).rowcount
            )

    def finish_job(
        self,
        job: Job,
        worker: str,
        records: Sequence[ResultRecord],
        deliveries: Sequence[Delivery],
        inference_s: float,
        shadow_models: Sequence[str] = (),
    ) -> bool:
        """Record the results and queue their deliveries, in one transaction. Run again after
        a crash, it replaces the result rows and finds its outbox items already queued.
        ``shadow_models``: challengers (name@version) to run on the study next, in shadow
        (queued in the same transaction, once each; see :mod:`aidx.store.shadow`).
        Returns False (and changes nothing) when the job is no longer this worker's."""
        now = time.time()
        with self._write() as conn:
            still_ours = conn.execute(
                select(jobs.c.id).where(
                    (jobs.c.id == job.id) & (jobs.c.worker == worker) & (jobs.c.state == RUNNING)
                )
            ).first()
            if still_ours is None:
                return False
            replace_results(conn, job.id, job.study_uid, job.study_version, records, now)
            add_event(
                conn,
                job.study_uid,
                "inference_done",
                job.id,
                f"{sum(r.finding_count for r in records)} findings in {inference_s:.1f} s",
                now,
            )
            for d in deliveries:
                exists = conn.execute(
                    select(outbox.c.id).where(
                        (outbox.c.destination == d.destination) & (outbox.c.item_key == d.item_key)
                    )
                ).first()
                if exists is None:
                    _insert_outbox(conn, d, job, now)
                    add_event(conn, job.study_uid, "send_queued", job.id, d.destination, now)
            # Sent once every destination acknowledged (see OutboxQueue.mark_sent); with no
            # destination, results ready is where the job ends.
            state = RESULTS_READY
            first = records[0] if records else None
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job.id)
                .values(
                    state=state,
                    reason=None,
                    worker=None,
                    lease_until=None,
                    model=", ".join(sorted({r.model for r in records})) or None,
                    series_uid=first.series_uid if first else None,
                    result_dir=str(Path(first.sr_path).parent) if first else None,
                    inference_s=inference_s,
                    finished_at=now,
                    updated_at=now,
                )
            )
            add_event(conn, job.study_uid, state, job.id, at=now)
            for model in shadow_models if records else ():
                queue_shadow(conn, job, model, now)
            return True

    def fail_job(
        self, job: Job, worker: str, reason: str, max_attempts: int, retry: bool = True
    ) -> str:
        """A job that raised: queued again while attempts remain (and ``retry``), else failed.
        Returns the new state."""
        now = time.time()
        state = QUEUED if retry and job.attempts < max_attempts else FAILED
        with self._write() as conn:
            changed = conn.execute(
                update(jobs)
                .where((jobs.c.id == job.id) & (jobs.c.worker == worker))
                .values(
                    state=state,
                    reason=reason,
                    worker=None,
                    lease_until=None,
                    updated_at=now,
                    finished_at=now if state == FAILED else None,
                )
            ).rowcount
            if changed:
                event = FAILED if state == FAILED else "retry"
                add_event(conn, job.study_uid, event, job.id, reason, now)
        return state

    def job_not_applicable(self, job: Job, worker: str, reason: str) -> None:
        now = time.time()
        with self._write() as conn:
            changed = conn.execute(
                update(jobs)
                .where((jobs.c.id == job.id) & (jobs.c.worker == worker))
                .values(
                    state=NOT_APPLICABLE,
                    reason=reason,
                    worker=None,
                    lease_until=None,
                    updated_at=now,
                    finished_at=now,
                )
            ).rowcount
            if changed:
                add_event(conn, job.study_uid, NOT_APPLICABLE, job.id, reason, now)

    # --------------------------------------------------------------------------- queries
    def job(self, job_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return dict(row._mapping) if row else None

    def job_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
            counts = {str(state): int(n) for state, n in rows}
        return {state: counts.get(state, 0) for state in JOB_STATES}

    def previous_result(self, study_uid: str, before_version: int) -> dict[str, Any] | None:
        """The latest result of an earlier version of the study (what a new result supersedes)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(results)
                .where(
                    (results.c.study_uid == study_uid)
                    & (results.c.study_version < before_version)
                    & results.c.shadow.is_(False)  # a challenger's report is never a predecessor
                )
                .order_by(results.c.study_version.desc(), results.c.id.desc())
                .limit(1)
            ).first()
        return dict(row._mapping) if row else None

    def study_results(self, study_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(results).where(results.c.study_uid == study_uid).order_by(results.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def study_events(self, study_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events).where(events.c.study_uid == study_uid).order_by(events.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def recent_studies(self, limit: int = 20) -> list[dict[str, Any]]:
        """Latest studies with their latest job's state (for ``aidx status``)."""
        latest = (
            select(jobs.c.study_uid, func.max(jobs.c.id).label("job_id"))
            .group_by(jobs.c.study_uid)
            .subquery()
        )
        query = (
            select(
                studies.c.study_uid,
                studies.c.state.label("study_state"),
                studies.c.instance_count,
                studies.c.first_arrival,
                studies.c.last_arrival,
                studies.c.calling_ae,
                jobs.c.id.label("job_id"),
                jobs.c.state.label("job_state"),
                jobs.c.priority,
                jobs.c.reason,
            )
            .select_from(
                studies.outerjoin(latest, latest.c.study_uid == studies.c.study_uid).outerjoin(
                    jobs, jobs.c.id == latest.c.job_id
                )
            )
            .order_by(studies.c.last_arrival.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def replace_results(
    conn: Connection,
    job_id: int,
    study_uid: str,
    study_version: int,
    records: Sequence[ResultRecord],
    now: float,
    shadow: bool = False,
) -> None:
    """Write the result rows of a job (or of its shadow run), replacing those of an earlier
    attempt: one row per (study, series, model version, study version)."""
    for rec in records:
        conn.execute(
            results.delete().where(
                (results.c.study_uid == study_uid)
                & (results.c.series_uid == rec.series_uid)
                & (results.c.model == rec.model)
                & (results.c.study_version == study_version)
            )
        )
        conn.execute(
            results.insert().values(
                job_id=job_id,
                study_uid=study_uid,
                study_version=study_version,
                created_at=now,
                shadow=shadow,
                **rec.__dict__,
            )
        )


def queue_shadow(conn: Connection, job: Job, model: str, now: float) -> bool:
    """Queue ``model``'s shadow run of ``job`` (inside the caller's transaction); False when it
    is queued already (the job finished before, then ran again)."""
    exists = conn.execute(
        select(shadow_runs.c.id).where(
            (shadow_runs.c.job_id == job.id) & (shadow_runs.c.model == model)
        )
    ).first()
    if exists is not None:
        return False
    conn.execute(
        shadow_runs.insert().values(
            job_id=job.id,
            study_uid=job.study_uid,
            study_version=job.study_version,
            model=model,
            state=QUEUED,  # aidx.store.shadow takes it from here
            attempts=0,
            created_at=now,
            updated_at=now,
        )
    )
    add_event(conn, job.study_uid, "shadow_queued", job.id, model, now)
    return True


def claim_first(
    engine: Engine,
    table: Table,
    order_by: Sequence[Any],
    worker: str,
    now: float,
    alive: Callable[[int], bool],
    take: Callable[[Any], T | None],
) -> T | None:
    """The lease loop of jobs and shadow runs: ``take`` the first row (in ``order_by``) that is
    queued, or running with its lease run out or its worker on this host gone; when another
    worker was faster (``take`` gives None), read the rows again. None when nothing is left."""
    host = worker.split(":", 1)[0]
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(table).where(table.c.state.in_((QUEUED, RUNNING))).order_by(*order_by)
            ).all()
        candidate = next(
            (r for r in rows if r.state == QUEUED or _abandoned(r, host, now, alive)), None
        )
        if candidate is None:
            return None
        taken = take(candidate)
        if taken is not None:
            return taken


def held_as_read(table: Table, row: Any) -> ColumnElement[bool]:
    """The condition of a conditional update: the row still in the state (and with the worker)
    it was read with, so that of two workers taking it, one changes it."""
    condition: ColumnElement[bool] = (table.c.id == row.id) & (table.c.state == row.state)
    if row.worker is not None:
        condition &= table.c.worker == row.worker
    return condition


def _abandoned(row: Any, host: str, now: float, alive: Callable[[int], bool]) -> bool:
    if row.lease_until is not None and row.lease_until < now:
        return True
    parts = str(row.worker or "").split(":")
    if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
        return not alive(int(parts[1]))
    return False


def _insert_outbox(conn: Connection, d: Delivery, job: Job, now: float) -> None:
    conn.execute(
        outbox.insert().values(
            destination=d.destination,
            item_key=d.item_key,
            study_uid=job.study_uid,
            series_uid=d.series_uid,
            job_id=job.id,
            files=json.dumps(d.files),
            state="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
    )
