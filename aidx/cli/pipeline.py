"""`aidx serve` (node, assembly, workers, outbox, metrics; ``--demo``) and `aidx worker`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE
from aidx.config import AidxConfig, ConfigError

if TYPE_CHECKING:
    from aidx.pipeline.worker import WorkerPool
    from aidx.store.store import Store
    from dicom_node.service import NodeService

log = logging.getLogger("aidx.cli")

DEMO_QUIET_PERIOD_S = 5.0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop


def _check_pipeline(config: AidxConfig) -> str | None:
    """Routes name known destinations, and the models they use exist: a warning if not (the
    node still receives; jobs fail with the reason until a model is registered)."""
    from aidx.pipeline.routing import routes
    from aidx.pipeline.worker import model_registry
    from models.registry import ModelError

    registry = model_registry(config)
    for route in routes(config):  # ValueError for unknown destinations: refuse to start
        try:
            registry.resolve(route.model, config.models.default)
        except ModelError as exc:
            return f"route {route.name}: {exc}"
    return None


def serve(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.pipeline.metrics import MetricsServer
    from aidx.pipeline.routing import priority_function
    from aidx.pipeline.worker import WorkerPool
    from aidx.store.store import Store
    from dicom_node.policy import NodeStartError
    from dicom_node.service import NodeService

    demo = bool(getattr(args, "demo", False))
    if demo and config.node.study_quiet_period_s > DEMO_QUIET_PERIOD_S:
        log.info("demo: study quiet period %.0f s", DEMO_QUIET_PERIOD_S)
        config.node.study_quiet_period_s = DEMO_QUIET_PERIOD_S
    stop = _stop_on_signals()
    try:
        model_problem = _check_pipeline(config)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(config.store_url())
        pool: WorkerPool | None = None
        service = NodeService(
            config,
            store,
            on_complete=lambda *_: pool.notify() if pool is not None else None,
            priority=priority_function(config, store),
        )
        pool = WorkerPool(
            config,
            store,
            config.pipeline.workers,
            on_results=service.exporter.notify,
            poll_interval_s=config.pipeline.poll_interval_s,
        )
        service.start()
        pool.start()
    except (NodeStartError, OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if model_problem:
        log.warning("no model for inference: %s", model_problem)
    metrics = None
    if config.metrics.port:
        health = _health(service, pool, config, model_problem is None)
        metrics = MetricsServer(
            config.metrics.host, config.metrics.port, store, health, [service.scp.guard]
        )
        try:
            metrics.start()
        except OSError as exc:
            service.stop()
            pool.stop()
            print(f"aidx serve: metrics endpoint: {exc}", file=sys.stderr)
            return EXIT_USAGE
    from aidx.cli.ui import start_ui

    try:
        ui_server = start_ui(config, store, demo)
    except (OSError, ValueError) as exc:
        if metrics is not None:
            metrics.stop()
        service.stop()
        pool.stop()
        print(f"aidx serve: review app: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info(
        "aidx serving: DICOM %s@%s:%d, %d worker(s)%s",
        config.node.ae_title,
        config.node.host,
        service.port,
        config.pipeline.workers,
        f", metrics http://{config.metrics.host}:{metrics.port}/metrics" if metrics else "",
    )
    if demo:
        threading.Thread(
            target=_send_demo, args=(config, service.port), name="aidx-demo", daemon=True
        ).start()
    try:
        stop.wait()
    finally:
        if ui_server is not None:
            ui_server.stop()  # type: ignore[attr-defined]
        if metrics is not None:
            metrics.stop()
        service.stop()
        pool.stop()
        store.close()
    return EXIT_OK


def _health(
    service: NodeService, pool: WorkerPool, config: AidxConfig, model_ok: bool
) -> Callable[[], dict[str, bool]]:
    def checks() -> dict[str, bool]:
        return {
            "dicom_listener": service.scp.running,
            "workers": pool.alive() or config.pipeline.workers == 0,
            "model": model_ok,
        }

    return checks


def _send_demo(config: AidxConfig, port: int) -> None:
    """Write the demo study (if absent) and send it to this node, as a PACS would."""
    from aidx.config import DestinationConfig
    from aidx.demo import write_demo_study
    from dicom_node.export import SendError, send_files

    try:
        written = write_demo_study(config)
        dicom_dir = Path(getattr(written, "dicom_dir", written))
        files = sorted(dicom_dir.glob("*.dcm"))
        host = "127.0.0.1" if config.node.host in ("0.0.0.0", "::") else config.node.host
        target = DestinationConfig(ae_title=config.node.ae_title, host=host, port=port)
        send_files(target, "AIDX_DEMO", files)
    except (SendError, OSError, ValueError) as exc:
        log.error("demo: could not send the demo study: %s", exc)
        return
    log.info(
        "demo: sent %d images; the result follows after the %.0f s quiet period and "
        "inference. Watch it with: aidx --data-dir %s status",
        len(files),
        config.node.study_quiet_period_s,
        config.data_dir,
    )


def worker(args: argparse.Namespace, config: AidxConfig) -> int:
    del args
    from aidx.pipeline.worker import WorkerPool
    from aidx.store.store import Store

    stop = _stop_on_signals()
    count = max(config.pipeline.workers, 1)
    try:
        model_problem = _check_pipeline(config)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store: Store = Store(config.store_url())
    except (ConfigError, OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx worker: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if model_problem:
        log.warning("no model for inference: %s", model_problem)
    pool = WorkerPool(config, store, count, poll_interval_s=config.pipeline.poll_interval_s)
    pool.start()
    log.info("aidx worker: %d worker(s) on %s", count, config.store_url().split("://")[0])
    try:
        stop.wait()
    finally:
        pool.stop()
        store.close()
    return EXIT_OK
