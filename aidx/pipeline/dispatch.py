"""Jobs through Celery and a broker (``pipeline.queue: celery``; the ``[scale]`` extra).

The store stays the job ledger; the broker only carries "run job N" to whichever host's
``aidx worker`` is free:

- the node publishes a task ``aidx.run_job(N)`` when it records job N (:class:`Publisher`), on
  ``pipeline.celery.queue``, with the job's priority mapped onto RabbitMQ's priority levels;
  every ``republish_interval_s`` (and at start) it publishes again each queued job it has not
  published itself (a broker that was down, a node restarted);
- a worker runs a Celery consumer (:func:`run_workers`): prefetch 1, ``acks_late`` and
  ``reject_on_worker_lost``, so a task whose worker dies is delivered again; the task claims
  job N in the store (:meth:`aidx.store.jobs.JobQueue.claim_job_id`) before running it, so a
  task delivered twice runs once, and a task delivered again because its consumer died takes
  the job over at once instead of waiting for the lease to run out. Results keep their derived
  UIDs whoever runs the job.

Celery is imported only here, and only with ``pipeline.queue: celery``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric

from aidx.background import BackgroundLoop
from aidx.config import AidxConfig, CeleryConfig
from aidx.pipeline.routing import queue_function
from aidx.pipeline.worker import Worker
from aidx.store.store import safe_url
from models.registry import site_registry

if TYPE_CHECKING:
    from celery import Celery

    from aidx.store.store import Store

log = logging.getLogger("aidx.dispatch")

TASK = "aidx.run_job"


class BrokerError(RuntimeError):
    """The broker cannot be reached; the message names its URL (password masked) and the fix."""


def safe_broker_url(url: str) -> str:
    """The broker URL with its password masked, as the store's URL (aidx.store.store.safe_url)."""
    try:
        return safe_url(url)
    except Exception:  # noqa: BLE001 - not an RFC-1738 URL: show only its scheme
        return url.split("://", 1)[0] + "://..."


