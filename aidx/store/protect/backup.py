"""``aidx backup --to DIR``: a consistent, verifiable copy of everything aidx needs to run again
(the layout: :mod:`aidx.store.protect.manifest`), made while ``aidx serve`` runs.

Consistency: the store is copied first, in one snapshot (SQLite ``VACUUM INTO``; PostgreSQL
``pg_dump`` on a snapshot exported by the transaction that then lists the files), and the files
copied are those that copy lists. Files written later are simply not in this backup, and every
file the copy lists is (or is reported missing, when it went in the meantime).

Incremental: a backup into a folder that holds an earlier one copies only the files whose size
or modification time changed (the store is copied whole each time); files the new store copy no
longer lists are removed, so the folder is always one backup.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from aidx.config import AidxConfig
from aidx.keys import KEY_FILE_MODE, KEYS_DIR, KEYS_DIR_MODE, LOOSE_KEYS
from aidx.permissions import STORE_FILE_MODE
from aidx.store.migrations import current_version
from aidx.store.paths import root_prefix
from aidx.store.protect.inventory import Inventory, files_in, inventory
from aidx.store.protect.manifest import (
    MANIFEST,
    BackupError,
    FileEntry,
    Manifest,
    copy_hashed,
    new_manifest,
    sha256_of,
    unchanged,
)
from aidx.store.store import create_store_engine, safe_url

log = logging.getLogger("aidx.backup")

PARTS = ("store", "storage", "external", "models", "config", "secrets")
SECRET_MODE, SECRET_DIR_MODE = KEY_FILE_MODE, KEYS_DIR_MODE


@dataclass(frozen=True)
class BackupReport:
    folder: Path
    manifest: Manifest
    copied: int
    copied_bytes: int
    reused: int
    removed: int


def backup_key(recorded: str, prefix: str) -> str:
    """Where a file the store records as ``recorded`` goes in the backup."""
    if not recorded.startswith("/"):
        return "storage/" + recorded
    if prefix and recorded.startswith(prefix):
        return "storage/" + recorded[len(prefix) :]
    return "external" + recorded


def backup(
    config: AidxConfig,
    folder: Path,
    include_secrets: bool = False,
    config_file: Path | None = None,
) -> BackupReport:
    """Back up ``config``'s store, storage root, model registry and configuration into
    ``folder``. Raises BackupError with what to do."""
    folder = folder.resolve()
    for setting, kept in (
        ("data_dir", config.data_dir.resolve()),
        ("storage.root", config.storage_root()),
        ("models.dir", config.models_dir().resolve()),
    ):
        if folder == kept or folder.is_relative_to(kept) or kept.is_relative_to(folder):
            raise BackupError(
                f"the backup folder {folder} overlaps {setting} {kept}: a backup inside what "
                "it backs up is lost with it; give a folder on another disk or host"
            )
    previous = _previous(folder)
    (folder / "store").mkdir(parents=True, exist_ok=True)
    root = config.storage_root()
    prefix = root_prefix(root)
    url = config.store_url()
    files: dict[str, FileEntry] = {}
    if url.startswith("sqlite"):
        store_key, version, listed = _sqlite_copy(url, folder, files)
    elif url.startswith(("postgresql", "postgres")):
        store_key, version, listed = _postgres_dump(url, folder, files)
    else:
        raise BackupError(f"store.url {safe_url(url)}: aidx backs up SQLite and PostgreSQL only")
    manifest = new_manifest(
        data_dir=str(config.data_dir.resolve()),
        storage_root=str(root),
        models_dir=str(config.models_dir().resolve()),
        store_kind="sqlite" if url.startswith("sqlite") else "postgresql",
        store_file=store_key,
        schema_version=version,
        secrets_included=include_secrets,
    )
    manifest.files = files
    sources = dict(_store_sources(listed, root, prefix))
    models = config.models_dir().resolve()
    sources.update({"models/" + p.relative_to(models).as_posix(): p for p in files_in(models)})
    sources.update(_config_sources(config, config_file))
    copier = _Copier(folder, previous, manifest)
    for key, source in sorted(sources.items()):
        copier.copy(key, source)
    for key, source in sorted(_secret_sources(config).items()):
        if include_secrets:
            copier.copy(key, source, SECRET_MODE)
        else:
            manifest.secrets_left_out.append(str(source))
    if include_secrets:
        for secrets in (folder / "secrets", folder / "secrets" / KEYS_DIR):
            if secrets.is_dir():
                secrets.chmod(SECRET_DIR_MODE)
    removed = _prune(folder, manifest)
    manifest.write(folder)
    store_size = manifest.files[store_key].size  # copied whole every time
    return BackupReport(
        folder,
        manifest,
        copier.copied + 1,
        copier.copied_bytes + store_size,
        copier.reused,
        removed,
    )


def _previous(folder: Path) -> Manifest | None:
    """The earlier backup in ``folder`` (incremental), or None for a new or empty folder."""
    if (folder / MANIFEST).is_file():
        return Manifest.read(folder)
    if folder.is_dir() and any(folder.iterdir()):
        raise BackupError(
            f"{folder} is not empty and holds no aidx backup ({MANIFEST}): give an empty or new "
            "folder, or one an earlier `aidx backup` wrote"
        )
    return None


class _Copier:
    def __init__(self, folder: Path, previous: Manifest | None, manifest: Manifest) -> None:
        self.folder, self.previous, self.manifest = folder, previous, manifest
        self.copied = self.copied_bytes = self.reused = 0

    def copy(self, key: str, source: Path, mode: int | None = None) -> None:
        target = self.folder / key
        earlier = self.previous.files.get(key) if self.previous else None
        if unchanged(source, target, earlier):
            assert earlier is not None
            self.manifest.files[key] = earlier
            self.reused += 1
            return
        try:
            entry = copy_hashed(source, target, mode)
        except FileNotFoundError:
            # Listed by the store copy, gone since (a purge, a replaced re-sent instance).
            self.manifest.missing.append(key)
            log.warning("backup: %s is gone since the store was copied; not in the backup", key)
            return
        self.manifest.files[key] = entry
        self.copied += 1
        self.copied_bytes += entry.size


def _sqlite_copy(
    url: str, folder: Path, files: dict[str, FileEntry]
) -> tuple[str, int | None, Inventory]:
    """The SQLite store, copied in one snapshot (``VACUUM INTO``: WAL pages included, while
    aidx writes), and what that copy lists."""
    database = make_url(url).database
    if not database or database == ":memory:" or not Path(database).is_file():
        raise BackupError(
            f"no store at {safe_url(url)}: nothing was received with this data_dir; give the "
            "node's data directory with --data-dir (or data_dir / store.url in the configuration)"
        )
    key = "store/aidx.db"
    partial = folder / "store" / ".aidx.db.snapshot"
    partial.unlink(missing_ok=True)
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM INTO ?", (str(partial),))
    finally:
        engine.dispose()
    copy = create_engine(f"sqlite:///{partial}")
    try:
        with copy.connect() as conn:
            version = current_version(conn)
            listed = inventory(conn)
    finally:
        copy.dispose()
    files[key] = _keep(partial, folder / key)
    return key, version, listed


def _keep(snapshot: Path, target: Path) -> FileEntry:
    """The store's snapshot (it holds the review app's password hashes: mode 0600, as the
    store itself), hashed and put in place."""
    snapshot.chmod(STORE_FILE_MODE)
    st = snapshot.stat()
    entry = FileEntry(size=st.st_size, sha256=sha256_of(snapshot), mtime_ns=st.st_mtime_ns)
    snapshot.replace(target)
    return entry


def _postgres_dump(
    url: str, folder: Path, files: dict[str, FileEntry]
) -> tuple[str, int | None, Inventory]:
    """The PostgreSQL store by ``pg_dump -Fc``, on the snapshot of the transaction that lists
    the files (``pg_export_snapshot``), so the dump and the list agree."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupError(
            "pg_dump is not installed: install the PostgreSQL client (Debian: postgresql-client) "
            "of the server's major version or later"
        )
    key = "store/aidx.pgdump"
    partial = folder / "store" / ".aidx.pgdump.snapshot"
    engine = create_store_engine(url)
    try:
        snapshot_reader = engine.connect().execution_options(isolation_level="REPEATABLE READ")
        with snapshot_reader as conn, conn.begin():
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            _run_pg_dump(pg_dump, url, snapshot, partial)
            version = current_version(conn)
            listed = inventory(conn)  # as recorded: this engine has no root
    finally:
        engine.dispose()
    files[key] = _keep(partial, folder / key)
    return key, version, listed


