"""Versions of the store's schema, and the upgrades between them (``aidx db``).

The store records its schema version in the table ``schema_version``: one row per version the
database has been at (when, by which aidx), the highest being the current one. A new database
is created at :data:`LATEST`. A database made before versions were recorded (aidx up to 0.1,
no such table) is version 1.

Serving processes (``aidx serve``, ``worker``, ``ui`` and the rest) open only a database at
their own version: an older one is refused with the command that upgrades it, a newer one
(written by a newer aidx) with the advice to run that aidx or restore the backup made before
its upgrade. An upgrade is a deliberate step, as with Orthanc's ``--upgrade``: ``aidx db
upgrade`` first copies an SQLite database beside itself (``VACUUM INTO``), then applies the
missing steps in order inside one transaction, so that a failed step leaves the database as it
was. A server database (PostgreSQL) is backed up by its own tools (``pg_dump``) first.

Adding a step: change :mod:`aidx.store.schema` (what a new database gets) and append a
:class:`Migration` that brings a database of the previous version to the same shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, func, inspect, select, text
from sqlalchemy.engine import Connection, Engine

from aidx import __version__

from .schema import decisions, metadata, shadow_runs

BASELINE = 1  # the schema of a database made before versions were recorded
# PostgreSQL advisory lock key for schema changes (any constant shared by all aidx processes).
SCHEMA_LOCK_KEY = 0x41494458  # "AIDX"

versioning = MetaData()
schema_version = Table(
    "schema_version",
    versioning,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
    Column("aidx_version", String(32), nullable=False),
    Column("description", String(200), nullable=False),
)


class SchemaVersionError(ValueError):
    """The database is at another schema version than this aidx; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    version: int  # the version this step brings the database to (from version - 1)
    description: str
    apply: Callable[[Connection], None]


def _index_decisions(conn: Connection) -> None:
    for index in decisions.indexes:
        if index.name in ("ix_decisions_review_key", "ix_decisions_at"):
            index.create(conn, checkfirst=True)


def _shadow_mode(conn: Connection) -> None:
    columns = {c["name"] for c in inspect(conn).get_columns("results")}
    if "shadow" not in columns:
        # FALSE is understood by SQLite (3.23+) and PostgreSQL alike.
        conn.exec_driver_sql("ALTER TABLE results ADD COLUMN shadow BOOLEAN NOT NULL DEFAULT FALSE")
    shadow_runs.create(conn, checkfirst=True)  # with its indexes


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "index decisions by (review_id, finding_key, id) and by time: a review's latest "
        "decisions and the feedback export's --since read them",
        _index_decisions,
    ),
    Migration(
        3,
        "shadow mode: results.shadow marks a challenger's results; shadow_runs queues a "
        "challenger's run after the champion's job",
        _shadow_mode,
    ),
)
LATEST = MIGRATIONS[-1].version if MIGRATIONS else BASELINE


@dataclass(frozen=True)
class SchemaState:
    version: int | None  # None: an empty database (no aidx tables)
    latest: int
    pending: tuple[Migration, ...]

    @property
    def current(self) -> bool:
        return self.version == self.latest


def schema_lock(conn: Connection) -> None:
    """Start the connection's transaction holding the store's schema lock, so that processes
    creating or upgrading the schema take turns: SQLite's write lock (BEGIN IMMEDIATE; others
    wait through the busy timeout), PostgreSQL's transaction-scoped advisory lock."""
    dialect = conn.engine.dialect.name
    if dialect == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})


def current_version(conn: Connection) -> int | None:
    """The database's schema version; None when it holds no aidx tables yet."""
    tables = set(inspect(conn).get_table_names())
    if schema_version.name in tables:
        version = conn.execute(select(func.max(schema_version.c.version))).scalar()
        if version is not None:
            return int(version)
    if tables & set(metadata.tables):
        return BASELINE
    return None


