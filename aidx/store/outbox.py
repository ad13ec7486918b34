"""The export outbox in the store: durable, idempotent queue items, one association each."""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from .jobs import RESULTS_READY, SENT, add_event
from .schema import jobs, outbox


@dataclass(frozen=True)
class OutboxItem:
    id: int
    destination: str
    item_key: str
    study_uid: str | None
    series_uid: str | None
    files: list[str]
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


class OutboxQueue:
    """Outbox operations of the store (mixed into :class:`aidx.store.store.Store`)."""

    engine: Engine

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def enqueue(
        self,
        destination: str,
        item_key: str,
        files: list[str],
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> tuple[int, bool]:
        """Queue files for one association to ``destination``; idempotent per (destination,
        key). Returns the item id and whether it was new."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                select(outbox.c.id).where(
                    (outbox.c.destination == destination) & (outbox.c.item_key == item_key)
                )
            ).first()
            if row is not None:
                return int(row[0]), False
            result = conn.execute(
                outbox.insert().values(
                    destination=destination,
                    item_key=item_key,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    files=json.dumps(files),
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
            return int(result.inserted_primary_key[0]), True  # type: ignore[index]

    def outbox_items(self, state: str | None = None) -> list[OutboxItem]:
        query = select(outbox).order_by(outbox.c.id)
        if state is not None:
            query = query.where(outbox.c.state == state)
        with self.engine.connect() as conn:
            return [_outbox_item(r._mapping) for r in conn.execute(query)]

    def claim_due(self, now: float) -> OutboxItem | None:
        """Take the next due item (pending, next attempt passed) and mark it sending."""
        with self._write() as conn:
            row = conn.execute(
                select(outbox)
                .where((outbox.c.state == "pending") & (outbox.c.next_attempt_at <= now))
                .order_by(outbox.c.next_attempt_at, outbox.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            conn.execute(
                update(outbox).where(outbox.c.id == row.id).values(state="sending", updated_at=now)
            )
            return _outbox_item({**row._mapping, "state": "sending"})

    def next_due(self) -> float | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.min(outbox.c.next_attempt_at)).where(outbox.c.state == "pending")
            ).scalar()
        return float(value) if value is not None else None

    def newer_version(self, item_id: int, key_prefix: str) -> int | None:
        """The id of an item queued after ``item_id`` whose key starts with ``key_prefix`` (a
        newer version of the same FHIR report), or None."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(outbox.c.id)).where(
                    outbox.c.item_key.startswith(key_prefix, autoescape=True)
                    & (outbox.c.id > item_id)
                )
            ).scalar()
        return int(value) if value is not None else None

    def mark_sent(self, item_id: int, superseded_by: int | None = None) -> None:
        """The destination acknowledged the item, or (``superseded_by``) a newer version of it
        goes in its place and it is not sent (the note says so). When it was the last of its
        job's items, the job is sent."""
        now = time.time()
        values: dict[str, Any] = {"attempts": outbox.c.attempts + 1, "last_error": None}
        if superseded_by is not None:
            note = f"superseded by item {superseded_by}, a newer version: not sent itself"
            values = {"last_error": note}
        with self._write() as conn:
            item = conn.execute(
                select(outbox.c.study_uid, outbox.c.job_id, outbox.c.destination).where(
                    outbox.c.id == item_id
                )
            ).first()
            conn.execute(
                update(outbox)
                .where(outbox.c.id == item_id)
                .values(state="sent", sent_at=now, updated_at=now, **values)
            )
            if item is None or item.study_uid is None:
                return
            event = "sent" if superseded_by is None else "send_superseded"
            add_event(conn, item.study_uid, event, item.job_id, item.destination, now)
            if item.job_id is None:
                return
            unsent = conn.execute(
                select(func.count())
                .select_from(outbox)
                .where((outbox.c.job_id == item.job_id) & (outbox.c.state != "sent"))
            ).scalar_one()
            if unsent == 0:
                changed = conn.execute(
                    update(jobs)
                    .where((jobs.c.id == item.job_id) & (jobs.c.state == RESULTS_READY))
                    .values(state=SENT, updated_at=now)
                ).rowcount
                if changed:
                    add_event(conn, item.study_uid, SENT, item.job_id, "all destinations", now)

    def mark_attempt_failed(self, item_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: retry at ``next_attempt_at``, or fail for good if None."""
        now = time.time()
        values: dict[str, Any] = {
            "attempts": outbox.c.attempts + 1,
            "last_error": error,
            "updated_at": now,
        }
        if next_attempt_at is None:
            values["state"] = "failed"
        else:
            values.update(state="pending", next_attempt_at=next_attempt_at)
        with self._write() as conn:
            item = conn.execute(
                select(outbox.c.study_uid, outbox.c.job_id, outbox.c.destination).where(
                    outbox.c.id == item_id
                )
            ).first()
            conn.execute(update(outbox).where(outbox.c.id == item_id).values(**values))
            if item is not None and item.study_uid is not None:
                event = "send_failed" if next_attempt_at is None else "send_retry"
                detail = f"{item.destination}: {error}"
                add_event(conn, item.study_uid, event, item.job_id, detail, now)

    def requeue_interrupted(self) -> int:
        """Items left "sending" by a process that died go back to pending (at start-up)."""
        with self._write() as conn:
            return int(
                conn.execute(
                    update(outbox)
                    .where(outbox.c.state == "sending")
                    .values(state="pending", updated_at=time.time())
                ).rowcount
            )

    def retry(self, item_ids: list[int] | None = None) -> int:
        """Put failed items (all, or the given ones) back in the queue, attempts reset."""
        now = time.time()
        query = update(outbox).where(outbox.c.state == "failed")
        if item_ids is not None:
            query = query.where(outbox.c.id.in_(item_ids))
        with self._write() as conn:
            return int(
                conn.execute(
                    query.values(state="pending", attempts=0, next_attempt_at=now, updated_at=now)
                ).rowcount
            )


def _outbox_item(m: Any) -> OutboxItem:
    return OutboxItem(
        id=int(m["id"]),
        destination=str(m["destination"]),
        item_key=str(m["item_key"]),
        study_uid=m["study_uid"],
        series_uid=m["series_uid"],
        files=list(json.loads(m["files"])),
        state=str(m["state"]),
        attempts=int(m["attempts"]),
        next_attempt_at=float(m["next_attempt_at"]),
        last_error=m["last_error"],
        created_at=float(m["created_at"]),
        sent_at=float(m["sent_at"]) if m["sent_at"] is not None else None,
    )
