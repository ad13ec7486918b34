"""A throwaway RabbitMQ broker (Debian's ``rabbitmq-server``) on loopback, for the Celery tests.

Its own node name, ports (AMQP, Erlang distribution, and its own epmd), database and logs in a
temporary folder, started with the server's own script (not the Debian service) and removed on
exit. The default ``guest`` account works from loopback, where the tests connect.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from tests.peers.process import (
    LOOPBACK,
    ToolMissingError,
    _Server,
    free_port,
    log_tail,
    poll_until,
    port_open,
)

RABBITMQ_PACKAGE = "rabbitmq-server"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 90.0


def rabbitmq_server() -> Path:
    if not SERVER.exists():
        raise ToolMissingError(
            f"RabbitMQ not found ({SERVER}): install the Debian package '{RABBITMQ_PACKAGE}' "
            f"(sudo apt-get install {RABBITMQ_PACKAGE}, or `make system-deps` as root)"
        )
    return SERVER


class RabbitMQ(_Server):
    name = "RabbitMQ"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aidx-rabbitmq-"))
        super().__init__(self.root / "rabbitmq.log")
        self.port = self.epmd_port = self.dist_port = 0

    def url(self, password: str = "guest") -> str:
        """The broker URL aidx takes (``pipeline.celery.broker_url``)."""
        return f"amqp://guest:{password}@{LOOPBACK}:{self.port}//"

    def start(self) -> Self:
        self.port, self.epmd_port, self.dist_port = free_port(), free_port(), free_port()
        (self.root / "enabled_plugins").write_text("[].\n")
        listen = f"listeners.tcp.default = {LOOPBACK}:{self.port}\n"
        (self.root / "rabbitmq.conf").write_text(listen)
        self._boot()
        return self

    def restart(self) -> None:
        """Stop the broker (SIGTERM: a clean shutdown) and start it again on the same ports
        with the same database: durable queues and persistent messages survive, as on a
        broker host's restart."""
        super().stop()
        self._boot()

    def _boot(self) -> None:
        server = rabbitmq_server()
        env = {
            "HOME": str(self.root),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"aidx{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),  # its own epmd, stopped with it
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_LOGS": "-",  # to standard output: our log file
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbitmq.pid"),
        }
        process = self._launch(["env", *(f"{k}={v}" for k, v in env.items()), str(server)])
        poll_until(
            lambda: port_open(LOOPBACK, self.port) and self._answers(),
            START_TIMEOUT_S,
            "RabbitMQ start",
            process=process,
            log_path=self.log_path,
        )

    def _answers(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url(), connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            # epmd daemonises out of the server's process group: ask it to go.
            epmd = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
            if self.epmd_port and epmd:
                subprocess.run(
                    [str(epmd[-1]), "-port", str(self.epmd_port), "-kill"],
                    capture_output=True,
                    check=False,
                    timeout=10,
                )
            shutil.rmtree(self.root, ignore_errors=True)

    def tail(self) -> str:
        return log_tail(self.log_path)
