"""Retention (``storage.retention``): which received images may go, and deleting them.

A study's images may go once nothing needs them any more: the study is complete, it has a job
and every job of it is done with (sent, not applicable or superseded: never queued, running,
results not yet sent, or failed, which a person may still retry), no shadow run of a challenger
model on it is queued or running (``aidx models shadow``), every review of its results
is signed, and every outbox item of it is delivered. Its *ready* time is the latest of its last
arrival, its jobs' last change, its reviews' signing and its deliveries. The rules then pick:

- ``images_days``: studies ready for at least that many days;
- ``max_disk_percent``: while the storage root's disk is fuller than that, the oldest ready
  studies, whatever their age.

Only the images go (files first, then their index rows, so that a crash between the two leaves
rows that the next run removes, never files the node would index again at start); results,
signed reports and the study's rows stay. Each purge is recorded on the study's timeline
(event ``images_purged``) and in the audit log (user ``system``, action ``retention_purge``),
with UIDs and counts only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection

from .jobs import FAILED, QUEUED, RESULTS_READY, RUNNING, add_event
from .schema import audit_log, instances, jobs, outbox, reviews, shadow_runs, studies

if TYPE_CHECKING:
    from aidx.config import RetentionConfig

    from .store import Store

log = logging.getLogger("aidx.retention")

DAY_S = 86400.0
UNFINISHED_JOBS = (QUEUED, RUNNING, RESULTS_READY, FAILED)
UNFINISHED_SHADOW_RUNS = (
    QUEUED,
    RUNNING,
)  # aidx.store.shadow's states; failed ones are not retried
SYSTEM = "system"


@dataclass(frozen=True)
class Purge:
    """A study whose images a rule picked."""

    study_uid: str
    ready_at: float
    instances: int
    bytes: int
    rule: str  # "images_days" or "max_disk_percent"


def _blocked(conn: Connection) -> set[str]:
    """Studies whose images are still needed (a job, a review or a delivery not done)."""
    blocked: set[str] = set()
    for query in (
        select(jobs.c.study_uid).where(jobs.c.state.in_(UNFINISHED_JOBS)),
        select(shadow_runs.c.study_uid).where(shadow_runs.c.state.in_(UNFINISHED_SHADOW_RUNS)),
        select(reviews.c.study_uid).where(reviews.c.state != "signed"),
        select(outbox.c.study_uid).where(
            (outbox.c.state != "sent") & outbox.c.study_uid.is_not(None)
        ),
        select(studies.c.study_uid).where(studies.c.state != "complete"),
    ):
        blocked.update(str(uid) for (uid,) in conn.execute(query.distinct()))
    return blocked


def ready_studies(conn: Connection) -> list[Purge]:
    """Studies whose images nothing needs any more, oldest ready first (rule not yet set)."""
    blocked = _blocked(conn)
    ready: dict[str, float] = {}
    for query in (
        select(jobs.c.study_uid, func.max(jobs.c.updated_at)).group_by(jobs.c.study_uid),
        select(reviews.c.study_uid, func.max(reviews.c.signed_at)).group_by(reviews.c.study_uid),
        select(outbox.c.study_uid, func.max(outbox.c.sent_at)).group_by(outbox.c.study_uid),
        select(studies.c.study_uid, studies.c.last_arrival),
    ):
        for uid, at in conn.execute(query):
            if uid is None or at is None:
                continue
            ready[str(uid)] = max(ready.get(str(uid), 0.0), float(at))
    with_jobs = {str(u) for (u,) in conn.execute(select(jobs.c.study_uid).distinct())}
    held = conn.execute(
        select(instances.c.study_uid, func.count(), func.sum(instances.c.size)).group_by(
            instances.c.study_uid
        )
    )
    found = [
        Purge(str(uid), ready[str(uid)], int(count), int(size or 0), "")
        for uid, count, size in held
        if str(uid) in with_jobs and str(uid) not in blocked and str(uid) in ready
    ]
    return sorted(found, key=lambda p: (p.ready_at, p.study_uid))


def plan(
    store: Store,
    policy: RetentionConfig,
    now: float | None = None,
    disk: tuple[int, int] | None = None,
) -> list[Purge]:
    """What the rules of ``policy`` delete now. ``disk``: (total, used) bytes of the storage
    root's disk (default: read it)."""
    now = time.time() if now is None else now
    with store.engine.connect() as conn:
        candidates = ready_studies(conn)
    picked: list[Purge] = []
    chosen: set[str] = set()
    if policy.images_days is not None:
        limit = now - policy.images_days * DAY_S
        for p in candidates:
            if p.ready_at <= limit:
                picked.append(Purge(p.study_uid, p.ready_at, p.instances, p.bytes, "images_days"))
                chosen.add(p.study_uid)
    if policy.max_disk_percent is not None and store.root is not None:
        if disk is None:
            usage = shutil.disk_usage(store.root)
            disk = (usage.total, usage.total - usage.free)
        total, used = disk
        used -= sum(p.bytes for p in picked)
        for p in candidates:
            if used * 100.0 <= policy.max_disk_percent * total:
                break
            if p.study_uid in chosen:
                continue
            picked.append(Purge(p.study_uid, p.ready_at, p.instances, p.bytes, "max_disk_percent"))
            used -= p.bytes
    return picked


def purge(store: Store, item: Purge, now: float | None = None) -> int:
    """Delete the images of ``item``'s study if nothing needs them still (checked again: an
    image may have arrived since the plan); returns how many files went."""
    with store.engine.connect() as conn:
        if item.study_uid in _blocked(conn):
            return 0
        rows = conn.execute(
            select(instances.c.sop_uid, instances.c.path).where(
                instances.c.study_uid == item.study_uid
            )
        ).all()
    for _, path in rows:
        Path(path).unlink(missing_ok=True)
    _remove_empty_folders({Path(p).parent for _, p in rows}, store.root)
    now = time.time() if now is None else now
    detail = {"instances": len(rows), "bytes": item.bytes, "rule": item.rule}
    with store._write() as conn:
        gone = conn.execute(
            delete(instances).where(instances.c.sop_uid.in_([r[0] for r in rows]))
        ).rowcount
        if not gone:
            return 0  # another node's retention on this store recorded this purge
        add_event(
            conn, item.study_uid, "images_purged", None, f"{len(rows)} images ({item.rule})", now
        )
        conn.execute(
            audit_log.insert().values(
                at=now,
                username=SYSTEM,
                role=None,
                action="retention_purge",
                study_uid=item.study_uid,
                detail=json.dumps(detail, sort_keys=True),
                client=None,
            )
        )
    log.info("retention: deleted %d images of study %s (%s)", len(rows), item.study_uid, item.rule)
    return len(rows)


def _remove_empty_folders(folders: set[Path], root: Path | None) -> None:
    """Remove the study's emptied spool folders (series, then study), never the root's own."""
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        for level in (folder, folder.parent):
            if (
                root is None
                or not level.is_relative_to(root)
                or len(level.parts) <= len(root.parts) + 1
            ):
                break
            try:
                level.rmdir()
            except OSError:
                break  # not empty, or gone