def state(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> SchemaState:
    latest = migrations[-1].version if migrations else BASELINE
    version = current_version(conn)
    pending = tuple(m for m in migrations if version is not None and m.version > version)
    return SchemaState(version, latest, pending)


def prepare(conn: Connection, where: str, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """For a serving process: create a new database at the latest version, or check that an
    existing one is at it (creating tables a version added but a crash left out). Runs inside
    the caller's transaction. Raises SchemaVersionError naming the fix."""
    st = state(conn, migrations)
    if st.version is None:
        metadata.create_all(conn)
        versioning.create_all(conn)
        _record(conn, st.latest, "created")
        return st.latest
    if st.version < st.latest:
        raise SchemaVersionError(
            f"the database {where} is at schema version {st.version}; this aidx "
            f"({__version__}) needs version {st.latest}. Stop every aidx process using it, then "
            "run `aidx db upgrade` (it backs up an SQLite database first; see `aidx db status`)"
        )
    if st.version > st.latest:
        raise SchemaVersionError(
            f"the database {where} is at schema version {st.version}, written by a newer aidx; "
            f"this aidx ({__version__}) knows versions up to {st.latest}. Run the newer aidx, "
            "or restore the backup that `aidx db upgrade` made before upgrading"
        )
    metadata.create_all(conn)  # checkfirst: only tables that are missing
    return st.version


def upgrade(
    engine: Engine,
    backup_dir: Path | None = None,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> tuple[SchemaState, tuple[Migration, ...], Path | None]:
    """Bring the database to the latest version. Returns the state before, the steps applied
    and the SQLite backup (None when nothing was to do or the database is not SQLite).
    Raises SchemaVersionError for a database newer than this aidx."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        before = state(conn, migrations)
    if before.version is not None and before.version > before.latest:
        raise SchemaVersionError(
            f"the database is at schema version {before.version}, newer than this aidx's "
            f"{before.latest}: run the newer aidx, or restore the backup made before its upgrade"
        )
    if before.version is None or not before.pending:
        if before.version is None:  # an empty database (a new PostgreSQL one): create it
            with engine.connect() as conn:
                schema_lock(conn)
                prepare(conn, engine.url.render_as_string(hide_password=True), migrations)
                conn.commit()
        return before, (), None
    saved = backup(engine, backup_dir) if sqlite else None
    with engine.connect() as conn:
        schema_lock(conn)  # no other writer while the schema changes
        now = state(conn, migrations)  # another process may have upgraded meanwhile
        versioning.create_all(conn)
        if now.version == BASELINE and not _recorded(conn, BASELINE):
            _record(conn, BASELINE, "schema of aidx 0.1 (before versions were recorded)")
        for step in now.pending:
            step.apply(conn)
            _record(conn, step.version, step.description)
        conn.commit()
    return before, now.pending, saved


def backup(engine: Engine, backup_dir: Path | None = None) -> Path:
    """A consistent copy of an SQLite store, made while aidx may be running (``VACUUM INTO``
    reads one snapshot, WAL pages included), named after its schema version and the time:
    ``aidx.db.v2-20261128-120000.bak`` beside the file or in ``backup_dir``. Raises
    SchemaVersionError for other databases (PostgreSQL has pg_dump) and in-memory ones."""
    if engine.dialect.name != "sqlite":
        raise SchemaVersionError(
            f"aidx backs up SQLite stores only; back up this {engine.dialect.name} database "
            "with its own tools (PostgreSQL: pg_dump -Fc)"
        )
    database = engine.url.database
    if not database or database == ":memory:":
        raise SchemaVersionError("an in-memory SQLite database has nothing to back up")
    with engine.connect() as conn:
        version = current_version(conn)
    source = Path(database)
    folder = backup_dir or source.parent
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = f"v{version}" if version is not None else "empty"
    target = folder / f"{source.name}.{label}-{stamp}.bak"
    n = 1
    while target.exists():
        target = folder / f"{source.name}.{label}-{stamp}-{n}.bak"
        n += 1
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM INTO ?", (str(target),))
    return target


def _recorded(conn: Connection, version: int) -> bool:
    found = conn.execute(
        select(schema_version.c.version).where(schema_version.c.version == version)
    )
    return found.first() is not None


def _record(conn: Connection, version: int, description: str) -> None:
    conn.execute(
        schema_version.insert().values(
            version=version,
            applied_at=time.time(),
            aidx_version=__version__,
            description=description[:200],
        )
    )
