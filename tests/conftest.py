"""Shared test helpers.

External tools (DCMTK, dicom3tools, Orthanc, Chromium) are installed by `make test` when it runs
as root. A test that needs a missing tool skips with the reason, except in CI (CI=true), where a
missing tool is a failure: nothing may skip silently there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# `aidx serve` processes started by tests run without the review app unless a test turns it on
# (the UI tests do): it would take port 7860 and a second or two of start-up each. Tests that
# clear AIDX_* variables for a subprocess set this one again (tests/dicom_node/aidx_process.py).
os.environ.setdefault("AIDX_UI__ENABLED", "false")
# `aidx serve` records its data folder in the user's state folder (aidx.config.record_data_dir):
# the tests' servers record theirs in a folder of the test run, not in the user's home.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="aidx-test-state-")
REPO = Path(__file__).resolve().parent.parent


# The longest test files (minutes each, measured with --durations), run first: `make test`
# hands whole files to its two processes (pytest-xdist --dist loadfile), so a long file handed
# out last would leave one process working alone at the end. Longest first, the short files
# fill in around them. Only the order changes.
LONGEST_FILES = (
    "tests/pipeline/test_orthanc_pipeline.py",
    "tests/pipeline/test_celery_dispatch.py",
    "tests/ui/test_review_e2e.py",
    "tests/pipeline/test_scale_out.py",
    "tests/aidx/test_serve_demo.py",
    "tests/training/test_train.py",
    "tests/inference/test_infer_cli.py",
    "tests/dicom_node/test_crash.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = Path(str(item.path)).relative_to(REPO).as_posix()
        return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file's own order is kept


def require_tool(name: str, package: str) -> str:
    """Absolute path of an external program, or skip (fail in CI) saying how to install it."""
    path = shutil.which(name, path="/usr/bin:/usr/sbin:/bin:/sbin:/usr/local/bin")
    if path:
        return path
    message = f"{name} not found; install Debian's '{package}' (make test does it as root)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _missing_peer(check: Callable[[], object], what: str) -> None:
    """Run ``check`` (which raises ToolMissingError or ImportError for a missing server or
    driver); skip with ``what`` and the reason, or fail under CI, where nothing may skip."""
    from tests.peers.process import ToolMissingError

    try:
        check()
    except (ToolMissingError, ImportError) as exc:
        message = f"{what}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the whole run (tests.peers.postgres)."""
    from tests.peers.postgres import POSTGRES_PACKAGE, Postgres, postgres_bin

    def check() -> None:
        postgres_bin()
        import psycopg  # noqa: F401 - the driver the [postgres] extra installs

    _missing_peer(check, f"PostgreSQL store tests need Debian's '{POSTGRES_PACKAGE}' and psycopg")
    with Postgres() as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[Any]:
    """A throwaway RabbitMQ broker for the whole run (tests.peers.rabbitmq)."""
    from tests.peers.rabbitmq import RABBITMQ_PACKAGE, RabbitMQ, rabbitmq_server

    def check() -> None:
        rabbitmq_server()
        import celery  # noqa: F401 - what the [scale] extra installs

    _missing_peer(check, f"Celery dispatch tests need Debian's '{RABBITMQ_PACKAGE}' and Celery")
    with RabbitMQ() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store database: SQLite in the test's folder, or one on the PostgreSQL
    server (the store's two supported back ends)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'aidx.db'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.new_database())


@pytest.fixture
def fresh_logging() -> Iterator[None]:
    """For a test that runs `aidx` in-process under capsys: the root logger starts without the
    handlers an earlier in-process `aidx` left (bound to a capture stream since closed, where a
    log line would print "--- Logging error ---"), and gets its own back afterwards."""
    import logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    root.handlers[:] = []
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
