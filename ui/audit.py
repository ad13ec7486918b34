"""The append-only audit log of the review app (issue 7, item 7): who did what, when, from where;
queries and CSV export. Split from :mod:`ui.accounts`, which records logins and account changes
here."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, CursorResult, select

from aidx.store.schema import audit_log

if TYPE_CHECKING:
    from aidx.store.store import Store

CSV_COLUMNS: Final = ("id", "at", "username", "role", "action", "study_uid", "detail", "client")


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    username: str
    role: str | None
    action: str
    study_uid: str | None
    detail: dict[str, Any]
    client: str | None


class Audit:
    """The append-only audit log: who did what, when, from where (issue 7, item 7).

    ``detail`` is a small JSON object; like every log, it must never hold patient names or IDs
    (name studies by UID).
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def record(
        self,
        username: str,
        role: str | None,
        action: str,
        study_uid: str | None = None,
        detail: Mapping[str, Any] | None = None,
        client: str | None = None,
    ) -> int:
        """Append one entry; returns its id."""
        # Store._write holds the process's write lock, as every writer of the store does.
        with self._store._write() as conn:
            return self._insert(conn, username, role, action, study_uid, detail, client)

    def has_viewed(self, username: str, study_uid: str) -> bool:
        """Whether the user opened this study in the viewer (an audited study_view): what a
        direct image request must follow, so that every image access is audited."""
        with self._store.engine.connect() as conn:
            found = conn.execute(
                select(audit_log.c.id)
                .where(
                    (audit_log.c.username == username)
                    & (audit_log.c.action == "study_view")
                    & (audit_log.c.study_uid == study_uid)
                )
                .limit(1)
            ).first()
        return found is not None

    def _insert(
        self,
        conn: Connection,
        username: str,
        role: str | None,
        action: str,
        study_uid: str | None = None,
        detail: Mapping[str, Any] | None = None,
        client: str | None = None,
    ) -> int:
        if not action or len(action) > 40:
            raise ValueError(f"an audit action has 1 to 40 characters, not {action!r}")
        result = conn.execute(
            audit_log.insert().values(
                at=self._clock(),
                # A failed login records the name as typed: bound it.
                username=username[:64],
                role=role,
                action=action,
                study_uid=study_uid,
                detail=json.dumps(dict(detail or {}), ensure_ascii=False, sort_keys=True),
                client=client[:128] if client else None,
            )
        )
        return _inserted_id(result)

    def query(
        self,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        username: str | None = None,
        action: str | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Entries at or after ``since`` and before ``until``, newest first."""
        return self._select(since, until, username, action, limit, newest_first=True)

    def export_csv(
        self,
        target: Path | str | IO[str],
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        username: str | None = None,
        action: str | None = None,
    ) -> int:
        """Write the matching entries, oldest first, as CSV with a header row; returns the count.

        A path is written as UTF-8 with a byte-order mark, which spreadsheet programs need to show
        Chinese text; times are ISO 8601 in local time with the UTC offset.
        """
        entries = self._select(since, until, username, action, None, newest_first=False)
        if isinstance(target, str | Path):
            with Path(target).open("w", encoding="utf-8-sig", newline="") as f:
                _write_csv(f, entries)
        else:
            _write_csv(target, entries)
        return len(entries)

    def _select(
        self,
        since: datetime | float | None,
        until: datetime | float | None,
        username: str | None,
        action: str | None,
        limit: int | None,
        newest_first: bool,
    ) -> list[AuditEntry]:
        stmt = select(audit_log)
        if since is not None:
            stmt = stmt.where(audit_log.c.at >= _epoch(since))
        if until is not None:
            stmt = stmt.where(audit_log.c.at < _epoch(until))
        if username is not None:
            stmt = stmt.where(audit_log.c.username == username)
        if action is not None:
            stmt = stmt.where(audit_log.c.action == action)
        order = audit_log.c.id.desc() if newest_first else audit_log.c.id.asc()
        stmt = stmt.order_by(order)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._store.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [
            AuditEntry(
                id=row.id,
                at=row.at,
                username=row.username,
                role=row.role,
                action=row.action,
                study_uid=row.study_uid,
                detail=json.loads(row.detail) if row.detail else {},
                client=row.client,
            )
            for row in rows
        ]


def format_time(at: float) -> str:
    """``at`` (seconds since the epoch) as ISO 8601 in local time with its UTC offset."""
    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        return value.timestamp()  # a naive datetime is local time
    return float(value)


def _write_csv(f: IO[str], entries: list[AuditEntry]) -> None:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for e in entries:
        cells = (
            str(e.id),
            format_time(e.at),
            e.username,
            e.role or "",
            e.action,
            e.study_uid or "",
            json.dumps(e.detail, ensure_ascii=False, sort_keys=True),
            e.client or "",
        )
        writer.writerow([_csv_safe(c) for c in cells])


def _csv_safe(cell: str) -> str:
    """Neutralise spreadsheet formulas: a failed login records whatever name was typed."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


# ---------------------------------------------------------------------------------- accounts


def _inserted_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the store returned no id for a new row")
    return int(key[0])
