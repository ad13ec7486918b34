"""Schema versions of the store and `aidx db status` / `aidx db upgrade` (aidx.migrations)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import Connection, Engine

from aidx.cli import main
from aidx.migrations import (
    BASELINE,
    LATEST,
    MIGRATIONS,
    Migration,
    SchemaVersionError,
    current_version,
    schema_version,
    upgrade,
)
from aidx.schema import events, metadata
from aidx.store import Store

V2_INDEXES = {"ix_decisions_review_key", "ix_decisions_at"}


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def make_baseline(path: Path) -> None:
    """A database as aidx made it before schema versions: the version-1 tables, no
    schema_version table, no version-2 indexes, and some data."""
    engine = create_engine(url_of(path))
    with engine.begin() as conn:
        metadata.create_all(conn)
        for name in V2_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(
            events.insert().values(study_uid="1.2.3", event="received", at=1.0, detail="kept")
        )
    engine.dispose()


def indexes(engine: Engine) -> set[str]:
    return {ix["name"] for ix in inspect(engine).get_indexes("decisions") if ix["name"]}


def version_of(path: Path) -> int | None:
    engine = create_engine(url_of(path))
    with engine.connect() as conn:
        version = current_version(conn)
    engine.dispose()
    return version


def test_a_new_database_is_created_at_the_latest_version(tmp_path: Path) -> None:
    db = tmp_path / "aidx.db"
    Store(url_of(db)).close()
    assert version_of(db) == LATEST
    engine = create_engine(url_of(db))
    assert indexes(engine) >= V2_INDEXES
    with engine.connect() as conn:
        rows = conn.execute(select(schema_version)).all()
    assert [(r.version, r.description) for r in rows] == [(LATEST, "created")]
    engine.dispose()
    Store(url_of(db)).close()  # and opens again


def test_an_old_database_is_refused_until_upgraded_and_keeps_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "aidx.db"
    make_baseline(db)
    assert version_of(db) == BASELINE

    with pytest.raises(SchemaVersionError, match=r"schema version 1.*aidx db upgrade"):
        Store(url_of(db))
    # Any command that opens the store says so, with the fix, and no traceback.
    assert main(["--data-dir", str(tmp_path), "status"]) == 2
    assert "aidx db upgrade" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "db", "status"]) == 1
    out = capsys.readouterr().out
    assert "schema version 1; this aidx needs 2" in out and MIGRATIONS[0].description in out

    assert main(["--data-dir", str(tmp_path), "db", "upgrade"]) == 0
    out = capsys.readouterr().out
    assert "upgraded to 2" in out
    backups = list(tmp_path.glob("aidx.db.v1-*.bak"))
    assert len(backups) == 1 and str(backups[0]) in out
    # The backup is the version-1 database, data and all.
    with sqlite3.connect(backups[0]) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "schema_version" not in names and not V2_INDEXES & names
        assert conn.execute("SELECT detail FROM events").fetchall() == [("kept",)]

    assert version_of(db) == LATEST
    store = Store(url_of(db))
    assert indexes(store.engine) >= V2_INDEXES
    with store.engine.connect() as conn:
        assert conn.execute(select(events.c.detail)).scalars().all() == ["kept"]
        history = conn.execute(select(schema_version.c.version)).scalars().all()
    assert history == [1, 2]
    store.close()

    assert main(["--data-dir", str(tmp_path), "db", "upgrade"]) == 0
    assert "nothing to upgrade" in capsys.readouterr().out
    assert len(list(tmp_path.glob("aidx.db.v1-*.bak"))) == 1  # no backup without an upgrade
    assert main(["--data-dir", str(tmp_path), "db", "status"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_a_database_from_a_newer_aidx_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "aidx.db"
    Store(url_of(db)).close()
    engine = create_engine(url_of(db))
    with engine.begin() as conn:
        conn.execute(
            schema_version.insert().values(
                version=LATEST + 5, applied_at=0.0, aidx_version="9.9", description="future"
            )
        )
    with pytest.raises(SchemaVersionError, match="newer aidx"):
        Store(url_of(db))
    with pytest.raises(SchemaVersionError, match="newer than this aidx"):
        upgrade(engine)
    engine.dispose()


def test_a_failing_upgrade_step_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "aidx.db"
    make_baseline(db)

    def broken(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE half_done (x INTEGER)"))
        raise RuntimeError("step 3 failed")

    steps = (*MIGRATIONS, Migration(LATEST + 1, "a step that fails", broken))
    engine = create_engine(url_of(db))
    with pytest.raises(RuntimeError, match="step 3 failed"):
        upgrade(engine, backup_dir=tmp_path / "backups", migrations=steps)
    names = set(inspect(engine).get_table_names())
    assert "half_done" not in names and "schema_version" not in names
    assert not V2_INDEXES & indexes(engine)
    assert version_of(db) == BASELINE
    assert len(list((tmp_path / "backups").glob("*.bak"))) == 1  # made before the attempt
    engine.dispose()


def test_db_commands_on_a_data_dir_without_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "db", "status"]) == 0
    assert "no database" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path), "db", "upgrade"]) == 0
    assert "nothing to upgrade" in capsys.readouterr().out
    assert not (tmp_path / "aidx.db").exists()
