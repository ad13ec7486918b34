"""`aidx serve --demo` (what `make run` does): everything starts, the demo study is sent to the
node, and its result is listed by `aidx status`; /healthz and /metrics answer."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from aidx.cli.pipeline import _send_demo
from aidx.config import load_config
from aidx.store.store import Store
from tests.peers import LOOPBACK, free_port, poll_until, stop_process
from tests.standin_model import install

AIDX = [sys.executable, "-m", "aidx"]


@pytest.mark.parametrize(
    ("separate_worker", "backend"),
    [(False, "sqlite"), (True, "postgresql")],
    ids=["supervised", "aidx-worker-postgresql"],
)
def test_serve_demo_lists_the_result_and_reports_health(
    tmp_path: Path,
    separate_worker: bool,
    backend: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`aidx serve` with its own worker process (the supervised layout), or none in `aidx
    serve` and an `aidx worker` started apart on the same store (the split a larger site
    uses), here on PostgreSQL."""
    install(tmp_path / "models", tmp_path)
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env.update(
        {
            "AIDX_DATA_DIR": str(tmp_path / "data"),
            "AIDX_NODE__PORT": str(free_port()),
            "AIDX_METRICS__PORT": str(metrics_port),
            "AIDX_UI__ENABLED": "false",  # tests/ui/test_review_e2e.py runs the app
            "AIDX_MODELS__DIR": str(tmp_path / "models"),
            "AIDX_MODELS__DEFAULT": "soft-tissue",
            "AIDX_INFERENCE__MIN_VOLUME_MM3": "3000",  # the stand-in's large components
            "AIDX_DEMO__SLICES": "30",
            "AIDX_DEMO__MATRIX": "96",
            "AIDX_DEMO__NODULES": "1",
            "AIDX_PIPELINE__WORKERS": "0" if separate_worker else "1",
            "AIDX_PIPELINE__POLL_INTERVAL_S": "0.2",
        }
    )
    if backend == "postgresql":
        env["AIDX_STORE__URL"] = request.getfixturevalue("postgres_server").new_database()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [*AIDX, "serve", "--demo"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # stop_process signals the process group
    )
    worker = (
        subprocess.Popen(
            [*AIDX, "worker", "--workers", "1"],
            stdout=(tmp_path / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        if separate_worker
        else None
    )

    def status() -> list[dict[str, object]]:
        done = subprocess.run(
            [*AIDX, "status", "--json"], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            return []
        studies: list[dict[str, object]] = json.loads(done.stdout)["studies"]
        return studies

    store: Store | None = None
    try:
        # Bounded polls on the log and the store (cheap); `aidx status` is run once it is done.
        poll_until(
            lambda: "aidx serving" in log.read_text("utf-8", errors="replace"),
            60,
            "aidx serving",
            process=process,
            log_path=log,
        )
        store = Store.for_config(load_config(env=env))
        poll_until(
            lambda: store.job_counts().get("results_ready", 0) == 1,
            120,
            "the demo study's result",
            process=process,
            log_path=log,
        )
        (study,) = status()
        assert study["job_state"] == "results_ready"
        assert study["instances"] == 30
        assert study["calling_ae"] == "AIDX_DEMO"
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/healthz") as r:
            health = json.loads(r.read())
        assert health == {
            "status": "ok",
            # the workers (or their own host's `aidx worker`) and the outbox, each a process
            "checks": {
                "store": True,
                "dicom_listener": True,
                "workers": True,
                "model": True,
                "outbox": True,
            },
        }
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics") as r:
            metrics = r.read().decode()
        assert "aidx_instances_received_total 30.0" in metrics
        assert 'aidx_jobs{state="results_ready"} 1.0' in metrics
        text = log.read_text(encoding="utf-8")
        assert "demo: sent 30 images" in text
        assert "DEMO^CHEST" not in text  # no patient names in the log
        if worker is not None:
            assert "job 1: results ready" in (tmp_path / "worker.log").read_text("utf-8")
            assert "job 1: results ready" not in text
        else:
            # `make run` again: the same demo study, every image a re-send of a stored one;
            # the message says so instead of promising a result that does not follow.
            config = load_config(env=env)
            with caplog.at_level(logging.INFO, logger="aidx.cli"):
                _send_demo(config, config.node.port)
            assert "all already stored" in caplog.text, caplog.text
            assert "nothing new to analyse" in caplog.text
            assert "the result follows" not in caplog.text
    finally:
        if store is not None:
            store.close()
        stop_process(process)
        if worker is not None:
            stop_process(worker)
    assert process.returncode == 0, log.read_text(encoding="utf-8")[-3000:]
    assert worker is None or worker.returncode == 0
