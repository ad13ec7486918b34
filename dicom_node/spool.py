"""Durable storage of received files, exactly as received.

A file is written to ``.incoming/<host>/`` under a unique temporary name that carries the
writing process's pid, flushed to disk (fsync), then renamed into ``<study>/<series>/<sop>.dcm``
and the folder is flushed too. A crash leaves either no file or a complete one; temporary
leftovers are removed at start-up. The spool may be shared by several nodes (storage.root on a
shared mount, issue 19), so a node removes only leftovers of its own host whose writer is no
longer alive, never a file another node is writing. Nothing is decoded here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
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
        self.incoming = root / ".incoming" / _host_folder()
        self.min_free_bytes = min_free_bytes
        self.incoming.mkdir(parents=True, exist_ok=True)

    def remove_partial_files(self) -> int:
        """Delete temporary files left by an interrupted write on this host (their writer is
        gone; files of live writers, e.g. another node on this host, stay); returns how many.
        Also the flat ``.incoming/*.part`` of earlier versions, which one node used alone."""
        removed = 0
        legacy = self.incoming.parent.glob("*.part")
        for leftover in [*legacy, *self.incoming.glob("*.part")]:
            if leftover.parent == self.incoming and _writer_alive(leftover.name):
                continue
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
        temp = self.incoming / f"{sop_uid}.{os.getpid()}.{uuid.uuid4().hex}.part"
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


def _host_folder() -> str:
    """This host's folder under ``.incoming`` (its name, made safe for a path)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _writer_alive(name: str) -> bool:
    """Whether the process that named a temporary file ``<sop>.<pid>.<hex>.part`` still runs
    on this host."""
    parts = name.split(".")
    try:
        pid = int(parts[-3])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # this process starts now: nothing of its own is being written yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
