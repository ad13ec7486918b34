"""Schema versions of the store and `aidx db status` / `aidx db upgrade` (aidx.store.migrations)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection, Engine

from aidx.cli import main
from aidx.store.migrations import (
    BASELINE,
    LATEST,
    MIGRATIONS,
    Migration,
    SchemaVersionError,
    current_version,
    schema_version,
    upgrade,
)
from aidx.store.schema import events, metadata
from aidx.store.store import Store, create_store_engine

V2_INDEXES = {"ix_decisions_review_key", "ix_decisions_at"}


def make_baseline(url: str) -> None:
    """A database as aidx made it before schema versions: the version-1 tables, no
    schema_version table, no version-2 indexes, no version-3 shadow table and column, and
    some data."""
    engine = create_store_engine(url)
    with engine.begin() as conn:
        metadata.create_all(conn)
        for name in V2_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text("DROP TABLE shadow_runs"))
        conn.execute(text("ALTER TABLE results DROP COLUMN shadow"))
        conn.execute(
            events.insert().values(study_uid="1.2.3", event="received", at=1.0, detail="kept")
        )
    engine.dispose()


def indexes(engine: Engine) -> set[str]:
    return {ix["name"] for ix in inspect(engine).get_indexes("decisions") if ix["name"]}


def version_of(url: str) -> int | None:
    engine = create_store_engine(url)
    with engine.connect() as conn:
        version = current_version(conn)
    engine.dispose()
    return version


def test_a_new_database_is_created_at_the_latest_version(store_url: str) -> None:
    Store(store_url).close()
    assert version_of(store_url) == LATEST
    engine = create_store_engine(store_url)
    assert indexes(engine) >= V2_INDEXES
    with engine.connect() as conn:
        rows = conn.execute(select(schema_version)).all()
    assert [(r.version, r.description) for r in rows] == [(LATEST, "created")]
    engine.dispose()
    Store(store_url).close()  # and opens again


def test_an_old_database_is_refused_until_upgraded_and_keeps_its_data(
    store_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sqlite = store_url.startswith("sqlite")
    make_baseline(store_url)
    assert version_of(store_url) == BASELINE
    monkeypatch.setenv("AIDX_STORE__URL", store_url)
    cli = ["--data-dir", str(tmp_path)]

    with pytest.raises(SchemaVersionError, match=r"schema version 1.*aidx db upgrade"):
        Store(store_url)
    # Any command that opens the store says so, with the fix, and no traceback.
    assert main([*cli, "status"]) == 2
    assert "aidx db upgrade" in capsys.readouterr().err
    assert main([*cli, "db", "status"]) == 1
    out = capsys.readouterr().out
    assert f"schema version 1; this aidx needs {LATEST}" in out
    assert all(step.description in out for step in MIGRATIONS)

    assert main([*cli, "db", "upgrade"]) == 0
    out = capsys.readouterr().out
    assert f"upgraded to {LATEST}" in out
    backups = list(tmp_path.glob("aidx.db.v1-*.bak"))
    if sqlite:
        # The backup is the version-1 database, data and all.
        assert len(backups) == 1 and str(backups[0]) in out
        with sqlite3.connect(backups[0]) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert "schema_version" not in names and not V2_INDEXES & names
            assert conn.execute("SELECT detail FROM events").fetchall() == [("kept",)]
    else:
        assert backups == [] and "pg_dump" in out

    assert version_of(store_url) == LATEST
    store = Store(store_url)
    assert indexes(store.engine) >= V2_INDEXES
    assert "shadow" in {c["name"] for c in inspect(store.engine).get_columns("results")}
    assert "shadow_runs" in inspect(store.engine).get_table_names()
    with store.engine.connect() as conn:
        assert conn.execute(select(events.c.detail)).scalars().all() == ["kept"]
        history = conn.execute(select(schema_version.c.version)).scalars().all()
    assert sorted(history) == [1, 2, 3]
    store.close()

    assert main([*cli, "db", "upgrade"]) == 0
    assert "nothing to upgrade" in capsys.readouterr().out
    assert len(list(tmp_path.glob("aidx.db.v1-*.bak"))) == len(backups)  # none without upgrade
    assert main([*cli, "db", "status"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_a_database_from_a_newer_aidx_is_refused(store_url: str) -> None:
    Store(store_url).close()
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        conn.execute(
            schema_version.insert().values(
                version=LATEST + 5, applied_at=0.0, aidx_version="9.9", description="future"
            )
        )
    with pytest.raises(SchemaVersionError, match="newer aidx"):
        Store(store_url)
    with pytest.raises(SchemaVersionError, match="newer than this aidx"):
        upgrade(engine)
    engine.dispose()


def test_a_failing_upgrade_step_leaves_the_database_as_it_was(
    store_url: str, tmp_path: Path
) -> None:
    make_baseline(store_url)

    def broken(conn: Connection) -> None:
        conn.execute(text("CREATE TABLE half_done (x INTEGER)"))
        raise RuntimeError("step 3 failed")

    steps = (*MIGRATIONS, Migration(LATEST + 1, "a step that fails", broken))
    engine = create_store_engine(store_url)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        upgrade(engine, backup_dir=tmp_path / "backups", migrations=steps)
    names = set(inspect(engine).get_table_names())
    assert "half_done" not in names and "schema_version" not in names
    assert not V2_INDEXES & indexes(engine)
    assert version_of(store_url) == BASELINE
    made = len(list((tmp_path / "backups").glob("*.bak")))
    assert made == (1 if store_url.startswith("sqlite") else 0)  # SQLite: before the attempt
    engine.dispose()


def test_db_commands_on_a_data_dir_without_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "db", "status"]) == 0
    assert "no database" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path), "db", "upgrade"]) == 0
    assert "nothing to upgrade" in capsys.readouterr().out
    assert not (tmp_path / "aidx.db").exists()


def test_upgrading_an_empty_database_creates_it_at_the_latest_version(store_url: str) -> None:
    engine = create_store_engine(store_url)
    before, applied, backup = upgrade(engine)
    assert before.version is None and applied == () and backup is None
    engine.dispose()
    assert version_of(store_url) == LATEST
    Store(store_url).close()


def test_db_backup_copies_a_running_sqlite_store_and_points_postgresql_to_pg_dump(
    store_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIDX_STORE__URL", store_url)
    store = Store(store_url)  # stays open, as a running aidx serve would hold it
    with store.engine.begin() as conn:
        conn.execute(events.insert().values(study_uid="1.2.3", event="received", at=1.0))
    code = main(["--data-dir", str(tmp_path), "db", "backup", "--to", str(tmp_path / "saved")])
    out, err = capsys.readouterr()
    if store_url.startswith("sqlite"):
        assert code == 0
        (copy,) = (tmp_path / "saved").glob(f"aidx.db.v{LATEST}-*.bak")
        assert str(copy) in out
        with sqlite3.connect(copy) as conn:
            assert conn.execute("SELECT study_uid FROM events").fetchall() == [("1.2.3",)]
            assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (LATEST,)
    else:
        assert code == 2 and "pg_dump" in err
    store.close()
