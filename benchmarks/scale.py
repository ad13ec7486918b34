"""Benchmark: the job engine, the store queue against Celery + RabbitMQ (issue 19).

A node (`aidx serve --single-process --workers 0 --no-ui`) and N `aidx worker` processes on one
host share a store; K small phantom studies (12 x 64², from a cache) are sent one after another
by DCMTK storescu with a 1 s quiet period. A series of 12 slices is below the route's minimum
(inference.series), so each job is claimed, its headers read and routed, and it ends "not
applicable" in tens of milliseconds: the engine is what is measured, not a model.
For each engine and each N it prints, from the store's own
timestamps: the enqueue -> start latency of the jobs (``started_at - created_at``; p50, p95) and
the jobs per minute from the first job queued to the last finished. The store queue wakes
workers on this host by a doorbell; Celery gets each job through the broker (a real RabbitMQ
started here, tests/peers/rabbitmq.py). Medians only within one run (the VM is shared).

With ``--real-model``, the shipped default model instead, on demo-sized studies (300 x 512²,
three nodules each): the studies an hour that 1, 2, ... worker processes get through a backlog,
for the capacity plan in docs/deployment.md (no trickle: the latency is the engine's, above).

Usage: python benchmarks/scale.py [--studies 12] [--trickle 5] [--workers 1,2,4]
       [--engines store,celery]
       python benchmarks/scale.py --real-model [--studies 4] [--workers 1,2] [--engines store]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make tests.peers importable
    sys.path.insert(0, str(REPO))

from sqlalchemy import select

from aidx.store.schema import jobs
from aidx.store.store import Store
from tests.peers import (
    LOOPBACK,
    echoscu,
    free_port,
    poll_until,
    stop_process,
    storescu,
)
from tests.peers.rabbitmq import RabbitMQ
from tests.standin_model import install

AIDX = [sys.executable, "-m", "aidx"]
DONE = ("results_ready", "sent", "not_applicable", "failed")


def studies(root: Path, count: int, real: bool = False) -> list[Path]:
    from training.phantom import PhantomOptions, generate

    folders = []
    for n in range(count):
        out = root / f"study-{n}"
        if not (out / "dicom").is_dir():
            if real:  # the demo study's size (aidx.config.DemoConfig), another seed each
                options = PhantomOptions(slices=300, matrix=512, nodules=3, seed=7100 + n)
            else:
                options = PhantomOptions(slices=12, matrix=64, nodules=0, seed=7000 + n)
            generate(out, options)
        folders.append(out / "dicom")
    return folders


def run(
    engine: str,
    workers: int,
    backlog: list[Path],
    trickle: list[Path],
    root: Path,
    broker_url: str,
    real: bool = False,
) -> tuple[list[float], float]:
    """One engine with ``workers`` worker processes: (the enqueue -> start latencies of the
    ``trickle`` studies, sent one by one to idle workers; the jobs per minute that the workers
    get through the ``backlog``, queued before they start)."""
    work = Path(tempfile.mkdtemp(prefix=f"{engine}-{workers}-", dir=root))
    if not real:
        install(work / "models", work)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env.update(
        {
            "AIDX_DATA_DIR": str(work / "data"),
            "AIDX_NODE__PORT": str(port),
            "AIDX_NODE__STUDY_QUIET_PERIOD_S": "1",
            "AIDX_METRICS__PORT": "0",
            "AIDX_UI__ENABLED": "false",
            "AIDX_PIPELINE__WORKERS": "0",
            "AIDX_PIPELINE__QUEUE": engine,
            "AIDX_PIPELINE__CELERY__BROKER_URL": broker_url,
            "AIDX_PIPELINE__CELERY__QUEUE": f"bench-{port}",
        }
    )
    if not real:  # the stand-in; with --real-model the shipped registry's default
        env.update(
            {"AIDX_MODELS__DIR": str(work / "models"), "AIDX_MODELS__DEFAULT": "soft-tissue"}
        )
    logs = work / "logs"
    logs.mkdir()

    def start(command: list[str], name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            stdout=(logs / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    node = start([*AIDX, "serve", "--single-process", "--no-ui"], "node")
    pool: list[subprocess.Popen[bytes]] = []
    store: Store | None = None
    try:
        poll_until(
            lambda: echoscu(LOOPBACK, port, called_aet="AIDX").returncode == 0,
            60,
            "the node",
            process=node,
        )
        store = Store(f"sqlite:///{work / 'data' / 'aidx.db'}", root=work / "data")

        def rows() -> list[Any]:
            with store.engine.connect() as conn:
                return list(conn.execute(select(jobs)))

        def wait(count: int, states: tuple[str, ...], what: str) -> None:
            poll_until(
                lambda: sum(r.state in states for r in rows()) == count, 3600, what, process=node
            )

        # The backlog: queued (and, on Celery, published) before any worker runs.
        for folder in backlog:
            storescu(LOOPBACK, port, [folder], called_aet="AIDX")
        wait(len(backlog), ("queued",), "the backlog queued")
        if engine == "celery":
            poll_until(
                lambda: (logs / "node.log").read_text().count("published") >= len(backlog),
                60,
                "the backlog published",
            )
        pool = [start([*AIDX, "worker", "--workers", "1"], f"worker-{n}") for n in range(workers)]
        wait(len(backlog), DONE, "the backlog done")
        done = rows()
        first = min(r.started_at for r in done)
        last = max(r.finished_at for r in done)
        per_minute = len(done) / (last - first) * 60.0
        # Idle workers, studies one by one: how long a new job waits for a worker.
        for folder in trickle:
            storescu(LOOPBACK, port, [folder], called_aet="AIDX")
            wait(len(done) + 1, DONE, "the study's job done")
            done = rows()
        latencies = [r.started_at - r.created_at for r in done[len(backlog) :]]
        return latencies, per_minute
    finally:
        if store is not None:
            store.close()
        for process in [node, *pool]:
            stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12, help="the backlog's studies")
    parser.add_argument("--trickle", type=int, default=5, help="studies sent one by one")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--engines", default="store,celery")
    parser.add_argument(
        "--real-model", action="store_true", help="the shipped default model on demo-sized studies"
    )
    args = parser.parse_args()
    if args.real_model:
        real_model(args)
        return
    counts = [int(n) for n in args.workers.split(",")]
    engines = args.engines.split(",")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; per run a backlog of "
        f"{args.studies} jobs, then {args.trickle} studies one by one"
    )
    root = Path(tempfile.mkdtemp(prefix="aidx-scale-"))
    folders = studies(root / "studies", args.studies + args.trickle)
    backlog, trickle = folders[: args.studies], folders[args.studies :]
    results: dict[tuple[str, int], tuple[list[float], float]] = {}
    with RabbitMQ() as broker:
        for workers in counts:
            for engine in engines:
                latencies, per_minute = run(engine, workers, backlog, trickle, root, broker.url())
                results[engine, workers] = (latencies, per_minute)
                q = statistics.quantiles(latencies, n=20)
                print(
                    f"  {engine:<6} {workers} worker(s): enqueue->start p50 "
                    f"{statistics.median(latencies) * 1000:7.0f} ms, p95 {q[18] * 1000:7.0f} ms; "
                    f"{per_minute:5.1f} jobs/min",
                    flush=True,
                )
    if "store" in engines and "celery" in engines:
        for workers in counts:
            store_p50 = statistics.median(results["store", workers][0])
            celery_p50 = statistics.median(results["celery", workers][0])
            ratio = results["celery", workers][1] / results["store", workers][1]
            print(
                f"  {workers} worker(s): celery - store p50 latency "
                f"{(celery_p50 - store_p50) * 1000:+.0f} ms; jobs/min celery/store {ratio:.2f}x"
            )


def real_model(args: argparse.Namespace) -> None:
    """Studies an hour through the shipped default model, per number of worker processes."""
    counts = [int(n) for n in args.workers.split(",")]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; the shipped default model, "
        f"a backlog of {args.studies} studies of 300 x 512² per run"
    )
    root = Path(tempfile.mkdtemp(prefix="aidx-scale-real-"))
    backlog = studies(root / "studies", args.studies, real=True)
    with RabbitMQ() as broker:
        for workers in counts:
            for engine in args.engines.split(","):
                _, per_minute = run(engine, workers, backlog, [], root, broker.url(), real=True)
                print(
                    f"  {engine:<6} {workers} worker(s): {per_minute * 60:5.0f} studies/hour, "
                    f"{per_minute * 60 / workers:5.0f} per worker; "
                    f"{60 / per_minute:5.1f} s a study",
                    flush=True,
                )


if __name__ == "__main__":
    main()
