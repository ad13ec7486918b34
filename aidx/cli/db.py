"""`aidx db status` and `aidx db upgrade`: the store's schema version (aidx.store.migrations).

The store and SQLAlchemy are imported when a command runs, not for every `aidx` process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from aidx.config import AidxConfig


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="the store's schema version: show it, upgrade it")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser(
        "status", help="the database's schema version and the upgrades it lacks"
    ).set_defaults(handler=db_status)
    up = db_sub.add_parser(
        "upgrade",
        help="apply the missing upgrades (stop aidx serve/worker/ui first; backs up SQLite)",
    )
    up.add_argument(
        "--backup-dir", type=Path, help="where the SQLite backup goes (default: beside the file)"
    )
    up.set_defaults(handler=db_upgrade)
    save = db_sub.add_parser(
        "backup", help="a consistent copy of an SQLite store, also while aidx runs"
    )
    save.add_argument("--to", type=Path, help="folder for the copy (default: beside the file)")
    save.set_defaults(handler=db_backup)


def _engine(config: AidxConfig) -> tuple[Engine | None, str]:
    from aidx.store.store import create_store_engine

    url = config.store_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None, url
    return create_store_engine(url), url


def db_status(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.migrations import state
    from aidx.store.store import safe_url

    del args
    engine, url = _engine(config)
    if engine is None:
        print(f"no database at {safe_url(url)} yet: aidx serve creates it (schema version latest)")
        return EXIT_OK
    try:
        with engine.connect() as conn:
            st = state(conn)
    except SQLAlchemyError as exc:
        print(f"aidx db status: cannot read {safe_url(url)}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    where = safe_url(url)
    if st.version is None:
        print(f"{where}: empty (no aidx tables); aidx creates schema version {st.latest}")
    elif st.version > st.latest:
        print(
            f"{where}: schema version {st.version}, newer than this aidx's {st.latest}: "
            "run the newer aidx, or restore the backup made before its upgrade"
        )
        return EXIT_FAILED
    elif st.pending:
        print(f"{where}: schema version {st.version}; this aidx needs {st.latest}. Upgrades:")
        for step in st.pending:
            print(f"  {step.version}: {step.description}")
        print("stop every aidx process using it, then run: aidx db upgrade")
        return EXIT_FAILED
    else:
        print(f"{where}: schema version {st.version} (up to date)")
    return EXIT_OK


def db_upgrade(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.migrations import SchemaVersionError, upgrade
    from aidx.store.store import safe_url

    engine, url = _engine(config)
    if engine is None:
        print(f"no database at {safe_url(url)}: nothing to upgrade (aidx serve creates one)")
        return EXIT_OK
    try:
        before, applied, backup = upgrade(engine, args.backup_dir)
    except SchemaVersionError as exc:
        print(f"aidx db upgrade: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SQLAlchemyError, OSError) as exc:
        print(
            f"aidx db upgrade: failed, the database is unchanged (one transaction): {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        engine.dispose()
    where = safe_url(url)
    if not applied:
        print(f"{where}: schema version {before.latest}, nothing to upgrade")
        return EXIT_OK
    if backup is not None:
        print(f"backup of version {before.version}: {backup}")
    else:
        print("no backup made: a PostgreSQL store is backed up with pg_dump before upgrading")
    for step in applied:
        print(f"upgraded to {step.version}: {step.description}")
    print(f"{where}: schema version {applied[-1].version}")
    return EXIT_OK


def db_backup(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.migrations import SchemaVersionError, backup
    from aidx.store.store import safe_url

    engine, url = _engine(config)
    if engine is None:
        print(f"aidx db backup: no database at {safe_url(url)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = backup(engine, args.to)
    except SchemaVersionError as exc:
        print(f"aidx db backup: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SQLAlchemyError, OSError) as exc:
        print(f"aidx db backup: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    print(f"backup of {safe_url(url)}: {target} ({target.stat().st_size} bytes)")
    return EXIT_OK
