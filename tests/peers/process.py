"""Processes, ports and polling for the DICOM test peers, and the errors they raise.

Tool lookup (`tool`, with the Debian package to install), the peer environment (``TCP_NODELAY=1``),
free loopback ports, bounded polls for a condition, a TCP port or an HTTP URL, starting and
stopping process groups, resident memory of a process tree, and `_Server`, the base of every
peer that is a server process with a log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 10.0

Modality = tuple[str, str, int]
"""An Orthanc DicomModalities entry: (AE title, host, port)."""


class PeerError(RuntimeError):
    """A DICOM peer could not be started, did not answer, or failed a request."""


class ToolMissingError(PeerError):
    """An external program is not installed."""


def tool(path: str, package: str) -> str:
    """Return ``path`` if it is an executable, else raise naming the Debian package to install."""
    if os.access(path, os.X_OK):
        return path
    raise ToolMissingError(
        f"{path} not found: install the Debian package '{package}'"
        f" (sudo apt-get install {package}, or `make system-deps` as root)"
    )


def peer_env() -> dict[str, str]:
    """The environment for DCMTK tools and Orthanc: ours plus ``TCP_NODELAY=1``."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages ("" if there is none)."""
    if path is None or not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _failure(message: str, log_path: Path | None) -> PeerError:
    tail = log_tail(log_path)
    where = f"\n--- last lines of {log_path} ---\n{tail}" if tail else ""
    return PeerError(message + where)


def poll_until(
    condition: Callable[[], bool],
    deadline_s: float,
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    interval_s: float = POLL_INTERVAL_S,
) -> None:
    """Call ``condition`` every few milliseconds (``interval_s``: longer for a condition that
    runs a command, which costs a CPU-second) until it is true, for at most ``deadline_s``.

    Fails early if ``process`` exits meanwhile (a peer that died will never become ready), and
    puts the log tail into the error either way.
    """
    end = time.monotonic() + deadline_s
    while True:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise _failure(
                f"{what}: the process exited with code {process.returncode} before it was ready",
                log_path,
            )
        if time.monotonic() >= end:
            raise _failure(f"{what}: not ready after {deadline_s:.0f} s", log_path)
        time.sleep(interval_s)


def port_open(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    deadline_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait at most ``deadline_s`` seconds until host:port accepts TCP connections."""
    poll_until(
        lambda: port_open(host, port),
        deadline_s,
        f"waiting for {host}:{port}",
        process=process,
        log_path=log_path,
    )


def http_ready(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 right now."""
    try:
        with _OPENER.open(url, timeout=2.0) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_http(
    url: str,
    deadline_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait at most ``deadline_s`` seconds until a GET of ``url`` answers 200 (REST readiness)."""
    poll_until(
        lambda: http_ready(url),
        deadline_s,
        f"waiting for {url}",
        process=process,
        log_path=log_path,
    )


# Loopback only: never route our requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group ``process`` leads, wait, SIGKILL it if it does not exit."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout_s)
    # Children of a forking server (storescp --fork) may outlive the leader: end them too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def start_process(command: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group with ``TCP_NODELAY=1``, output to ``log_path``.

    Its own group, so that `stop_process` can end it with any children it forks.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=peer_env(),
            start_new_session=True,
        )


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS from /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status")
    try:
        text = status.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError as exc:
        raise PeerError(f"process {pid} is gone: cannot read its memory use") from exc
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise PeerError(f"{status} has no VmRSS line (a zombie or a kernel thread?)")


def descendants(pid: int) -> list[int]:
    """Process ids of all children of ``pid``, recursively (from /proc/PID/task/*/children)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in children.read_text(encoding="ascii").split():
                    found.append(int(child))
                    stack.append(int(child))
    return found


def rss_tree_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants in KiB (shared pages count twice)."""
    total = rss_kib(pid)
    for child in descendants(pid):
        with contextlib.suppress(PeerError):
            total += rss_kib(child)
    return total


# --- Servers -------------------------------------------------------------------------------------


class _Server:
    """A server process with a log file, stopped on context exit."""

    name = "server"

    def __init__(self, log_path: Path) -> None:
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise PeerError(f"{self.name} is not running: call start() or use it in a with block")
        return self._process

    def _launch(self, command: Sequence[str]) -> subprocess.Popen[bytes]:
        if self._process is not None:
            raise PeerError(f"{self.name} is already running (pid {self._process.pid})")
        self._process = start_process(command, self._log_path)
        return self._process

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after a timeout); safe to call twice."""
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
