"""Jobs through Celery and a real RabbitMQ (``pipeline.queue: celery``, aidx.pipeline.dispatch):
the node publishes each job, `aidx worker` processes consume them, the store stays the ledger.
A worker killed in the middle of a job: the broker delivers the task again, another worker
takes the job over at once (not when its lease runs out) and the result is made once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aidx.store.schema import events, instances, jobs, results, studies
from aidx.store.store import Store
from tests.peers import (
    LOOPBACK,
    echoscu,
    free_port,
    peer_env,
    poll_until,
    stop_process,
    storescu,
    storescu_command,
)
from tests.peers.rabbitmq import RabbitMQ
from tests.standin_model import install
from tests.study_copies import study_copies

AIDX = [sys.executable, "-m", "aidx"]
LEASE_S = 600  # the takeover must not wait for it


def aidx_env(tmp_path: Path, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env.update(
        {
            "AIDX_DATA_DIR": str(tmp_path / "data"),
            "AIDX_NODE__PORT": str(free_port()),
            "AIDX_METRICS__PORT": "0",
            "AIDX_UI__ENABLED": "false",
            "AIDX_MODELS__DIR": str(tmp_path / "models"),
            "AIDX_MODELS__DEFAULT": "soft-tissue",
            # the stand-in's large components only (a few findings, not a hundred)
            "AIDX_INFERENCE__MIN_VOLUME_MM3": "3000",
            "AIDX_DEMO__SLICES": "30",
            "AIDX_DEMO__MATRIX": "96",
            "AIDX_DEMO__NODULES": "1",
            "AIDX_PIPELINE__WORKERS": "0",
            "AIDX_PIPELINE__LEASE_S": str(LEASE_S),
            "AIDX_PIPELINE__QUEUE": "celery",
            "AIDX_PIPELINE__CELERY__BROKER_URL": broker_url,
            "AIDX_PIPELINE__CELERY__QUEUE": f"aidx-test-{free_port()}",  # a queue per test
        }
    )
    return env


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def job_row(store: Store) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(select(jobs)).one()


def test_a_job_whose_worker_dies_is_delivered_again_and_its_result_made_once(
    tmp_path: Path, rabbitmq_server: Any
) -> None:
    install(tmp_path / "models", tmp_path, slow_rounds=4000)  # a job of several seconds
    env = aidx_env(tmp_path, rabbitmq_server.url())
    logs = {name: tmp_path / f"{name}.log" for name in ("node", "worker-a", "worker-b")}
    node = start([*AIDX, "serve", "--single-process", "--demo"], logs["node"], env)
    workers = {name: start([*AIDX, "worker"], logs[name], env) for name in ("worker-a", "worker-b")}
    store: Store | None = None
    try:
        running = re.compile(r"job 1: running")

        def holder() -> str | None:
            for name in workers:
                if running.search(logs[name].read_text("utf-8", errors="replace")):
                    return name
            return None

        poll_until(
            lambda: holder() is not None, 120, "a worker running job 1", log_path=logs["node"]
        )
        dead = holder()
        assert dead is not None
        os.kill(workers[dead].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        workers[dead].wait(10)
        other = next(name for name in workers if name != dead)
        store = Store(f"sqlite:///{tmp_path / 'data' / 'aidx.db'}", root=tmp_path / "data")
        poll_until(
            lambda: job_row(store).state == "results_ready",
            120,
            "job 1's result from the other worker",
            process=workers[other],
            log_path=logs[other],
        )
        # Taken over when the broker delivered the task again, not when the lease ran out.
        assert time.monotonic() - killed_at < LEASE_S / 4
        row = job_row(store)
        assert row.attempts == 2
        with store.engine.connect() as conn:
            assert len(conn.execute(select(results)).all()) == 1
            kinds = [r.event for r in conn.execute(select(events).order_by(events.c.id))]
        assert "requeued" in kinds
        assert "job 1: results ready" in logs[other].read_text("utf-8")
        assert "job 1 published" in logs["node"].read_text("utf-8")
    finally:
        if store is not None:
            store.close()
        for process in [node, *workers.values()]:
            stop_process(process)
    assert node.returncode == 0, logs["node"].read_text("utf-8")[-3000:]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def test_the_nodes_metrics_show_the_brokers_queue_until_a_worker_takes_the_job(
    tmp_path: Path, rabbitmq_server: Any
) -> None:
    install(tmp_path / "models", tmp_path)
    env = aidx_env(tmp_path, rabbitmq_server.url())
    metrics_port = free_port()
    env["AIDX_METRICS__PORT"] = str(metrics_port)
    queue = env["AIDX_PIPELINE__CELERY__QUEUE"]
    node_log, worker_log = tmp_path / "node.log", tmp_path / "worker.log"
    node = start([*AIDX, "serve", "--single-process", "--demo"], node_log, env)
    worker = None
    store: Store | None = None
    try:
        poll_until(
            lambda: "job 1 published" in node_log.read_text("utf-8", errors="replace"),
            120,
            "job 1 on the broker",
            process=node,
            log_path=node_log,
        )
        waiting = f'aidx_broker_queue_messages{{queue="{queue}"}} 1.0'
        poll_until(lambda: waiting in scrape(metrics_port), 30, "the task counted in /metrics")
        assert "aidx_broker_up 1.0" in scrape(metrics_port)
        worker = start([*AIDX, "worker"], worker_log, env)
        store = Store(f"sqlite:///{tmp_path / 'data' / 'aidx.db'}", root=tmp_path / "data")
        poll_until(
            lambda: job_row(store).state == "results_ready",
            120,
            "job 1's result",
            process=worker,
            log_path=worker_log,
        )
        assert f'aidx_broker_queue_messages{{queue="{queue}"}} 0.0' in scrape(metrics_port)
    finally:
        if store is not None:
            store.close()
        for process in (node, worker):
            if process is not None:
                stop_process(process)
    assert node.returncode == 0, node_log.read_text("utf-8")[-3000:]


def test_a_worker_without_its_broker_says_where_and_what_to_do(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = aidx_env(tmp_path, f"amqp://aidx:s3cret@127.0.0.1:{port}//")
    install(tmp_path / "models", tmp_path)
    done = subprocess.run(
        [*AIDX, "worker"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert f"amqp://aidx:***@127.0.0.1:{port}//" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert "start RabbitMQ" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("option", [["--queue", "gpu"]])
def test_queue_option_needs_the_celery_queue(tmp_path: Path, option: list[str]) -> None:
    env = aidx_env(tmp_path, "amqp://guest:guest@127.0.0.1:1//")
    env["AIDX_PIPELINE__QUEUE"] = "store"
    done = subprocess.run(
        [*AIDX, "worker", *option], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "pipeline.queue: celery" in done.stderr


def test_queued_jobs_survive_a_broker_restart_and_the_stat_study_queued_last_runs_first(
    tmp_path: Path,
) -> None:
    """Ten studies complete while no worker runs, the STAT one last; the broker restarts with
    their ten tasks queued; then one worker takes them: none is lost, and the broker gives it
    the STAT study's task first (priority from pipeline.priority_rules). The studies are of 12
    slices, fewer than a route takes (inference.series.min_slices): each job is claimed, read
    and routed, and ends "not applicable" at once, so the queue is what is tested, not a
    model."""
    from training.phantom import PhantomOptions, generate

    install(tmp_path / "models", tmp_path)
    config = tmp_path / "aidx.yaml"
    config.write_text(
        "pipeline:\n  priority_rules:\n    - calling_ae_titles: [STAT]\n      priority: 100\n"
    )
    broker = RabbitMQ().start()
    node = worker = None
    store: Store | None = None
    try:
        env = aidx_env(tmp_path, broker.url())
        env["AIDX_NODE__STUDY_QUIET_PERIOD_S"] = "1"
        node_log, worker_log = tmp_path / "node.log", tmp_path / "worker.log"
        node = start([*AIDX, "--config", str(config), "serve", "--single-process"], node_log, env)
        port = int(env["AIDX_NODE__PORT"])
        poll_until(lambda: "aidx serving" in node_log.read_text("utf-8"), 60, "the node")
        # Ten studies: one phantom under ten sets of UIDs.
        options = PhantomOptions(slices=12, matrix=64, nodules=0, seed=5000)
        phantom = Path(generate(tmp_path / "phantom", options).dicom_dir)
        folders = study_copies(phantom, tmp_path / "studies", 10)
        sent = [("STAT" if n == 9 else "ROUTINE", str(f)) for n, f in enumerate(folders)]
        for ae, folder in sent:
            storescu(LOOPBACK, port, [folder], called_aet="AIDX", calling_aet=ae)
        published = re.compile(r"job \d+ published")
        poll_until(
            lambda: len(published.findall(node_log.read_text("utf-8"))) == 10,
            120,
            "ten jobs on the broker",
            process=node,
            log_path=node_log,
        )
        broker.restart()
        worker = start([*AIDX, "worker"], worker_log, env)
        store = Store(f"sqlite:///{tmp_path / 'data' / 'aidx.db'}", root=tmp_path / "data")

        def states() -> list[str]:
            with store.engine.connect() as conn:
                return [r.state for r in conn.execute(select(jobs))]

        poll_until(
            lambda: states().count("not_applicable") == 10,
            240,
            "ten jobs done",
            process=worker,
            log_path=worker_log,
        )
        with store.engine.connect() as conn:
            order = conn.execute(
                select(studies.c.calling_ae)
                .join(jobs, jobs.c.study_uid == studies.c.study_uid)
                .order_by(jobs.c.started_at)
            ).all()
        assert [r.calling_ae for r in order] == ["STAT"] + ["ROUTINE"] * 9
    finally:
        if store is not None:
            store.close()
        for process in (node, worker):
            if process is not None:
                stop_process(process)
        broker.stop()


def test_a_node_killed_mid_study_loses_nothing_and_the_study_runs_once(
    tmp_path: Path, rabbitmq_server: Any
) -> None:
    """Two nodes on one store and one shared storage root, one worker. The PACS sends a study to
    node A, which is killed (-9) in the middle of it; the PACS sends the study again, to node B.
    Nothing is lost or doubled: every image indexed once with its file, the study assembled once,
    one job, one result. Node A, restarted, removes only the temporary file its dead process left,
    not one that a live node on the same shared spool may be writing."""
    from training.phantom import PhantomOptions, generate

    install(tmp_path / "models", tmp_path)
    study = generate(tmp_path / "study", PhantomOptions(slices=40, matrix=64, nodules=0)).dicom_dir
    total = len(list(study.glob("*.dcm")))
    processes: dict[str, subprocess.Popen[bytes]] = {}
    store: Store | None = None
    try:
        base = aidx_env(tmp_path, rabbitmq_server.url())
        (tmp_path / "shared").mkdir()
        base["AIDX_STORE__URL"] = f"sqlite:///{tmp_path / 'shared' / 'aidx.db'}"
        base["AIDX_STORAGE__ROOT"] = str(tmp_path / "shared")
        base["AIDX_NODE__STUDY_QUIET_PERIOD_S"] = "4"
        envs = {
            name: {**base, "AIDX_DATA_DIR": str(tmp_path / name), "AIDX_NODE__PORT": str(port)}
            for name, port in (("node-a", free_port()), ("node-b", free_port()))
        }

        def serve(name: str, log: str) -> None:
            env = envs[name]
            processes[name] = start([*AIDX, "serve", "--single-process"], tmp_path / log, env)
            port = int(env["AIDX_NODE__PORT"])
            poll_until(
                lambda: echoscu(LOOPBACK, port, called_aet="AIDX").returncode == 0,
                60,
                name,
                process=processes[name],
                log_path=tmp_path / log,
            )

        serve("node-a", "node-a.log")
        serve("node-b", "node-b.log")
        processes["worker"] = start([*AIDX, "worker"], tmp_path / "worker.log", base)
        store = Store(base["AIDX_STORE__URL"], root=tmp_path / "shared")
        # A live writer's temporary file in node A's host folder of the shared spool (as node B
        # would leave while writing), and one of a writer that is gone.
        incoming = next((tmp_path / "shared" / "spool" / ".incoming").iterdir())
        live = incoming / f"1.2.3.{processes['node-b'].pid}.{'0' * 32}.part"
        dead = incoming / f"1.2.4.{2**22 + 1}.{'0' * 32}.part"  # above Linux's default pid_max
        live.write_bytes(b"being written")
        dead.write_bytes(b"left by a killed node")

        sender = subprocess.Popen(
            storescu_command(
                LOOPBACK, int(envs["node-a"]["AIDX_NODE__PORT"]), [study], called_aet="AIDX"
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=peer_env(),
        )
        while store.count(instances) < total // 4 and sender.poll() is None:
            pass  # the index is the evidence: stop the node a quarter of the way in
        os.kill(processes["node-a"].pid, signal.SIGKILL)
        processes["node-a"].wait(10)
        assert sender.wait(60) != 0, "the kill came after the whole study was sent"
        received_by_a = store.count(instances)
        assert received_by_a < total
        # The PACS sends the study again, to the other node.
        storescu(LOOPBACK, int(envs["node-b"]["AIDX_NODE__PORT"]), [study], called_aet="AIDX")

        def ready() -> bool:
            with store.engine.connect() as conn:
                return [r.state for r in conn.execute(select(jobs))] == ["results_ready"]

        poll_until(
            ready,
            120,
            "the study's result",
            process=processes["worker"],
            log_path=tmp_path / "worker.log",
        )
        with store.engine.connect() as conn:
            rows = conn.execute(select(instances.c.path)).all()
            (study_row,) = conn.execute(select(studies)).all()
            assert len(conn.execute(select(results)).all()) == 1
        assert len(rows) == total and all(Path(r.path).is_file() for r in rows)
        assert study_row.version == 1 and study_row.instance_count == total
        assert job_row(store).attempts == 1
        # Node A again: its dead writer's leftover goes, the live one stays.
        serve("node-a", "node-a2.log")
        assert live.exists() and not dead.exists()
        assert re.search(r"removed \d+ partial files", (tmp_path / "node-a2.log").read_text())
    finally:
        if store is not None:
            store.close()
        for process in processes.values():
            stop_process(process)