def broker_priority(priority: int, celery: CeleryConfig) -> int:
    """A job's priority (0-100) on the broker's 0..max_priority scale (any priority rule, even
    1, lifts a job above the unprioritised ones)."""
    p = min(max(priority, 0), 100)
    return min(celery.max_priority, -(-p * celery.max_priority // 100))


def celery_app(config: AidxConfig) -> Celery:
    try:
        from celery import Celery  # noqa: PLC0415 - only with pipeline.queue: celery
        from kombu import Queue  # type: ignore[attr-defined]  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(
            "pipeline.queue: celery needs Celery: pip install 'aidx[scale]' "
            "(or set pipeline.queue: store)"
        ) from exc
    celery = config.pipeline.celery
    app = Celery("aidx", broker=celery.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=celery.queue,
        task_queues=[
            Queue(  # type: ignore[no-untyped-call]
                name, routing_key=name, queue_arguments=_queue_args(celery)
            )
            for name in sorted(
                {celery.queue, *(r.queue for r in config.pipeline.routes if r.queue)}
            )
        ],
        task_queue_max_priority=celery.max_priority,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        # Task events, so that Flower (or `celery events`) shows the tasks, not only workers.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Lost connections are retried by Celery; a task that cannot be published is the
        # Publisher's to retry, not the caller's to wait for.
        broker_transport_options={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )
    return app


def _queue_args(celery: CeleryConfig) -> dict[str, Any]:
    return {"x-max-priority": celery.max_priority}


def check_broker(app: Celery, url: str) -> None:
    """Connect once; BrokerError naming the URL and the fix when the broker does not answer."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
    except Exception as exc:  # kombu raises many kinds; all mean "not reachable"
        raise BrokerError(
            f"cannot reach the broker at {safe_broker_url(url)} ({exc}); start RabbitMQ there, "
            "or set pipeline.celery.broker_url (or pipeline.queue: store)"
        ) from exc


class Publisher(BackgroundLoop):
    """The node's side: publishes a task for each job recorded, and again for queued jobs it
    has not published (at start, then every ``republish_interval_s``). A broker that is down
    delays publishing, never receiving: the jobs wait in the store."""

    thread_name = "aidx-publish"

    def __init__(self, config: AidxConfig, store: Store, app: Celery | None = None) -> None:
        super().__init__()
        self.celery = config.pipeline.celery
        self.store = store
        self.app = app or celery_app(config)
        self.queue_of = queue_function(config, store)  # pipeline.routes[].queue
        self._published: set[int] = set()
        self._failing = False

    def publish_queued(self) -> int:
        """Publish every queued job not published by this process; how many were published."""
        published = 0
        for job_id, priority, study_uid in self.store.queued_jobs():
            if job_id in self._published:
                continue
            queue = self.queue_of(study_uid)
            self.app.send_task(
                TASK,
                args=[job_id],
                queue=queue,
                priority=broker_priority(priority, self.celery),
            )
            self._published.add(job_id)
            published += 1
            log.info("job %d published to queue %s", job_id, queue)
        return published

    def queue_depth(self) -> int | None:
        """Tasks waiting in the broker's queue (not yet delivered to a worker); None when the
        broker does not answer."""
        try:
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
                declared = conn.default_channel.queue_declare(
                    queue=self.celery.queue,
                    passive=True,  # only asks; a queue not there yet is "not found"
                )
                return int(declared.message_count)
        except Exception as exc:  # noqa: BLE001 - kombu and amqp raise many kinds
            if "NOT_FOUND" in str(exc) or "404" in str(exc):
                return 0  # a queue no task has been published to yet: empty
            log.debug("broker queue depth: %s", exc)
            return None

    def collect(self) -> Iterable[Metric]:
        """Prometheus families read from the broker on each scrape (the node's /metrics)."""
        depth = GaugeMetricFamily(
            "aidx_broker_queue_messages",
            "Tasks waiting in the broker's queue (pipeline.queue celery)",
            labels=["queue"],
        )
        up = GaugeMetricFamily("aidx_broker_up", "Whether the broker answered this scrape")
        messages = self.queue_depth()
        if messages is not None:
            depth.add_metric([self.celery.queue], float(messages))
        up.add_metric([], 0.0 if messages is None else 1.0)
        return [depth, up]

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("aidx_broker_queue_messages", "", labels=["queue"]),
            GaugeMetricFamily("aidx_broker_up", ""),
        ]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_queued()
                if self._failing:
                    log.info("broker %s reachable again", safe_broker_url(self.celery.broker_url))
                self._failing = False
                timeout = self.celery.republish_interval_s
            except Exception as exc:  # noqa: BLE001 - the jobs stay queued; tried again
                if not self._failing:
                    log.warning(
                        "cannot publish jobs to the broker at %s (%s); they stay queued in the "
                        "store and are published when it answers",
                        safe_broker_url(self.celery.broker_url),
                        exc,
                    )
                self._failing = True
                timeout = min(5.0, self.celery.republish_interval_s)
            self._sleep(timeout)
            # The published set only grows with this process's jobs; forget the finished ones.
            if len(self._published) > 10_000:
                self._published.clear()


def run_workers(
    config: AidxConfig,
    store: Store,
    count: int,
    queues: list[str],
    on_results: Any = None,
) -> None:
    """Consume ``queues`` with ``count`` workers (threads; one: the main thread) until SIGTERM
    or Ctrl-C (Celery's warm shutdown: the running job finishes)."""
    app = celery_app(config)
    check_broker(app, config.pipeline.celery.broker_url)
    registry = site_registry(config.models_dir())
    local = threading.local()
    numbers = iter(range(1_000_000))
    lock = threading.Lock()

    def worker() -> Worker:
        if not hasattr(local, "worker"):
            with lock:
                n = next(numbers)
            local.worker = Worker(config, store, n, registry, on_results)
        w: Worker = local.worker
        return w

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True
    )
    def run_job(task: Any, job_id: int) -> None:
        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        ran = worker().run_job_id(int(job_id), takeover=redelivered)
        if not ran:
            log.info("job %d: nothing to run (done, superseded or held by another worker)", job_id)
        # Shadow runs are not published to the broker: the consumer that finished a job takes
        # the oldest one after it (aidx.store.shadow).
        worker().run_shadow_once()

    hostname = f"aidx-worker@{socket.gethostname()}.{time.time_ns() % 1_000_000}"
    # Threads, even for one worker: with late acknowledgement, Celery's "solo" pool took the
    # next task only every ~10 s (seen in tests/pipeline/test_celery_dispatch.py).
    pool = "threads"
    log.info(
        "aidx worker: %d worker(s) on Celery, queue(s) %s, broker %s",
        count,
        ", ".join(queues),
        safe_broker_url(config.pipeline.celery.broker_url),
    )
    app.Worker(
        queues=queues,
        concurrency=max(count, 1),
        pool=pool,
        hostname=hostname,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel=logging.getLevelName(logging.getLogger().level),
    ).start()