def pg_target(url: str) -> tuple[str, dict[str, str]]:
    """The URL for PostgreSQL's own tools (libpq, no driver name, no password) and their
    environment, with the password in PGPASSWORD: not on a command line, where ps shows it."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _run_pg_dump(pg_dump: str, url: str, snapshot: str, out: Path) -> None:
    plain, env = pg_target(url)
    done = subprocess.run(
        [pg_dump, "-Fc", "--no-owner", f"--snapshot={snapshot}", "-f", str(out), "-d", plain],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BackupError(f"pg_dump of {safe_url(url)} failed: {done.stderr.strip()}")


def _store_sources(listed: Inventory, root: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """The files the store copy lists, and every file of its result folders."""
    for item in listed.files:
        yield backup_key(item.path, prefix), _source(item.path, root)
    for recorded in listed.result_dirs:
        folder = _source(recorded, root)
        for path in files_in(folder):
            yield backup_key(str(path), prefix), path


def _source(recorded: str, root: Path) -> Path:
    return Path(recorded) if recorded.startswith("/") else root / recorded


def _config_sources(config: AidxConfig, config_file: Path | None) -> dict[str, Path]:
    """The configuration file and the TLS certificates it names (public; the private keys are
    secrets)."""
    sources: dict[str, Path] = {}
    if config_file is not None and config_file.is_file():
        sources["config/" + config_file.name] = config_file.resolve()
    for label, tls in _tls_sections(config):
        for name in ("certificate", "ca_certificates"):
            path = getattr(tls, name, None)
            if path is not None and Path(path).is_file():
                sources[f"config/tls/{label}.{Path(path).name}"] = Path(path).resolve()
    return sources


def _secret_sources(config: AidxConfig) -> dict[str, Path]:
    """aidx's keys (``data_dir/keys/``: the de-identified export's UID key and the rest, and
    the feedback export's HMAC key beside them) and the TLS private keys."""
    sources: dict[str, Path] = {}
    for name in LOOSE_KEYS:
        key = config.data_dir / name
        if key.is_file():
            sources["secrets/" + name] = key.resolve()
    keys = config.data_dir / KEYS_DIR
    if keys.is_dir():
        for key in sorted(p for p in keys.iterdir() if p.is_file()):
            sources[f"secrets/{KEYS_DIR}/{key.name}"] = key.resolve()
    for label, tls in _tls_sections(config):
        path = getattr(tls, "private_key", None)
        if path is not None and Path(path).is_file():
            sources[f"secrets/tls/{label}.{Path(path).name}"] = Path(path).resolve()
    return sources


def _tls_sections(config: AidxConfig) -> list[tuple[str, object]]:
    """Every section that names TLS files (certificate, private_key, ca_certificates)."""
    sections: list[tuple[str, object]] = [("node", config.node.tls), ("ui", config.ui)]
    dicomweb = getattr(config, "dicomweb", None)
    if dicomweb is not None:
        sections.append(("dicomweb", dicomweb))
    for name, destination in config.destinations.items():
        # A DICOM destination's TLS section, or a DICOMweb destination's own CA file.
        sections.append((f"destination-{name}", getattr(destination, "tls", destination)))
    return sections


def _prune(folder: Path, manifest: Manifest) -> int:
    """Remove what an earlier backup into ``folder`` left that this one does not list."""
    removed = 0
    for part in PARTS:
        for path in sorted((folder / part).rglob("*"), reverse=True):
            key = path.relative_to(folder).as_posix()
            if path.is_file() and key not in manifest.files:
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return removed
