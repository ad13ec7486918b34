"""A throwaway PostgreSQL server (Debian's ``postgresql``) on loopback, for store tests.

A fresh cluster (``initdb``, trust authentication on loopback only) in a temporary folder,
started on a free port and removed on exit. PostgreSQL refuses to run as root, so under root
the cluster belongs to Debian's ``postgres`` user (``runuser``). Each test gets its own
database from :meth:`Postgres.new_database`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from tests.peers.process import (
    LOOPBACK,
    PeerError,
    ToolMissingError,
    _Server,
    free_port,
    log_tail,
    poll_until,
    port_open,
)

POSTGRES_PACKAGE = "postgresql"
START_TIMEOUT_S = 60.0


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs (the newest version installed)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not found:
        raise ToolMissingError(
            f"PostgreSQL's initdb not found: install the Debian package '{POSTGRES_PACKAGE}' "
            f"(sudo apt-get install {POSTGRES_PACKAGE}, or `make system-deps` as root)"
        )
    return found[-1].parent


class Postgres(_Server):
    name = "PostgreSQL"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aidx-pg-"))
        super().__init__(self.root / "postgres.log")
        self.port = 0
        self._as: list[str] = []
        self._count = 0

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def url(self, database: str) -> str:
        """The URL aidx takes (``store.url``) for a database of this server."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}"

    def start(self) -> Self:
        binaries = postgres_bin()
        if os.geteuid() == 0:  # initdb and postgres refuse root
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        data = self.root / "data"
        initdb = subprocess.run(
            [
                *self._as,
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if initdb.returncode != 0:
            raise PeerError(f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()}")
        self.port = free_port()
        process = self._launch(
            [
                *self._as,
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-h",
                LOOPBACK,
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]
        )
        poll_until(
            lambda: port_open(LOOPBACK, self.port) and self._answers(),
            START_TIMEOUT_S,
            "PostgreSQL start",
            process=process,
            log_path=self.log_path,
        )
        return self

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def new_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._count += 1
        name = f"aidx_test_{self._count}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open sessions are ended), then remove the cluster."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired as exc:
                super().stop()
                raise PeerError(f"PostgreSQL did not stop:\n{log_tail(self.log_path)}") from exc
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)
