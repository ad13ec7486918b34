"""Wake-ups between aidx's processes (aidx.doorbell): a ring reaches every listener of its kind,
and nothing breaks when nobody listens or a listener died."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from aidx.doorbell import JOBS, RESULTS, Doorbell, ring, run_dir


def test_a_ring_wakes_every_listener_of_its_kind_and_no_other(tmp_path: Path) -> None:
    woken = {JOBS: threading.Event(), RESULTS: threading.Event()}
    bells = [Doorbell(tmp_path, kind, woken[kind].set) for kind in (JOBS, RESULTS)]
    assert all(bell.start() for bell in bells)
    try:
        assert oct(bells[0].path.stat().st_mode & 0o777) == "0o600"
        assert ring(tmp_path, JOBS) == 1
        assert woken[JOBS].wait(5.0)
        assert not woken[RESULTS].is_set()
    finally:
        for bell in bells:
            bell.stop()
    assert not list(run_dir(tmp_path).glob("*.sock"))  # each removes its socket


def test_ringing_with_no_listener_or_a_dead_one_is_harmless(tmp_path: Path) -> None:
    assert ring(tmp_path / "nowhere", JOBS) == 0
    # A socket left by a process that was killed (no listener behind it): removed on the way.
    folder = run_dir(tmp_path)
    folder.mkdir()
    dead = folder / f"{JOBS}.{_dead_pid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(dead))
    assert ring(tmp_path, JOBS) == 0
    assert not dead.exists()


def test_a_path_too_long_for_a_unix_socket_falls_back_to_polling(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    bell = Doorbell(deep, JOBS, lambda: None)
    assert bell.start() is False
    bell.stop()


def _dead_pid() -> int:
    """A process id that no process has: a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
