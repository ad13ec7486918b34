"""The backup manifest: every file of a backup with its size, modification time and SHA-256.

A backup folder holds ``manifest.json`` and one folder per part, the manifest's keys being the
files' paths in the backup (POSIX, relative to the backup folder):

- ``store/aidx.db`` (an SQLite copy) or ``store/aidx.pgdump`` (``pg_dump -Fc``);
- ``storage/<path under the storage root>``: the images, results and signed reports the store
  copy lists;
- ``external/<absolute path>``: files the store lists outside the storage root (files queued by
  ``aidx send --queue``, rows of an older aidx);
- ``models/``: the model registry; ``config/``: the configuration file and TLS certificates;
- ``secrets/``: aidx's keys (``keys/``: the de-identified export's UID key; the feedback HMAC
  key) and the TLS private keys, only with ``--include-secrets``.

The size and modification time of each file's source let the next backup into the same folder
skip the files that did not change (incremental), and the SHA-256 lets ``aidx restore`` and
``aidx verify --deep`` find a changed byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aidx import __version__

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1 << 20


class BackupError(ValueError):
    """A backup or restore cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    mtime_ns: int = 0  # of the source when it was copied (the incremental check)


@dataclass
class Manifest:
    created_at: float
    data_dir: str  # where the backup was made from
    storage_root: str
    models_dir: str
    store_kind: str  # "sqlite" or "postgresql"
    store_file: str  # the store copy, a key of files
    schema_version: int | None
    files: dict[str, FileEntry] = field(default_factory=dict)
    # Files the store copy lists that were gone when they were to be copied.
    missing: list[str] = field(default_factory=list)
    secrets_included: bool = False
    secrets_left_out: list[str] = field(default_factory=list)  # their sources, for the report
    aidx_version: str = __version__
    format: int = FORMAT

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        return json.dumps(data, indent=1)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of the backup in ``folder``."""
        return cls.read_file(folder / MANIFEST)

    @classmethod
    def read_file(cls, path: Path) -> Manifest:
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BackupError(
                f"{path.parent} holds no backup ({path.name} is missing): give the folder that "
                "`aidx backup --to` wrote"
            ) from None
        except (OSError, ValueError) as exc:
            raise BackupError(f"{path} cannot be read ({exc}): the backup is damaged") from exc
        if data.get("format") != FORMAT:
            raise BackupError(
                f"{path} is a backup of format {data.get('format')!r}; this aidx reads format "
                f"{FORMAT} (written by aidx {data.get('aidx_version', '?')})"
            )
        files = {k: FileEntry(**v) for k, v in data.pop("files").items()}
        return cls(**data, files=files)

    def write(self, folder: Path) -> Path:
        """Write the manifest last and atomically: a backup interrupted before it keeps the
        previous manifest."""
        path = folder / MANIFEST
        partial = folder / f".{MANIFEST}.partial"
        with partial.open("w", encoding="utf-8") as out:
            out.write(self.to_json())
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
        return path


def new_manifest(**values: Any) -> Manifest:
    return Manifest(created_at=time.time(), **values)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashed(source: Path, target: Path, mode: int | None = None) -> FileEntry:
    """Copy ``source`` to ``target`` (through a temporary name, so a target is never half
    written), hashing on the way; the entry has the source's size and modification time as
    read before the copy."""
    st = source.stat()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.sha256()
    size = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with source.open("rb") as src, os.fdopen(os.open(partial, flags, mode or 0o640), "wb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(target)
    return FileEntry(size=size, sha256=digest.hexdigest(), mtime_ns=st.st_mtime_ns)


def unchanged(source: Path, target: Path, previous: FileEntry | None) -> bool:
    """Whether the previous backup's copy of ``source`` still holds it: the source has the
    size and modification time it had then, and the copy is there with that size."""
    if previous is None:
        return False
    try:
        st, copy = source.stat(), target.stat()
    except OSError:
        return False
    return st.st_size == previous.size == copy.st_size and st.st_mtime_ns == previous.mtime_ns
