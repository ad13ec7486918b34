"""Durable storage of received files, exactly as received.

A file is written to ``.incoming/`` under a unique temporary name, flushed to disk (fsync), then
renamed into ``<study>/<series>/<sop>.dcm`` and the folder is flushed too. A crash leaves either
no file or a complete one; temporary leftovers are removed at start-up. Nothing is decoded here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(value: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (leading zeros tolerated, as many
    modalities write them)."""
    return 0 < len(value) <= 64 and bool(_UID.match(value))


class DiskFloorError(OSError):
    """Writing would take free space below the configured floor."""


class Spool:
    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.min_free_bytes = min_free_bytes
        self.incoming.mkdir(parents=True, exist_ok=True)

    def remove_partial_files(self) -> int:
        """Delete temporary files left by an interrupted write; returns how many."""
        removed = 0
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def store(
        self, study_uid: str, series_uid: str, sop_uid: str, *parts: bytes | memoryview
    ) -> Path:
        """Write ``parts`` (one after another, not joined in memory) durably and return the
        final path; raises DiskFloorError or OSError and then leaves nothing behind."""
        size = sum(len(part) for part in parts)
        if self.free_bytes() - size < self.min_free_bytes:
            raise DiskFloorError(f"free disk space below {self.min_free_bytes} bytes")
        final = self.path_for(study_uid, series_uid, sop_uid)
        temp = self.incoming / f"{sop_uid}.{uuid.uuid4().hex}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = final.parent
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                _fsync_dir(folder.parent)
                _fsync_dir(folder.parent.parent)
            temp.replace(final)
            _fsync_dir(folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        return final

    def files(self) -> Iterator[Path]:
        """Every stored file (not the temporary ones)."""
        yield from self.root.glob("*/*/*.dcm")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
