"""`aidx serve` (node, assembly, workers, outbox, metrics; ``--demo``); `aidx worker` is in
:mod:`aidx.cli.worker`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE
from aidx.cli.signals import stop_on_signals
from aidx.supervisor import SUPERVISED_ENV

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.pipeline.dispatch import Publisher
    from aidx.pipeline.retention import RetentionLoop
    from aidx.pipeline.worker import WorkerPool
    from aidx.store.store import Store
    from aidx.supervisor import ChildSpec, Supervisor
    from dicom_node.service import NodeService

log = logging.getLogger("aidx.cli")

DEMO_QUIET_PERIOD_S = 5.0
STARTUP_TIMEOUT_S = 60.0  # for the node and the review app to listen
# What the node, the outbox and the workers load as they start (not the review app's Gradio,
# which only its own child needs): imported once by the supervisor before it forks them.
CHILD_MODULES = (
    "aidx.config",
    "aidx.doorbell",
    "aidx.pipeline.metrics",
    "aidx.pipeline.routing",
    "aidx.pipeline.worker",
    "aidx.store.store",
    "dicom_node.export",
    "dicom_node.policy",
    "dicom_node.service",
)


def check_pipeline(config: AidxConfig) -> str | None:
    """Routes name known destinations, and the models they use exist: a warning if not (the
    node still receives; jobs fail with the reason until a model is registered)."""
    from aidx.pipeline.routing import routes
    from models.registry import ModelError, site_registry

    registry = site_registry(config.models_dir())
    for route in routes(config):  # ValueError for unknown destinations: refuse to start
        try:
            registry.resolve(route.model, config.models.default)
        except ModelError as exc:
            return f"route {route.name}: {exc}"
    return None


def serve(args: argparse.Namespace, config: AidxConfig) -> int:
    """`aidx serve`: a supervisor of the node, worker and review app processes (aidx.supervisor),
    or all of them in this process with ``--single-process`` (and in each supervised node)."""
    if getattr(args, "single_process", False):
        return _serve_here(args, config)
    return _supervise(args, config)


def _supervise(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.config import record_data_dir
    from aidx.supervisor import Supervisor, preload

    demo = bool(getattr(args, "demo", False))
    if demo and config.node.study_quiet_period_s > DEMO_QUIET_PERIOD_S:
        log.info("demo: study quiet period %.0f s", DEMO_QUIET_PERIOD_S)
        config.node.study_quiet_period_s = DEMO_QUIET_PERIOD_S
    try:
        from aidx.pipeline.routing import routes

        routes(config)  # unknown destinations: refuse to start
        config.data_dir.mkdir(parents=True, exist_ok=True)
        from aidx.store.store import Store

        Store.for_config(config).close()  # create or migrate the store once, before the children
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    record_data_dir(config.data_dir)
    children = _children(args, config)
    supervisor = Supervisor(
        children, _base_args(args, config), _child_env(config), _supervisor_state(config)
    )

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping", signum)
        supervisor.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    preload(CHILD_MODULES)  # what the forked children share, loaded once
    supervisor.start()
    try:
        # While the children start: a route without a model only warns (the node still
        # receives; its jobs fail with the reason until a model is registered).
        model_problem = check_pipeline(config)
        if model_problem:
            log.warning("no model for inference: %s", model_problem)
        problem = _wait_until_ready(config, supervisor)
        if problem:
            print(f"aidx serve: cannot start: {problem}", file=sys.stderr)
            return EXIT_USAGE
        pids = ", ".join(f"{name} {pid}" for name, pid in supervisor.pids().items())
        log.info(
            "aidx serving: DICOM %s@%s:%d, %d worker(s)%s (processes: %s)",
            config.node.ae_title,
            config.node.host,
            config.node.port,
            config.pipeline.workers,
            f", metrics http://{config.metrics.host}:{config.metrics.port}/metrics"
            if config.metrics.port
            else "",
            pids,
        )
        if demo:
            threading.Thread(
                target=_send_demo, args=(config, config.node.port), name="aidx-demo", daemon=True
            ).start()
        supervisor.run()
    finally:
        for name, status in supervisor.shutdown():
            if status not in (0, None, -signal.SIGTERM):
                log.warning("%s stopped with status %s", name, status)
    return EXIT_OK


def _children(args: argparse.Namespace, config: AidxConfig) -> list[ChildSpec]:
    """The node (with /metrics), the outbox, the workers and the review app."""
    from aidx.supervisor import ChildSpec

    node = [
        *("serve", "--single-process", "--workers", "0", "--no-ui", "--no-outbox"),
        *("--ae-title", config.node.ae_title, "--host", config.node.host),
        *("--port", str(config.node.port), "--metrics-port", str(config.metrics.port)),
    ]
    children = [ChildSpec("node", node), ChildSpec("outbox", ["outbox", "run"], config.outbox.nice)]
    if config.pipeline.workers > 0:
        workers = ["worker", "--workers", str(config.pipeline.workers)]
        children.append(ChildSpec("workers", workers, nice=config.pipeline.worker_nice))
    if config.ui.enabled:
        ui = ["ui", "--host", config.ui.host, "--port", str(config.ui.port)]
        ui += ["--demo"] if args.demo else []
        children.append(ChildSpec("review app", ui, nice=config.ui.nice))
    return children


def _base_args(args: argparse.Namespace, config: AidxConfig) -> list[str]:
    """The global options every child gets: the same configuration, as resolved here."""
    base = ["--data-dir", str(config.data_dir.resolve())]
    if getattr(args, "config", None):
        base += ["--config", str(args.config)]
    base += ["--log-level", config.log.level, "--log-format", config.log.format]
    return base


def _child_env(config: AidxConfig) -> dict[str, str]:
    """Settings a flag cannot carry: the demo's shorter quiet period."""
    return {"AIDX_NODE__STUDY_QUIET_PERIOD_S": repr(config.node.study_quiet_period_s)}


