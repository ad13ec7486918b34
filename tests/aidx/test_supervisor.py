"""`aidx serve` as a supervisor (aidx.supervisor): the node, the workers and the review app
run as processes of their own; a crashed one is started again, Ctrl-C stops them all cleanly,
and killing the supervisor takes them with it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from aidx.supervisor import ChildSpec, Supervisor, children_alive
from tests.peers import LOOPBACK, echoscu, free_port, poll_until, stop_process

AIDX = [sys.executable, "-m", "aidx"]
NODE_AET = "AIDX"


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def children(self) -> dict[str, int]:
        """The children's pids, from the supervisor's "aidx serving" line."""
        found = re.search(r"\(processes: (.*)\)", self.text())
        assert found, self.text()
        pairs = (part.rsplit(" ", 1) for part in found.group(1).split(", "))
        return {name: int(pid) for name, pid in pairs}


def alive(pid: int) -> bool:
    """Whether any thread of the process still runs. A zombie has exited too (reaped by init
    once its parent is gone), but its main thread turns zombie before the others have ended,
    and the process's sockets close only with the last one."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for thread in threads:
        try:
            state = (thread / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # ended meanwhile
        if state not in ("Z", "X"):
            return True
    return False


@contextmanager
def served(tmp_path: Path, *extra: str, ui_port: int | None = None) -> Iterator[Served]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env["AIDX_UI__ENABLED"] = "true" if ui_port else "false"
    log = tmp_path / "serve.log"
    command = [*AIDX, "--data-dir", str(tmp_path / "data"), "serve", "--port", str(port)]
    command += ["--metrics-port", "0", *extra]
    if ui_port:
        command += ["--ui-port", str(ui_port)]
    process = subprocess.Popen(
        command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        poll_until(
            lambda: "aidx serving" in log.read_text(encoding="utf-8", errors="replace"),
            90.0,
            "aidx serve ready",
            process=process,
            log_path=log,
        )
        yield Served(process, log, port)
    finally:
        stop_process(process)


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def healthz(port: int) -> dict[str, bool]:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=10) as answer:
            return dict(json.load(answer)["checks"])
    except urllib.error.HTTPError as exc:  # 503 carries the checks too
        return dict(json.load(exc)["checks"])


def test_the_parts_run_as_processes_and_ctrl_c_stops_them_all_cleanly(tmp_path: Path) -> None:
    ui_port, metrics_port = free_port(), free_port()
    with served(tmp_path, "--metrics-port", str(metrics_port), ui_port=ui_port) as s:
        children = s.children()
        assert set(children) == {"node", "outbox", "workers", "review app"}
        assert s.process.pid not in children.values()
        assert all(alive(pid) for pid in children.values())
        # Forks of the supervisor, each named for `top` and `ps -o comm`.
        names = {
            name: Path(f"/proc/{pid}/comm").read_text().strip() for name, pid in children.items()
        }
        assert names == {
            "node": "aidx-node",
            "outbox": "aidx-outbox",
            "workers": "aidx-workers",
            "review app": "aidx-review-app",
        }
        # The node comes first for the CPU: inference and the review app are niced.
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert niceness(children["node"]) == own
        assert niceness(children["workers"]) == min(own + 10, 19)
        assert niceness(children["review app"]) == min(own + 5, 19)
        assert niceness(children["outbox"]) == min(own + 5, 19)
        # The node's /healthz answers for its siblings too.
        assert healthz(metrics_port) == {
            "store": True,
            "dicom_listener": True,
            "model": True,
            "workers": True,
            "review_app": True,
            "outbox": True,
        }
        assert echoscu(LOOPBACK, s.port, called_aet=NODE_AET).returncode == 0
        with socket.create_connection((LOOPBACK, ui_port), timeout=5):
            pass
        # Ctrl-C in a terminal reaches the supervisor's process group; the children are in
        # sessions of their own, so only the supervisor gets it, and it stops them.
        os.killpg(s.process.pid, signal.SIGINT)
        assert s.process.wait(30) == 0
        poll_until(lambda: not any(alive(pid) for pid in children.values()), 15.0, "children gone")
    text = s.text()
    assert "Traceback" not in text, text[-3000:]
    assert "received signal 2: stopping" in text


def test_a_child_that_dies_is_started_again_and_the_children_die_with_the_supervisor(
    tmp_path: Path,
) -> None:
    with served(tmp_path) as s:
        worker = s.children()["workers"]
        os.kill(worker, signal.SIGKILL)
        poll_until(
            lambda: f"workers (pid {worker}) exited with status -9" in s.text(),
            15.0,
            "the supervisor noticing the dead worker",
            log_path=s.log,
        )
        assert echoscu(LOOPBACK, s.port, called_aet=NODE_AET).returncode == 0
        restarted = re.compile(r"started workers \(pid (\d+)\)")
        poll_until(
            lambda: len(restarted.findall(s.text())) == 2,
            15.0,
            "the worker started again",
            log_path=s.log,
        )
        new = int(restarted.findall(s.text())[-1])
        assert new != worker and alive(new)
        assert s.process.poll() is None
        # Killed itself (a crash), the supervisor takes its children with it.
        children = {**s.children(), "workers": new}
        os.kill(s.process.pid, signal.SIGKILL)
        s.process.wait(10)
        poll_until(
            lambda: not any(alive(pid) for pid in children.values()),
            15.0,
            "children gone with the supervisor",
        )
    # A restart gets the port: nothing of the old serve holds it.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, s.port))


def test_a_part_that_cannot_start_stops_serve_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind((LOOPBACK, port))
        taken.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
        env["AIDX_UI__ENABLED"] = "false"
        done = subprocess.run(
            [*AIDX, "--data-dir", str(tmp_path / "d"), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert "aidx serve: cannot start: node exited with status 2" in done.stderr
    assert str(port) in done.stderr  # the node's own message names the port
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--single-process"])
def test_single_process_serves_as_before(tmp_path: Path, flag: str) -> None:
    with served(tmp_path, flag) as s:
        assert echoscu(LOOPBACK, s.port, called_aet=NODE_AET).returncode == 0
        assert "processes:" not in s.text()


def test_health_knows_a_child_by_its_pid_and_its_parent(tmp_path: Path) -> None:
    state = tmp_path / "supervisor.json"
    assert children_alive(state, ["workers"]) == {"workers": False}  # no supervisor
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        children = {"workers": {"pid": child.pid}, "review app": {"pid": 1}}
        state.write_text(json.dumps({"pid": os.getpid(), "children": children}))
        # pid 1 is not this supervisor's child: a pid taken again by another program.
        assert children_alive(state, ["workers", "review app", "outbox"]) == {
            "workers": True,
            "review app": False,
            "outbox": False,
        }
        child.kill()
        child.wait()
        assert children_alive(state, ["workers"]) == {"workers": False}
        state.write_text("{not json")
        assert children_alive(state, ["workers"]) == {"workers": False}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "new-interpreter"])
def test_a_child_runs_the_aidx_command_line_and_its_exit_status_is_reported(
    tmp_path: Path, fork: bool
) -> None:
    """Forked (Linux) or a new ``python -m aidx`` (elsewhere): the child's arguments reach the
    command line, and its exit status comes back (2: a usage error)."""
    for args, status in ((["--help"], 0), (["no-such-command"], 2)):
        base = ["--data-dir", str(tmp_path)]
        supervisor = Supervisor([ChildSpec("child", args)], base, fork=fork)
        supervisor.start()
        try:
            poll_until(lambda s=supervisor: s.exited() is not None, 60.0, f"aidx {args[0]}")
            assert supervisor.exited() == ("child", status)
        finally:
            supervisor.shutdown()
