"""``aidx restore DIR --data-dir NEW``: a backup (:mod:`aidx.store.protect.backup`) laid out
as a new data folder that ``aidx --data-dir NEW serve`` runs from.

Every file is checked against the manifest (size and SHA-256) as it is copied; a damaged or
missing one stops the restore with its name. NEW gets the default layout: ``aidx.db`` (or, for
a PostgreSQL backup, ``pg_restore`` into the empty database ``--store-url`` names), the storage
root's ``spool/``, ``results/`` and ``signed/``, ``external/`` (files the store listed outside
the root), ``models/``, ``config/`` (the configuration and certificates, for reference) and,
when the backup has them, aidx's keys (``keys/``, ``feedback.key``) and the TLS private keys
(``secrets/tls/``), files 0600 in 0700 folders. The backup's
manifest is kept as ``NEW/backup-manifest.json``: ``aidx verify --deep`` checks the files
against its hashes.

The restored store records paths relative to NEW: rows an older aidx wrote with absolute paths
under the old root become relative, and files outside it point into ``external/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, select, update
from sqlalchemy.engine import Engine

from aidx.keys import KEY_FILE_MODE, KEYS_DIR, KEYS_DIR_MODE, LOOSE_KEYS
from aidx.permissions import STORE_FILE_MODE
from aidx.store.paths import root_prefix
from aidx.store.protect.backup import pg_target
from aidx.store.protect.manifest import BackupError, Manifest, copy_hashed
from aidx.store.schema import instances, jobs, outbox, results, reviews
from aidx.store.store import create_store_engine, safe_url

RESTORED_MANIFEST = "backup-manifest.json"
SECRET_MODE, SECRET_DIR_MODE = KEY_FILE_MODE, KEYS_DIR_MODE


@dataclass(frozen=True)
class RestoreReport:
    data_dir: Path
    files: int
    bytes: int
    rewritten: int  # store rows whose paths were made relative
    store: str


def restored_path(key: str) -> str | None:
    """Where backup file ``key`` goes, relative to the new data folder (None: the store)."""
    part, _, rest = key.partition("/")
    if part == "store":
        return None
    if part == "storage":
        return rest
    if part == "secrets":
        # aidx's keys where aidx keeps them; TLS private keys apart, for the operator to place.
        return rest if rest in LOOSE_KEYS or rest.startswith(KEYS_DIR + "/") else key
    return key  # external/, models/, config/


def restore(backup_dir: Path, data_dir: Path, store_url: str | None = None) -> RestoreReport:
    """Restore ``backup_dir`` into the new folder ``data_dir``. Raises BackupError."""
    manifest = Manifest.read(backup_dir)
    data_dir = data_dir.resolve()
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(
            f"{data_dir} exists and is not empty: restore into a new folder (nothing there was "
            "changed)"
        )
    if manifest.store_kind == "postgresql" and not store_url:
        raise BackupError(
            "this backup holds a PostgreSQL store: give --store-url postgresql://… of a new, "
            "empty database to restore it into"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    damaged: list[str] = []
    total = 0
    for key, entry in sorted(manifest.files.items()):
        source = backup_dir / key
        where = restored_path(key)
        target = data_dir / (where or f".restore-{Path(key).name}")
        secret = key.startswith("secrets/")
        mode = SECRET_MODE if secret else STORE_FILE_MODE if where is None else None
        try:
            copied = copy_hashed(source, target, mode)
        except FileNotFoundError:
            damaged.append(f"{key}: missing from the backup")
            continue
        if (copied.size, copied.sha256) != (entry.size, entry.sha256):
            damaged.append(f"{key}: its size or SHA-256 differs from the manifest's")
        total += copied.size
    for secrets in (data_dir / "secrets", data_dir / "secrets" / "tls", data_dir / KEYS_DIR):
        if secrets.is_dir():
            secrets.chmod(SECRET_DIR_MODE)
    if damaged:
        listing = "\n  ".join(damaged[:20]) + ("\n  …" if len(damaged) > 20 else "")
        raise BackupError(
            f"the backup in {backup_dir} is damaged ({len(damaged)} files):\n  {listing}\n"
            f"{data_dir} is incomplete: delete it, and restore an earlier backup"
        )
    store_copy = data_dir / f".restore-{Path(manifest.store_file).name}"
    if manifest.store_kind == "sqlite":
        database = data_dir / "aidx.db"
        store_copy.replace(database)
        url = f"sqlite:///{database}"
        engine = create_engine(url)
    else:
        assert store_url is not None
        _pg_restore(store_url, store_copy)
        store_copy.unlink()
        url = store_url
        engine = create_store_engine(store_url)
    try:
        rewritten = relocate_rows(engine, manifest.storage_root)
    finally:
        engine.dispose()
    (data_dir / RESTORED_MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return RestoreReport(data_dir, len(manifest.files), total, rewritten, safe_url(url))


# The path columns of the store, by table (key column first).
_PATH_COLUMNS: tuple[tuple[Table, str, tuple[str, ...]], ...] = (
    (instances, "sop_uid", ("path",)),
    (jobs, "id", ("result_dir",)),
    (results, "id", ("findings_path", "sr_path", "seg_path")),
    (reviews, "id", ("signed_sr_path",)),
)


def relocate_rows(engine: Engine, old_root: str) -> int:
    """Make the absolute paths of a restored store relative to the new root: under the old
    root, the rest; elsewhere, ``external/<absolute path>`` (where the restore put the file).
    Returns how many rows changed. The engine converts nothing (it has no root)."""
    prefix = root_prefix(old_root)

    def moved(value: str) -> str:
        if not value.startswith("/"):
            return value
        if value.startswith(prefix):
            return value[len(prefix) :]
        return "external" + value

    changed = 0
    with engine.begin() as conn:
        for table, key, columns in _PATH_COLUMNS:
            for row in conn.execute(select(table.c[key], *(table.c[c] for c in columns))):
                values: dict[str, Any] = {}
                for column in columns:
                    value = row._mapping[column]
                    if value is not None and moved(value) != value:
                        values[column] = moved(value)
                if values:
                    conn.execute(update(table).where(table.c[key] == row[0]).values(**values))
                    changed += 1
        for item_id, files in conn.execute(select(outbox.c.id, outbox.c.files)):
            paths = json.loads(files)
            relocated = [moved(p) for p in paths]
            if relocated != paths:
                conn.execute(
                    update(outbox).where(outbox.c.id == item_id).values(files=json.dumps(relocated))
                )
                changed += 1
    return changed


def _pg_restore(url: str, dump: Path) -> None:
    pg_restore = shutil.which("pg_restore")
    if pg_restore is None:
        raise BackupError(
            "pg_restore is not installed: install the PostgreSQL client (Debian: postgresql-client)"
        )
    plain, env = pg_target(url)
    done = subprocess.run(
        [pg_restore, "--no-owner", "--exit-on-error", "-d", plain, str(dump)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BackupError(
            f"pg_restore into {safe_url(url)} failed (give a new, empty database): "
            f"{done.stderr.strip()}"
        )
