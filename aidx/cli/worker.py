"""`aidx worker`: inference workers apart from `aidx serve`, on the same store (claiming jobs
from it, or from a Celery queue with ``pipeline.queue: celery``). Under `aidx serve` they are
its ``workers`` child."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE
from aidx.cli.pipeline import check_pipeline, storage_problem
from aidx.cli.signals import stop_on_signals

if TYPE_CHECKING:
    from aidx.config import AidxConfig

log = logging.getLogger("aidx.cli")


def worker(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.config import ConfigError
    from aidx.doorbell import JOBS, RESULTS, Doorbell, ring
    from aidx.pipeline.worker import WorkerPool
    from aidx.store.store import Store
    from aidx.supervisor import lower_priority

    def results_ready() -> None:  # the outbox sends now
        ring(config.data_dir, RESULTS)

    lower_priority(config.pipeline.worker_nice)  # as under `aidx serve` (it set it already)
    queues = list(getattr(args, "queue", None) or [])
    if queues and config.pipeline.queue != "celery":
        print(
            "aidx worker: --queue needs pipeline.queue: celery (jobs are claimed from the store)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    celery = config.pipeline.queue == "celery"
    stop = None if celery else stop_on_signals()  # Celery's worker handles the signals
    count = max(config.pipeline.workers, 1)
    try:
        model_problem = check_pipeline(config)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store: Store = Store.for_config(config)
    except (ConfigError, OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx worker: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = storage_problem(config, store)
    if problem:
        store.close()
        print(f"aidx worker: cannot start: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if model_problem:
        log.warning("no model for inference: %s", model_problem)
    if celery:
        from aidx.pipeline.dispatch import BrokerError, run_workers

        try:
            run_workers(
                config,
                store,
                count,
                queues or [config.pipeline.celery.queue],
                on_results=results_ready,
            )
        except (BrokerError, ValueError) as exc:
            print(f"aidx worker: cannot start: {exc}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            store.close()
        return EXIT_OK
    assert stop is not None
    pool = WorkerPool(
        config,
        store,
        count,
        on_results=results_ready,
        poll_interval_s=config.pipeline.poll_interval_s,
    )
    jobs_bell = Doorbell(config.data_dir, JOBS, pool.notify)
    pool.start()
    jobs_bell.start()
    log.info("aidx worker: %d worker(s) on %s", count, config.store_url().split("://")[0])
    try:
        stop.wait()
    finally:
        jobs_bell.stop()
        pool.stop()
        store.close()
    if pool.busy():
        # A job left running (taken again at the next start): end now, without the
        # interpreter's shutdown, which would abort under ONNX Runtime's running threads
        # ("terminate called without an active exception", status -6).
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK
