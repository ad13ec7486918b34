"""`aidx serve` as a supervisor of separate processes: the DICOM node (with the metrics
endpoint), the outbox, the inference workers and the review app, so that none slows another
through the interpreter lock (a C-STORE is not queued behind a Gradio request or a model's
Python post-processing).

- Each child runs ``aidx ... <command>`` with the same configuration (the supervisor passes
  ``--config`` and ``--data-dir`` as it resolved them; the environment is inherited). On Linux
  it is a fork of the supervisor, which has loaded the modules the children share first
  (:func:`preload`, with the list ``aidx serve`` gives): a child starts in a fraction of a
  second instead of spending two CPU-seconds on imports, and so does every restart. Each fork
  names itself (``aidx-node``, ``aidx-workers``: the name ``top`` and ``ps -o comm`` show)
  and closes every file descriptor but its standard streams, as a new process would.
  Elsewhere a child is ``python -m aidx ... <command>``.
- A child that exits while the supervisor runs is logged with its exit status and started
  again after a back-off (1 s, doubling to 30 s; reset once it has run for a minute).
- SIGTERM or Ctrl-C stops the children with SIGTERM (they finish what they can: the node
  stops accepting, workers leave their job for the next start), waits up to
  :data:`STOP_GRACE_S`, then kills what is left. Children ignore SIGINT, so a Ctrl-C in the
  terminal reaches only the supervisor and nothing prints a traceback.
- Killed itself (SIGKILL, a crash), the supervisor takes its children with it: each child arms
  the kernel's parent-death signal (SIGKILL) as it starts (:func:`as_supervised_child`), so a
  restarted ``aidx serve`` finds its ports free and no orphan keeps working on the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("aidx.supervisor")

STOP_GRACE_S = 10.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child up this long gets its back-off reset
# Set in every child to the supervisor's pid (not AIDX_*: those are configuration).
SUPERVISED_ENV = "_AIDX_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


@dataclass
class ChildSpec:
    """A process to keep running: a name for the log and its ``aidx`` arguments."""

    name: str
    args: list[str]
    # Added to the supervisor's niceness as the child starts (before its imports): inference and
    # the review app yield the CPU to the DICOM node, whose peer waits on a timeout.
    nice: int = 0


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | _Forked | None = None
    started: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float = 0.0
    restarts: int = field(default=0)


def as_supervised_child() -> None:
    """Called first thing by ``aidx`` when :data:`SUPERVISED_ENV` names the supervisor's pid:
    die with it (Linux parent-death signal, SIGKILL), exit at once if it is already gone, and
    leave Ctrl-C to it (the supervisor stops the children with SIGTERM)."""
    value = os.environ.get(SUPERVISED_ENV)
    if not value:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's stop() still ends us
        pass
    if value.isdigit() and os.getppid() != int(value):
        os._exit(0)  # the supervisor died before the death signal was armed
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def lower_priority(nice: int, pid: int = 0) -> None:
    """Make ``pid`` at least ``nice`` nicer than this process (``pid`` 0: make this process at
    least ``nice`` nice). Never lowers a niceness (that needs privileges). Linux applies it to
    the main thread; threads started later inherit it."""
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        current = os.getpriority(os.PRIO_PROCESS, pid) if pid else own
        target = min(own + nice if pid else nice, 19)
        if target > current:
            os.setpriority(os.PRIO_PROCESS, pid, target)
    except (OSError, AttributeError) as exc:  # a process gone already, or not POSIX
        log.debug("cannot set the niceness of pid %d: %s", pid, exc)


def preload(modules: Sequence[str]) -> None:
    """Import ``modules`` here, so that the children forked afterwards start with them."""
    for name in modules:
        importlib.import_module(name)


class _Forked:
    """A child started by :func:`os.fork`, with the part of :class:`subprocess.Popen` the
    supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str]) -> _Forked:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # else the child would write the supervisor's buffered output again
        pid = os.fork()
        if pid:
            return cls(pid)
        code = 1
        try:
            _become_child(name, env)
            # What `python -m aidx ARGS` runs (aidx/__main__.py ends in SystemExit).
            sys.argv = ["aidx", *argv]
            runpy.run_module("aidx", run_name="__main__", alter_sys=False)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported, then this process ends
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)  # never the supervisor's atexit handlers or finally blocks

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            # As Popen.wait with a timeout: waitpid cannot wait with one.
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _become_child(name: str, env: dict[str, str]) -> None:
    """In a fresh fork: what a new ``python -m aidx`` child would be (its own session, the
    default signal handlers, no file descriptors of the supervisor's but the standard
    streams), named ``aidx-<name>`` for ``top``."""
    os.setsid()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # reached only where there is os.fork
    os.environ.update(env)
    title = f"aidx-{name.replace(' ', '-')}"[:15].encode()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(title), 0, 0, 0)


