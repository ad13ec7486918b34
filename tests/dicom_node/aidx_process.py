"""The ``aidx`` command run as a user runs it: separate processes sharing one configuration file
and one data folder (``aidx serve`` in the background, ``send``/``outbox``/``echo`` beside it).

Every wait is a bounded poll; a failure carries the serving process's log tail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aidx.config import AidxConfig, load_config
from tests.peers import LOOPBACK, PeerError, free_port, poll_until, stop_process, wait_for_port

AIDX = (sys.executable, "-m", "aidx")
COMMAND_POLL_S = 0.5
# "   1  PACS             pending      2     12  next 10:01:02  association to ... unreachable"
_OUTBOX_ROW = re.compile(
    r"^\s*(\d+)\s+(\S+)\s+(pending|sending|sent|failed)\s+(\d+)\s+(\d+)(?:\s+(.*))?$"
)


def destination(ae_title: str, port: int) -> dict[str, Any]:
    """A ``destinations`` entry for a peer on loopback."""
    return {"ae_title": ae_title, "host": LOOPBACK, "port": port}


def aidx_env() -> dict[str, str]:
    """Our environment without ``AIDX_*`` variables, which would override the test's file, and
    without the review app (the UI tests start it themselves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env["AIDX_UI__ENABLED"] = "false"
    return env


@dataclass(frozen=True)
class OutboxRow:
    """One line of ``aidx outbox list``."""

    id: int
    destination: str
    state: str
    tries: int
    files: int
    detail: str  # "next HH:MM:SS" for pending items, then the last error if there is one


def parse_outbox(stdout: str) -> list[OutboxRow]:
    rows = []
    for line in stdout.splitlines()[1:]:  # the first line is the header
        match = _OUTBOX_ROW.match(line)
        if match is None:
            raise AssertionError(f"unexpected line in `aidx outbox list`: {line!r}\n{stdout}")
        item, dest, state, tries, files, detail = match.groups()
        rows.append(OutboxRow(int(item), dest, state, int(tries), int(files), detail or ""))
    return rows


@dataclass(frozen=True)
class AidxSetup:
    """A configuration file and a data folder, used by every ``aidx`` process of a test."""

    config_path: Path
    data_dir: Path
    node_port: int

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        destinations: Mapping[str, Mapping[str, Any]] | None = None,
        outbox: Mapping[str, Any] | None = None,
    ) -> AidxSetup:
        node_port = free_port()
        config = {
            "node": {
                "port": node_port,
                "min_free_disk_mb": 0,
                "study_quiet_period_s": 0.5,
            },
            "destinations": {k: dict(v) for k, v in (destinations or {}).items()},
            "outbox": dict(outbox or {}),
            # Node tests run no inference workers (tests/pipeline runs the whole pipeline).
            "pipeline": {"workers": 0},
            "metrics": {"port": 0},
        }
        root.mkdir(parents=True, exist_ok=True)
        path = root / "aidx.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return cls(path, root / "data", node_port)

    def load(self) -> AidxConfig:
        """The configuration these processes see, for in-process components of a test."""
        return load_config(self.config_path, env={}, overrides={"data_dir": str(self.data_dir)})

    def command(self, *args: str) -> list[str]:
        return [*AIDX, "--config", str(self.config_path), "--data-dir", str(self.data_dir), *args]

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run one ``aidx`` command to completion; its exit code is the caller's to check."""
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            env=aidx_env(),
            cwd=cwd,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def outbox(self) -> list[OutboxRow]:
        listed = self.run("outbox", "list")
        assert listed.returncode == 0, listed.stderr
        return [] if listed.stdout.startswith("outbox is empty") else parse_outbox(listed.stdout)

    def wait_for_item(
        self,
        condition: Callable[[OutboxRow], bool],
        what: str,
        deadline_s: float = 30.0,
        log_path: Path | None = None,
    ) -> OutboxRow:
        """Poll ``aidx outbox list`` until its single item satisfies ``condition``."""
        seen: list[OutboxRow] = []

        def check() -> bool:
            rows = self.outbox()
            assert len(rows) == 1, rows
            seen[:] = rows
            return condition(rows[0])

        try:
            # each check runs `aidx outbox list`, a Python process: not every 50 ms
            poll_until(check, deadline_s, what, log_path=log_path, interval_s=COMMAND_POLL_S)
        except PeerError as exc:
            raise AssertionError(f"{exc}\nlast outbox listing: {seen}") from exc
        return seen[0]

    @contextmanager
    def serve(
        self, log_path: Path, single_process: bool = False
    ) -> Iterator[subprocess.Popen[bytes]]:
        """``aidx serve`` in its own process group, ready when its port accepts connections;
        stopped with SIGTERM on exit (the caller checks ``returncode``). ``single_process``:
        the node's tests run `serve --single-process` (what the supervised node child runs),
        without the supervisor's extra process start-up."""
        command = self.command("serve")
        if single_process:
            command.append("--single-process")
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=aidx_env(),
                start_new_session=True,
            )
        try:
            wait_for_port(LOOPBACK, self.node_port, 30.0, process=process, log_path=log_path)
            yield process
        finally:
            stop_process(process)
