"""The store: the index of received patients, studies, series and instances, the study jobs and
the export outbox (SQLAlchemy Core; SQLite in WAL mode by default, PostgreSQL by URL).

Files are the source of truth for received instances (see :mod:`dicom_node.spool`); the index is
what the node, the workers and the review app query. Every write is one short transaction, so a
crash at any point leaves either the old or the new state, and every step is keyed by UIDs, so
replaying it changes nothing.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    func,
    make_url,
    select,
    update,
)

from aidx.permissions import create_private_file, sqlite_path

from .jobs import QUEUED, JobQueue, add_event
from .migrations import prepare, schema_lock
from .outbox import OutboxItem, OutboxQueue
from .paths import root_prefix, set_root, to_stored
from .schema import events, instances, jobs, metadata, outbox, patients, results, series, studies
from .shadow import ShadowQueue

if TYPE_CHECKING:
    from aidx.config import AidxConfig

__all__ = [
    "IndexResult",
    "InstanceRecord",
    "OutboxItem",
    "Store",
    "events",
    "instances",
    "jobs",
    "metadata",
    "outbox",
    "patients",
    "results",
    "series",
    "studies",
]


class _Statement:
    """A statement of the receive path, run on the driver's own cursor: SQLAlchemy's execution
    context costs more than SQLite itself for these one-row statements, run several times per
    received instance. Written with ``:name`` parameters (sqlite3), also kept in the ``%(name)s``
    form of psycopg."""

    def __init__(self, sql: str) -> None:
        self.named = sql
        self.pyformat = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql)


# The receive path's statements (plain SQL: the same on SQLite and PostgreSQL).
_SQL_INSTANCE_PLACE = _Statement(
    "SELECT i.study_uid, i.series_uid, p.patient_key, i.path FROM instances i "
    "JOIN studies s ON s.study_uid = i.study_uid JOIN patients p ON p.id = s.patient_pk "
    "WHERE i.sop_uid = :sop_uid"
)
_SQL_SERIES_PLACE = _Statement(
    "SELECT r.study_uid, p.patient_key FROM series r JOIN studies s ON s.study_uid = r.study_uid "
    "JOIN patients p ON p.id = s.patient_pk WHERE r.series_uid = :series_uid"
)
_SQL_STUDY_PATIENT = _Statement(
    "SELECT p.patient_key FROM studies s JOIN patients p ON p.id = s.patient_pk "
    "WHERE s.study_uid = :study_uid"
)
_SQL_INSTANCE_RESENT = _Statement(
    "UPDATE instances SET path = :path, size = :size, transfer_syntax = :transfer_syntax, "
    "received_at = :received_at WHERE sop_uid = :sop_uid"
)
_SQL_INSTANCE_INSERT = _Statement(
    "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, "
    "instance_number, path, size, calling_ae, received_at) VALUES (:sop_uid, :series_uid, "
    ":study_uid, :sop_class_uid, :transfer_syntax, :instance_number, :path, :size, "
    ":calling_ae, :received_at)"
)
_SQL_STUDY_REOPEN = _Statement(
    "UPDATE studies SET state = 'updated' WHERE study_uid = :study_uid AND state = 'complete'"
)
# An open study's deadline moves earlier only when its quiet period shrinks (a peer with a
# shorter one, or a restart with a shorter setting): the assembler must then plan again.
_SQL_STUDY_SHORTEN = _Statement(
    "UPDATE studies SET quiet_period_s = :quiet "
    "WHERE study_uid = :study_uid AND quiet_period_s > :quiet"
)
_SQL_STUDY_BUMP = _Statement(
    "UPDATE studies SET instance_count = instance_count + 1, bytes = bytes + :size, "
    "last_arrival = :now, quiet_period_s = :quiet WHERE study_uid = :study_uid"
)
_SQL_SERIES_BUMP = _Statement(
    "UPDATE series SET instance_count = instance_count + 1, bytes = bytes + :size, "
    "last_arrival = :now WHERE series_uid = :series_uid"
)

StudyState = Literal["receiving", "complete", "updated"]
IndexOutcome = Literal["new", "duplicate", "conflict"]


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one received instance (read from its header)."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    modality: str
    series_description: str
    body_part: str
    series_number: int | None
    instance_number: int | None
    path: str
    size: int
    calling_ae: str

    @property
    def patient_key(self) -> str:
        """The patient's key in the index: issuer and Patient ID."""
        return f"{self.issuer}\\{self.patient_id}"


@dataclass(frozen=True)
class IndexResult:
    outcome: IndexOutcome
    # A new study, a complete one reopened by a late instance, or an open one whose quiet
    # period shrank: the study assembler has to plan its completion again.
    study_opened: bool
    # With "conflict": why the instance was not indexed (UIDs only, never patient data).
    conflict: str = ""