class Supervisor:
    """Starts the children, restarts those that exit, stops them all on :meth:`stop`."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        base_args: Sequence[str],
        env: dict[str, str] | None = None,
        state_path: Path | None = None,
        fork: bool = True,
    ) -> None:
        """``state_path``: a JSON file kept up to date with each child's pid and restarts (read
        by the node's ``/healthz``, :func:`children_alive`); removed at :meth:`shutdown`.
        ``fork``: start the children as forks of this process (where there is ``os.fork``),
        else as new interpreters."""
        self._children = [_Child(spec) for spec in children]
        self._args = list(base_args)
        self._fork = fork and hasattr(os, "fork")
        self._env = env or {}
        self._stop = threading.Event()
        self.state_path = state_path

    def _start(self, child: _Child) -> None:
        env = {**self._env, SUPERVISED_ENV: str(os.getpid())}
        if self._fork:
            child.process = _Forked.start(child.spec.name, [*self._args, *child.spec.args], env)
        else:
            command = [sys.executable, "-m", "aidx", *self._args, *child.spec.args]
            # Its own session: a Ctrl-C in the terminal reaches only the supervisor.
            child.process = subprocess.Popen(
                command, env={**os.environ, **env}, start_new_session=True
            )
        child.started = time.monotonic()
        if child.spec.nice:
            lower_priority(child.spec.nice, child.process.pid)
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)
        self._write_state()

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        children = {
            c.spec.name: {"pid": c.process.pid, "restarts": c.restarts, "started": c.started}
            for c in self._children
            if c.process is not None
        }
        state = {"pid": os.getpid(), "children": children}
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}")
            temp.write_text(json.dumps(state))
            temp.replace(self.state_path)
        except OSError as exc:  # health reports the children as unknown; serving goes on
            log.warning("cannot write %s: %s", self.state_path, exc)

    def start(self) -> None:
        for child in self._children:
            self._start(child)

    def exited(self) -> tuple[str, int] | None:
        """The first child found to have exited (name, status), None while all run."""
        for child in self._children:
            status = None if child.process is None else child.process.poll()
            if status is not None:
                return child.spec.name, status
        return None

    def stopping(self) -> bool:
        return self._stop.is_set()

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.process.pid for c in self._children if c.process is not None}

    def run(self) -> None:
        """Watch the children until :meth:`stop` is called (from a signal handler)."""
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for child in self._children:
                process = child.process
                if process is not None and process.poll() is not None:
                    ran = now - child.started
                    if ran >= HEALTHY_AFTER_S:
                        child.backoff_s = BACKOFF_FIRST_S
                    log.error(
                        "%s (pid %d) exited with status %s after %.0f s; starting it again "
                        "in %.0f s",
                        child.spec.name,
                        process.pid,
                        process.returncode,
                        ran,
                        child.backoff_s,
                    )
                    child.process = None
                    child.restart_at = now + child.backoff_s
                    child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
                if child.process is None and now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        self._stop.set()

    def shutdown(self) -> list[tuple[str, int | None]]:
        """SIGTERM every child, wait up to :data:`STOP_GRACE_S`, SIGKILL the rest; each child's
        name and exit status."""
        running = [c for c in self._children if c.process is not None]
        for child in running:
            assert child.process is not None
            if child.process.poll() is None:
                child.process.terminate()
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
        deadline = time.monotonic() + STOP_GRACE_S
        statuses = []
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", child.spec.name, STOP_GRACE_S)
                child.process.kill()
                child.process.wait()
            statuses.append((child.spec.name, child.process.returncode))
        return statuses


def children_alive(state_path: Path, names: Sequence[str]) -> dict[str, bool]:
    """Whether each named child of the supervisor that wrote ``state_path`` runs: its pid is a
    live process whose parent is that supervisor (a pid taken again by another program is not
    it). A child being restarted, or a state file that cannot be read, is not alive."""
    try:
        state = json.loads(state_path.read_text())
        supervisor = int(state["pid"])
        pids = {str(name): int(child["pid"]) for name, child in state["children"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return dict.fromkeys(names, False)
    return {name: name in pids and _child_of(pids[name], supervisor) for name in names}


def _child_of(pid: int, parent: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    state, ppid = fields[0], int(fields[1])
    return state not in ("Z", "X") and ppid == parent
