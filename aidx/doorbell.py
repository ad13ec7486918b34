"""Wake-ups between the processes of one host: "a study is complete", "results are ready".

`aidx serve` runs the DICOM node, the workers and the review app as separate processes
(``aidx.supervisor``). The store is the source of truth and every waiter also polls it
(``pipeline.poll_interval_s``); a doorbell only saves the wait: the node rings ``jobs`` when it
queues a job, a worker rings ``results`` when a result is ready to send.

Each waiting process binds a Unix datagram socket ``<data_dir>/run/<kind>.<pid>.sock``;
:func:`ring` sends one byte to every socket of that kind. A bell that cannot be rung (no
listener, a stale socket, a path too long for a Unix socket) is skipped silently: the poll
catches up. Nothing but a byte is ever sent; the sockets are the owner's only (0600).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("aidx.doorbell")

JOBS = "jobs"  # a job was queued: workers look now
RESULTS = "results"  # results were written: the outbox sends now
_MAX_PATH = 100  # bytes; sun_path holds 108 on Linux, keep a margin


def run_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "run"


def ring(data_dir: Path, kind: str) -> int:
    """Ring every listener of ``kind`` on this host; the number that were rung."""
    folder = run_dir(data_dir)
    rung = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for path in folder.glob(f"{kind}.*.sock"):
            try:
                sender.sendto(b"!", str(path))
                rung += 1
            except (ConnectionRefusedError, FileNotFoundError):
                _remove_stale(path)
            except OSError:  # its queue is full: it is awake already
                continue
    return rung


def _remove_stale(path: Path) -> None:
    """A socket whose process is gone (killed before it could remove it)."""
    try:
        pid = int(path.name.split(".")[1])
    except (IndexError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            path.unlink()
    except PermissionError:  # someone else's process: leave it
        return


class Doorbell:
    """Calls ``on_ring`` (in a thread of its own) whenever someone rings ``kind``."""

    def __init__(self, data_dir: Path, kind: str, on_ring: Callable[[], None]) -> None:
        self.path = run_dir(data_dir) / f"{kind}.{os.getpid()}.sock"
        self._on_ring = on_ring
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> bool:
        """Listen; False (polling only) when the socket cannot be made."""
        if len(os.fsencode(self.path)) > _MAX_PATH:
            log.debug("doorbell %s: path too long for a Unix socket; polling only", self.path)
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(1.0)  # how long stop() may wait for the listener
            sock.bind(str(self.path))
            self.path.chmod(0o600)
        except OSError as exc:
            log.debug("doorbell %s: %s; polling only", self.path, exc)
            return False
        self._socket = sock
        self._thread = threading.Thread(target=self._listen, name="aidx-doorbell", daemon=True)
        self._thread.start()
        return True

    def _listen(self) -> None:
        sock = self._socket
        assert sock is not None
        while not self._stop.is_set():
            try:
                sock.recv(16)
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self._on_ring()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        with contextlib.suppress(OSError):
            self.path.unlink()