def _open_schema(engine: Engine, where: str) -> None:
    """Create a new database's tables, or check an existing one's schema version
    (aidx.store.migrations). ``aidx serve`` and ``aidx worker`` processes started together on a new
    database would race between "does it exist?" and "CREATE TABLE"; they take turns under one
    lock (SQLite: BEGIN IMMEDIATE, the others wait through the busy timeout; PostgreSQL: a
    transaction-scoped advisory lock)."""
    with engine.connect() as conn:
        schema_lock(conn)
        prepare(conn, where)
        conn.commit()


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for ``store.url``: PostgreSQL goes through psycopg 3 (the
    ``[postgres]`` extra), whichever of the usual spellings the URL uses."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def create_store_engine(url: str) -> Engine:
    """An engine for ``store.url``; a PostgreSQL URL without its driver installed is refused
    with the fix (ValueError)."""
    try:
        return create_engine(
            engine_url(url),
            connect_args={"check_same_thread": False} if url.startswith("sqlite") else {},
        )
    except ImportError as exc:
        raise ValueError(
            f"store.url {safe_url(url)} needs a database driver that is not installed "
            f"({exc.name}): pip install 'aidx[postgres]' for PostgreSQL"
        ) from exc


def safe_url(url: str) -> str:
    """The store URL with any password masked, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


class StoreUnavailableError(ValueError):
    """The store cannot be opened where the configuration points: the message names the key."""


class Store(OutboxQueue, JobQueue, ShadowQueue):
    """Thread-safe access to the index. SQLite writes are serialised by a lock in this process
    (and by SQLite's busy timeout across processes).

    ``root`` is this host's storage root: the files the store lists are recorded relative to it
    (:mod:`aidx.store.paths`), so the same rows serve a host that mounts the root elsewhere or
    a backup restored into another folder. Without a root, paths pass unchanged."""

    def __init__(self, url: str, root: Path | None = None) -> None:
        self.url = url
        self.root = Path(root).resolve() if root is not None else None
        self._root_prefix = root_prefix(self.root)
        self.is_sqlite = url.startswith("sqlite")
        database = sqlite_path(url)
        if database is not None:  # password hashes: the owner's alone (aidx.permissions)
            try:
                create_private_file(database)
            except OSError as exc:
                raise StoreUnavailableError(
                    f"store.url {safe_url(url)}: cannot create {database} ({exc.strerror}): "
                    "give a folder this account may write (store.url, or data_dir when "
                    "store.url is unset)"
                ) from exc
        self.engine: Engine = create_store_engine(url)
        set_root(self.engine.dialect, self.root)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write_lock = threading.Lock()
        # Series whose rows exist (committed): their study and patient key.
        self._known_series: dict[str, tuple[str, str]] = {}
        _open_schema(self.engine, safe_url(url))

    @classmethod
    def for_config(cls, config: AidxConfig) -> Store:
        """The store of ``config`` (store.url), its paths under storage.root (else data_dir)."""
        return cls(config.store_url(), root=config.storage_root())

    def close(self) -> None:
        self.engine.dispose()

    def _run(self, conn: Connection, statement: _Statement, params: dict[str, Any]) -> Any:
        """Run one receive-path statement on ``conn``'s driver connection (in its transaction);
        the driver's cursor (``fetchone``, ``rowcount``)."""
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(statement.named if self.is_sqlite else statement.pyformat, params)
        return cursor

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    # ----------------------------------------------------------------------------- receiving
    def index_instance(
        self, rec: InstanceRecord, received_at: float, quiet_period_s: float
    ) -> IndexResult:
        """Record a received instance; idempotent per SOP Instance UID.

        A new instance of a study that was complete marks the study "updated", so that it is
        assembled (and processed) again once it settles. Runs for every received instance, so
        the common case (its series already indexed) is five prepared statements.
        """
        with self._write() as conn:
            place = self._run(conn, _SQL_INSTANCE_PLACE, {"sop_uid": rec.sop_uid}).fetchone()
            why = self._conflict(conn, rec, place)
            if why:
                return IndexResult("conflict", study_opened=False, conflict=why)
            if place is not None:
                self._run(
                    conn,
                    _SQL_INSTANCE_RESENT,
                    {
                        "sop_uid": rec.sop_uid,
                        "path": to_stored(rec.path, self._root_prefix),
                        "size": rec.size,
                        # The file was replaced by the re-sent one, which may be encoded
                        # differently.
                        "transfer_syntax": rec.transfer_syntax,
                        "received_at": received_at,
                    },
                )
                return IndexResult("duplicate", study_opened=False)
            if rec.series_uid in self._known_series:
                opened = self._bump_study(conn, rec, received_at, quiet_period_s)
            else:
                patient_pk = self._patient(conn, rec)
                opened = self._study(conn, rec, patient_pk, received_at, quiet_period_s)
            self._series(conn, rec, received_at)
            self._run(
                conn,
                _SQL_INSTANCE_INSERT,
                {
                    "sop_uid": rec.sop_uid,
                    "series_uid": rec.series_uid,
                    "study_uid": rec.study_uid,
                    "sop_class_uid": rec.sop_class_uid,
                    "transfer_syntax": rec.transfer_syntax,
                    "instance_number": rec.instance_number,
                    "path": to_stored(rec.path, self._root_prefix),
                    "size": rec.size,
                    "calling_ae": rec.calling_ae,
                    "received_at": received_at,
                },
            )
        if len(self._known_series) > 10_000:
            self._known_series.clear()
        self._known_series[rec.series_uid] = (rec.study_uid, rec.patient_key)
        return IndexResult("new", study_opened=opened)

    def uid_conflict(self, rec: InstanceRecord) -> str:
        """Why ``rec`` cannot be indexed beside what is indexed, or "" (checked before its file
        is written, so a conflicting instance never replaces a stored file)."""
        with self.engine.connect() as conn:
            place = self._run(conn, _SQL_INSTANCE_PLACE, {"sop_uid": rec.sop_uid}).fetchone()
            return self._conflict(conn, rec, place)

    def _conflict(self, conn: Connection, rec: InstanceRecord, place: Any) -> str:
        """A UID of ``rec`` that is indexed under another study, series or patient: a re-used
        UID, never a re-send. The reason names UIDs only."""
        if place is not None:
            study_uid, series_uid, patient_key, _ = place
            if study_uid != rec.study_uid or series_uid != rec.series_uid:
                return (
                    f"SOP Instance UID {rec.sop_uid} is stored in study {study_uid} series "
                    f"{series_uid}; this one is in study {rec.study_uid} series {rec.series_uid}"
                )
            if patient_key != rec.patient_key:
                return (
                    f"SOP Instance UID {rec.sop_uid} of study {study_uid} is stored for another "
                    "patient"
                )
            return ""
        known = self._known_series.get(rec.series_uid)
        if known is None:
            row = self._run(conn, _SQL_SERIES_PLACE, {"series_uid": rec.series_uid}).fetchone()
            known = (str(row[0]), str(row[1])) if row is not None else None
        if known is not None:
            if known[0] != rec.study_uid:
                return (
                    f"Series Instance UID {rec.series_uid} is stored in study {known[0]}; this "
                    f"instance ({rec.sop_uid}) is in study {rec.study_uid}"
                )
            if known[1] != rec.patient_key:
                return (
                    f"study {rec.study_uid} is stored for another patient than instance "
                    f"{rec.sop_uid}'s"
                )
            return ""
        row = self._run(conn, _SQL_STUDY_PATIENT, {"study_uid": rec.study_uid}).fetchone()
        if row is not None and str(row[0]) != rec.patient_key:
            return (
                f"study {rec.study_uid} is stored for another patient than instance {rec.sop_uid}'s"
            )
        return ""

    def _patient(self, conn: Connection, rec: InstanceRecord) -> int:
        key = rec.patient_key
        row = conn.execute(select(patients.c.id).where(patients.c.patient_key == key)).first()
        if row is not None:
            return int(row[0])
        result = conn.execute(
            patients.insert().values(
                patient_key=key,
                patient_id=rec.patient_id,
                issuer=rec.issuer,
                patient_name=rec.patient_name,
                birth_date=rec.birth_date,
                sex=rec.sex,
            )
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]

    def _study(
        self,
        conn: Connection,
        rec: InstanceRecord,
        patient_pk: int,
        now: float,
        quiet_period_s: float,
    ) -> bool:
        row = conn.execute(
            select(studies.c.state).where(studies.c.study_uid == rec.study_uid)
        ).first()
        if row is None:
            conn.execute(
                studies.insert().values(
                    study_uid=rec.study_uid,
                    patient_pk=patient_pk,
                    accession_number=rec.accession_number,
                    study_date=rec.study_date,
                    study_time=rec.study_time,
                    description=rec.study_description,
                    calling_ae=rec.calling_ae,
                    state="receiving",
                    version=0,
                    quiet_period_s=quiet_period_s,
                    instance_count=1,
                    bytes=rec.size,
                    first_arrival=now,
                    last_arrival=now,
                )
            )
            return True
        return self._bump_study(conn, rec, now, quiet_period_s)

    def _bump_study(
        self, conn: Connection, rec: InstanceRecord, now: float, quiet_period_s: float
    ) -> bool:
        """Count an instance in its existing study; a complete study becomes "updated".
        Returns whether the study's completion must be planned again."""
        reopened = self._run(conn, _SQL_STUDY_REOPEN, {"study_uid": rec.study_uid}).rowcount
        shortened = self._run(
            conn, _SQL_STUDY_SHORTEN, {"study_uid": rec.study_uid, "quiet": quiet_period_s}
        ).rowcount
        self._run(
            conn,
            _SQL_STUDY_BUMP,
            {"study_uid": rec.study_uid, "size": rec.size, "now": now, "quiet": quiet_period_s},
        )
        return bool(reopened or shortened)

    def _series(self, conn: Connection, rec: InstanceRecord, now: float) -> None:
        changed = self._run(
            conn, _SQL_SERIES_BUMP, {"series_uid": rec.series_uid, "size": rec.size, "now": now}
        ).rowcount
        if changed == 0:
            conn.execute(
                series.insert().values(
                    series_uid=rec.series_uid,
                    study_uid=rec.study_uid,
                    modality=rec.modality,
                    description=rec.series_description,
                    body_part=rec.body_part,
                    series_number=rec.series_number,
                    instance_count=1,
                    bytes=rec.size,
                    first_arrival=now,
                    last_arrival=now,
                )
            )

    def recent_instance_paths(self, count: int) -> list[str]:
        """The files of the ``count`` instances received last (absolute: under this host's
        root when recorded relative to it)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(instances.c.path).order_by(instances.c.received_at.desc()).limit(count)
            )
            return [str(r[0]) for r in rows]

    def indexed_paths(self) -> set[str]:
        with self.engine.connect() as conn:
            return {str(r[0]) for r in conn.execute(select(instances.c.path))}

    # ------------------------------------------------------------------------------ assembly
    def next_completion(self) -> tuple[str, float] | None:
        """The open study that settles first, and when (epoch seconds)."""
        due = studies.c.last_arrival + studies.c.quiet_period_s
        with self.engine.connect() as conn:
            row = conn.execute(
                select(studies.c.study_uid, due)
                .where(studies.c.state.in_(("receiving", "updated")))
                .order_by(due)
                .limit(1)
            ).first()
        return (str(row[0]), float(row[1])) if row else None

    def complete_study(self, study_uid: str, now: float, priority: int = 0) -> int | None:
        """Mark a settled study complete and record its job; returns the job id.

        Does nothing (returns None) when an instance arrived in the meantime or the study is
        already complete, so calling it twice, or from two nodes on one store, never makes two
        jobs.
        """
        with self._write() as conn:
            row = conn.execute(
                select(
                    studies.c.state,
                    studies.c.version,
                    studies.c.last_arrival,
                    studies.c.quiet_period_s,
                ).where(studies.c.study_uid == study_uid)
            ).first()
            if row is None or row.state not in ("receiving", "updated"):
                return None
            if row.last_arrival + row.quiet_period_s > now:
                return None
            version = int(row.version) + 1
            # Conditional on what was read: another node's assembler on the same store (or an
            # instance arriving) between the read and this update makes it change nothing.
            changed = conn.execute(
                update(studies)
                .where(
                    (studies.c.study_uid == study_uid)
                    & (studies.c.state == row.state)
                    & (studies.c.version == row.version)
                    & (studies.c.last_arrival == row.last_arrival)
                )
                .values(state="complete", version=version, completed_at=now)
            ).rowcount
            if not changed:
                return None
            result = conn.execute(
                jobs.insert().values(
                    study_uid=study_uid,
                    study_version=version,
                    state=QUEUED,
                    priority=priority,
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            job_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            detail = f"version {version}" + (f", priority {priority}" if priority else "")
            add_event(conn, study_uid, "complete", job_id, detail, now)
            return job_id

    # ------------------------------------------------------------------------------- queries
    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's series rows (description, body part, modality, counts)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(series).where(series.c.study_uid == study_uid))
            return [dict(r._mapping) for r in rows]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
        return dict(row._mapping) if row else None

    def study_jobs(self, study_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs).where(jobs.c.study_uid == study_uid).order_by(jobs.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances).where(instances.c.study_uid == study_uid))
            return [dict(r._mapping) for r in rows]

    def count(self, table: Table) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL: readers never block the writer. NORMAL: a commit survives a crash of the process
    # (what kill -9 tests); files are fsync'd separately and re-indexed at start-up if needed.
    cursor.execute("PRAGMA busy_timeout=30000")
    # Switching a new database to WAL answers "locked" at once (no busy handler) while another
    # process does the same: back off and try again, as the busy handler would.
    for attempt in range(200):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 199:
                raise
            time.sleep(0.01 * min(attempt + 1, 10))
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