def _wait_until_ready(config: AidxConfig, supervisor: Supervisor) -> str | None:
    """Wait until the node (and the review app) accept connections; the reason when a child
    exits first (its own message is already on stderr) or nothing answers in time."""
    import socket
    import time

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    # The node says it listens (a port that answers may be another program's).
    ready = _ready_file(config, supervisor.pids()["node"])
    while not ready.exists():
        exited = supervisor.exited()
        if exited:
            where = f"DICOM {config.node.host}:{config.node.port}"
            return f"{exited[0]} exited with status {exited[1]} ({where}; its message is above)"
        if supervisor.stopping():
            return None
        if time.monotonic() > deadline:
            return f"the node did not start in {STARTUP_TIMEOUT_S:.0f} s"
        time.sleep(0.1)  # polling for a child's start-up
    ports = []
    if config.ui.enabled:
        ui_host = "127.0.0.1" if config.ui.host in ("0.0.0.0", "::") else config.ui.host
        ports.append(("review app", ui_host, config.ui.port))
    for name, address, port in ports:
        while True:
            exited = supervisor.exited()
            if exited:
                return f"{exited[0]} exited with status {exited[1]}"
            if supervisor.stopping():
                return None
            try:
                with socket.create_connection((address, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    waited = f"{STARTUP_TIMEOUT_S:.0f} s"
                    return f"the {name} did not listen on {address}:{port} in {waited}"
                time.sleep(0.1)  # polling a port while a child starts
    return None


def _ready_file(config: AidxConfig, pid: int) -> Path:
    """Written by a supervised node once it listens (removed when it stops)."""
    from aidx.doorbell import run_dir

    return run_dir(config.data_dir) / f"node-ready.{pid}"


def review_sessions(config: AidxConfig, store: Store) -> Callable[[str, str], Any]:
    """The DICOMweb service's check of a review-app session: the person it belongs to while it
    is live, by the review app's own rules (timeouts of the ``ui`` section)."""
    from dicom_node.dicomweb.access import Person
    from ui.accounts import Accounts

    accounts = Accounts(
        store,
        idle_timeout_s=config.ui.session_idle_timeout_s,
        max_age_s=config.ui.session_max_age_s,
    )

    def check(token: str, client: str) -> Person | None:
        user = accounts.validate(token, client)
        return None if user is None else Person(user.username, user.role)

    return check


def _serve_here(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.config import record_data_dir
    from aidx.doorbell import JOBS, RESULTS, Doorbell, ring
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
    stop = stop_on_signals()
    try:
        model_problem = check_pipeline(config)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.for_config(config)
        problem = storage_problem(config, store)
        if problem:
            store.close()
            print(f"aidx serve: cannot start: {problem}", file=sys.stderr)
            return EXIT_USAGE
        pool: WorkerPool | None = None
        publisher = _publisher(config, store)

        def on_complete(*_: object) -> None:
            if publisher is not None:
                publisher.notify()  # a task on the broker (pipeline.queue: celery)
                return
            if pool is not None:
                pool.notify()
            ring(config.data_dir, JOBS)  # workers in other processes

        outbox = not getattr(args, "no_outbox", False)
        service = NodeService(
            config,
            store,
            on_complete=on_complete,
            priority=priority_function(config, store),
            outbox=outbox,
            sessions=review_sessions(config, store) if config.dicomweb.enabled else None,
        )
        exporter = service.exporter
        pool = WorkerPool(
            config,
            store,
            0 if publisher is not None else config.pipeline.workers,
            # The outbox here, or in its own process (`aidx outbox run`).
            on_results=exporter.notify if exporter else lambda: _ring(config, RESULTS),
            poll_interval_s=config.pipeline.poll_interval_s,
        )
        results_bell = Doorbell(config.data_dir, RESULTS, exporter.notify) if exporter else None
        retention = _retention(config, store)
        service.start()
        pool.start()
        if retention is not None:
            retention.start()
        if publisher is not None:
            publisher.start()
        if results_bell is not None:
            results_bell.start()
    except (NodeStartError, OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if model_problem:
        log.warning("no model for inference: %s", model_problem)
    if not os.environ.get(SUPERVISED_ENV):
        record_data_dir(config.data_dir)
    metrics = None
    if config.metrics.port:
        health = _health(service, pool, config, model_problem is None)
        collectors: list[Any] = [service.scp.guard]
        if publisher is not None:
            collectors.append(publisher)  # queue depth and reachability of the broker
        metrics = MetricsServer(
            config.metrics.host, config.metrics.port, store, health, collectors, config.models.drift
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
        "%s: DICOM %s@%s:%d, %d worker(s)%s",
        "aidx node ready" if os.environ.get(SUPERVISED_ENV) else "aidx serving",
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
    ready = _ready_file(config, os.getpid())
    if os.environ.get(SUPERVISED_ENV):
        ready.parent.mkdir(parents=True, exist_ok=True)
        ready.touch()
    try:
        stop.wait()
    finally:
        ready.unlink(missing_ok=True)
        if ui_server is not None:
            ui_server.stop()  # type: ignore[attr-defined]
        if metrics is not None:
            metrics.stop()
        if results_bell is not None:
            results_bell.stop()
        if retention is not None:
            retention.stop()
        if publisher is not None:
            publisher.stop()
        service.stop()
        pool.stop()
        store.close()
    if pool.busy():  # a job left running: see worker()
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


def storage_problem(config: AidxConfig, store: Store) -> str | None:
    """Why this host cannot use its storage root (storage.root, else data_dir), or None: it
    must be writable, and hold the files the store lists last. The store records them relative
    to the root, so this host finds them under its own root, wherever it mounts the share; a
    host that does not see the share, or names another root, would fail every study or write
    results that the other hosts cannot read."""
    import tempfile

    root = config.storage_root()
    setting = "storage.root" if config.storage.root else "data_dir"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".aidx-write-check-"):
            pass
    except OSError as exc:
        why = exc.strerror or exc
        return f"{setting} {root} is not writable ({why}); fix its permissions or set {setting}"
    recent = store.recent_instance_paths(5)
    if recent and not any(Path(p).is_file() for p in recent):
        return (
            f"{setting} {root}: none of the files the store lists last are here (e.g. "
            f"{recent[0]}): this host does not see the storage the store's other hosts write; "
            f"set {setting} to the folder where this host mounts the shared root"
        )
    if recent and not any(Path(p).is_relative_to(root) for p in recent):
        return (
            f"{setting} {root}: the files the store lists last lie elsewhere (e.g. {recent[0]}); "
            "set storage.root to the shared root that every host of this store uses"
        )
    return None


def _retention(config: AidxConfig, store: Store) -> RetentionLoop | None:
    """storage.retention, applied in this process (the node's, under the supervisor)."""
    if not config.storage.retention.enabled():
        return None
    from aidx.pipeline.retention import RetentionLoop

    return RetentionLoop(store, config.storage.retention)


def _publisher(config: AidxConfig, store: Store) -> Publisher | None:
    """With pipeline.queue: celery, the node publishes its jobs to the broker (and runs no
    inference itself: `aidx worker` consumes them, on this host or others)."""
    if config.pipeline.queue != "celery":
        return None
    from aidx.pipeline.dispatch import Publisher

    if config.pipeline.workers and os.environ.get(SUPERVISED_ENV) is None:
        log.warning(
            "pipeline.queue celery: this process runs no inference; start `aidx worker` (on this "
            "host or others) for pipeline.workers"
        )
    return Publisher(config, store)


def _health(
    service: NodeService, pool: WorkerPool, config: AidxConfig, model_ok: bool
) -> Callable[[], dict[str, bool]]:
    """The node's /healthz checks. Under `aidx serve` the node's siblings count too: the
    workers and the review app are alive as the supervisor's children (its state file)."""
    from aidx.supervisor import children_alive

    supervised = bool(os.environ.get(SUPERVISED_ENV))
    state = _supervisor_state(config)

    def checks() -> dict[str, bool]:
        result = {"dicom_listener": service.scp.running, "model": model_ok}
        if service.dicomweb is not None:
            result["dicomweb"] = service.dicomweb.running
        if not supervised:
            result["workers"] = pool.alive() or config.pipeline.workers == 0
            return result
        try:
            names = [n for n in json.loads(state.read_text())["children"] if n != "node"]
        except (OSError, ValueError, KeyError, TypeError):
            return {**result, "supervisor": False}
        alive = children_alive(state, names)
        # pipeline.workers 0: the workers run apart (`aidx worker`), their health is their own.
        return {**result, "workers": True, **{n.replace(" ", "_"): ok for n, ok in alive.items()}}

    return checks


def _supervisor_state(config: AidxConfig) -> Path:
    """The supervisor's children and their pids (aidx.supervisor.Supervisor.state_path)."""
    from aidx.doorbell import run_dir

    return run_dir(config.data_dir) / "supervisor.json"


def _send_demo(config: AidxConfig, port: int) -> None:
    """Write the demo study (if absent) and send it to this node, as a PACS would."""
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.config import DestinationConfig
    from aidx.demo import write_demo_study
    from aidx.store.store import Store
    from dicom_node.export import SendError, send_files
    from dicom_node.parse import read_file

    try:
        written = write_demo_study(config)
        dicom_dir = Path(getattr(written, "dicom_dir", written))
        files = sorted(dicom_dir.glob("*.dcm"))
        study_uid = read_file(files[0].read_bytes(), "AIDX_DEMO").study_uid
        store = Store.for_config(config)
        try:
            before = _study_state(store, study_uid)
            host = "127.0.0.1" if config.node.host in ("0.0.0.0", "::") else config.node.host
            target = DestinationConfig(ae_title=config.node.ae_title, host=host, port=port)
            send_files(target, "AIDX_DEMO", files)
            after = _study_state(store, study_uid)
        finally:
            store.close()
    except (SendError, OSError, ValueError, SQLAlchemyError) as exc:
        log.error("demo: could not send the demo study: %s", exc)
        return
    if before is not None and before == after:
        # Every image was a re-send of one already stored: no new version, so no new job.
        log.info(
            "demo: sent %d images, all already stored (the demo study was received before); "
            "nothing new to analyse. Its result: aidx --data-dir %s status %s",
            len(files),
            config.data_dir,
            study_uid,
        )
        return
    log.info(
        "demo: sent %d images; the result follows after the %.0f s quiet period and "
        "inference. Watch it with: aidx --data-dir %s status",
        len(files),
        config.node.study_quiet_period_s,
        config.data_dir,
    )


def _study_state(store: Store, study_uid: str) -> tuple[int, int] | None:
    """(instances, version) of a stored study; None when it is not in the store."""
    study = store.study(study_uid)
    return None if study is None else (int(study["instance_count"]), int(study["version"]))


def _ring(config: AidxConfig, kind: str) -> None:
    from aidx.doorbell import ring

    ring(config.data_dir, kind)
