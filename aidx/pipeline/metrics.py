"""Prometheus metrics and the health check of a running aidx node, over HTTP.

The figures are read from the store at scrape time (a few aggregate queries), not counted in
process memory: they are the same whichever process (node, separate workers) did the work, and
they survive a restart. ``GET /metrics`` serves them in the Prometheus text format with the
process collector's figures; ``GET /healthz`` answers 200 or 503 with the result of each check.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select, text
from sqlalchemy.engine import make_url

from aidx.store.jobs import JOB_STATES, QUEUED
from aidx.store.schema import instances, jobs, outbox, studies

from .drift import check as check_drift

if TYPE_CHECKING:
    from aidx.config_models import DriftConfig
    from aidx.store.store import Store

log = logging.getLogger("aidx.metrics")

STUDY_STATES = ("receiving", "complete", "updated")
OUTBOX_STATES = ("pending", "sending", "sent", "failed")
# Seconds of inference per study: a small CT on a GPU takes about a second, a large one on a CPU
# about two minutes.
INFERENCE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)

HealthChecks = Callable[[], dict[str, bool]]


class StoreCollector:
    """A prometheus-client collector that reads the store on every scrape."""

    def __init__(self, store: Store, drift: DriftConfig | None = None) -> None:
        self.store = store
        self.drift = drift

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering the collector does not query the store.
        return [*self._families(), *self._drift_families()]

    def collect(self) -> Iterable[Metric]:
        return [*self._collect(), *self._collect_drift()]

    def _collect_drift(self) -> list[Metric]:
        """Per model version: the acceptance ratio over the drift window and the alert (with
        the rule off, the ratio only)."""
        ratio, alert = self._drift_families()
        if self.drift is None:
            return []
        for m in check_drift(self.store, self.drift):
            if m.ratio is not None:
                ratio.add_metric([m.model], m.ratio)
            alert.add_metric([m.model], 1.0 if m.alerting else 0.0)
        return [ratio, alert]

    @staticmethod
    def _drift_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "aidx_model_acceptance_ratio",
                "AI findings accepted / decided in reviews signed within models.drift.window_days",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "aidx_model_drift_alert",
                "1 when the acceptance ratio fell below models.drift.min_acceptance",
                labels=["model"],
            ),
        )

    def _collect(self) -> list[Metric]:
        received, bytes_, studies_f, jobs_f, depth, inference, retries, outbox_f = self._families()
        with self.store.engine.connect() as conn:
            count, size = conn.execute(
                select(func.count(), func.coalesce(func.sum(instances.c.size), 0))
            ).one()
            received.add_metric([], float(count))
            bytes_.add_metric([], float(size))

            by_state = _counts(
                conn.execute(select(studies.c.state, func.count()).group_by(studies.c.state))
            )
            for state in _states(STUDY_STATES, by_state):
                studies_f.add_metric([state], float(by_state.get(state, 0)))

            by_state = _counts(
                conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
            )
            for state in _states(JOB_STATES, by_state):
                jobs_f.add_metric([state], float(by_state.get(state, 0)))
            depth.add_metric([], float(by_state.get(QUEUED, 0)))

            # One row: the cumulative count of each bucket, the total count and the sum.
            finished = jobs.c.inference_s.is_not(None)
            row = conn.execute(
                select(
                    *(
                        func.sum(case((jobs.c.inference_s <= le, 1), else_=0))
                        for le in INFERENCE_BUCKETS
                    ),
                    func.count(),
                    func.coalesce(func.sum(jobs.c.inference_s), 0.0),
                ).where(finished)
            ).one()
            total = int(row[len(INFERENCE_BUCKETS)])
            cumulative = row[: len(INFERENCE_BUCKETS)]
            buckets = [
                (str(le), float(n or 0))
                for le, n in zip(INFERENCE_BUCKETS, cumulative, strict=True)
            ]
            buckets.append(("+Inf", float(total)))
            inference.add_metric([], buckets, float(row[-1]))

            outbox_rows = conn.execute(
                select(
                    outbox.c.state,
                    func.count(),
                    func.coalesce(func.sum(outbox.c.attempts), 0),
                ).group_by(outbox.c.state)
            ).all()
        items = {str(state): int(n) for state, n, _ in outbox_rows}
        attempts = sum(int(a) for _, _, a in outbox_rows)
        # Every sent item counted its one successful attempt; the rest of the attempts failed.
        retries.add_metric([], float(max(attempts - items.get("sent", 0), 0)))
        for state in _states(OUTBOX_STATES, items):
            outbox_f.add_metric([state], float(items.get(state, 0)))
        return [received, bytes_, studies_f, jobs_f, depth, inference, retries, outbox_f]

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            CounterMetricFamily(
                "aidx_instances_received_total",
                "DICOM instances received and indexed (not duplicates)",
            ),
            CounterMetricFamily(
                "aidx_bytes_received_total", "Bytes of the DICOM instances received, as stored"
            ),
            GaugeMetricFamily("aidx_studies", "Studies by state", labels=["state"]),
            GaugeMetricFamily("aidx_jobs", "Study jobs by state", labels=["state"]),
            GaugeMetricFamily("aidx_queue_depth", "Jobs queued and waiting for a worker"),
            HistogramMetricFamily(
                "aidx_inference_seconds", "Inference time of the jobs that produced results"
            ),
            # Goes down when `aidx outbox retry` resets attempts (Prometheus reads a counter
            # reset).
            CounterMetricFamily(
                "aidx_send_retries_total", "Failed attempts to send outbox items to a destination"
            ),
            GaugeMetricFamily("aidx_outbox_items", "Outbox items by state", labels=["state"]),
        )


def _counts(rows: Iterable[Any]) -> dict[str, int]:
    return {str(state): int(n) for state, n in rows}


def _states(known: Iterable[str], found: dict[str, int]) -> list[str]:
    """Every known state (zeros included, so the series never vanish) and any other found."""
    known = list(known)
    return known + sorted(set(found) - set(known))


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port``, served from a daemon thread.

    ``port`` 0 binds a free port (read it back from :attr:`port`); turning the endpoint off
    (``metrics.port: 0`` in the configuration) is the caller's decision, not this class's.
    ``health`` returns further named checks (``dicom_listener``, ``workers``...) to add to the
    built-in ``store`` check; the answer is 200 only when every check is true.
    """

    def __init__(
        self,
        host: str,
        port: int,
        store: Store,
        health: HealthChecks,
        collectors: Iterable[Collector] = (),
        drift: DriftConfig | None = None,
    ) -> None:
        """``collectors``: figures of this process beside the store's (the node's connection
        refusals); ``drift``: the drift rule (``models.drift``)."""
        self.host = host
        self.requested_port = port
        self.store = store
        self.health = health
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StoreCollector(store, drift))
        for collector in collectors:
            self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"owner": self})
        server_class = _Server6 if ":" in self.host else ThreadingHTTPServer
        try:
            server = server_class((self.host, self.requested_port), handler)
        except OSError as exc:
            raise OSError(
                f"metrics: cannot listen on {self.host}:{self.requested_port}: "
                f"{exc.strerror or exc}; set metrics.port to a free port, or to 0 to turn the "
                "endpoint off"
            ) from exc
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="aidx-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics and health on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def checks(self) -> dict[str, bool]:
        checks = {"store": self._store_ok()}
        try:
            checks.update(self.health())
        except Exception:  # a broken check is an unhealthy node, and the log says why
            log.exception("health check callback failed")
            checks["health_callback"] = False
        return checks

    def _store_ok(self) -> bool:
        try:
            with self.store.engine.connect() as conn:
                conn.execute(text("SELECT 1")).scalar_one()
        except Exception:
            log.exception("health check: the store does not answer (%s)", _safe_url(self.store))
            return False
        return True


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    owner: ClassVar[MetricsServer]
    server_version = "aidx-metrics"

    def do_GET(self) -> None:  # the name http.server dispatches to
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                self._reply(HTTPStatus.OK, self.owner.metrics(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                checks = self.owner.checks()
                ok = all(checks.values())
                body = {"status": "ok" if ok else "unhealthy", "checks": checks}
                status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._reply(status, json.dumps(body).encode(), "application/json")
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"not found: try /metrics or /healthz\n")
        except Exception:
            log.exception("metrics: %s failed", path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error; see the node's log\n")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        log.debug("%s %d", urlsplit(self.path).path, int(status))

    def log_message(self, format: str, *args: object) -> None:
        # http.server logs whole request lines and client addresses to stderr; we log only the
        # path and the status (in _reply).
        del format, args


def _safe_url(store: Store) -> str:
    return make_url(store.url).render_as_string(hide_password=True)
