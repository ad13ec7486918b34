"""/metrics and /healthz over real HTTP, with figures read from a real store."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from aidx.pipeline.metrics import INFERENCE_BUCKETS, MetricsServer
from aidx.store.jobs import Delivery, ResultRecord
from aidx.store.store import InstanceRecord, Store
from tests.aidx.instances import instance_record

STUDY = "1.2.826.0.1.3680043.10.543.1"
SERIES = STUDY + ".1"


def record(n: int, size: int, study: str = STUDY, series: str = SERIES) -> InstanceRecord:
    return instance_record(study, n, series, size=size)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'aidx.db'}")
    yield s
    s.close()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(server: MetricsServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}."""
    status, content_type, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_read_the_store_at_scrape_time(store: Store) -> None:
    t0 = 1_700_000_000.0
    for n, size in enumerate((1000, 2000, 3000)):
        store.index_instance(record(n, size), t0 + n, quiet_period_s=5)
    # A second study still receiving, and a duplicate that must not count twice.
    other = STUDY + "9"
    store.index_instance(record(0, 500, other, other + ".1"), t0, quiet_period_s=5)
    store.index_instance(record(0, 1000), t0 + 3, quiet_period_s=5)
    job_id = store.complete_study(STUDY, t0 + 10)
    assert job_id is not None

    server = MetricsServer("127.0.0.1", 0, store, lambda: {})
    server.start()
    try:
        before = scrape(server)
        assert before["aidx_queue_depth"][()] == 1
        assert before["aidx_jobs"][(("state", "queued"),)] == 1
        assert before["aidx_inference_seconds_count"][()] == 0

        job = store.claim_job("host:1:0", lease_s=60, alive=lambda _pid: True)
        assert job is not None and job.id == job_id
        rec = ResultRecord(
            series_uid=SERIES,
            model="lung-nodule@1.0.0",
            findings_path="/results/findings.json",
            sr_path="/results/sr.dcm",
            sr_sop_uid="1.2.3.4",
            seg_path="/results/seg.dcm",
            finding_count=2,
            max_probability=0.9,
        )
        delivery = Delivery("pacs", f"job:{job.id}", ["/results/sr.dcm", "/results/seg.dcm"])
        assert store.finish_job(job, "host:1:0", [rec], [delivery], inference_s=12.5)
        (item,) = store.outbox_items()
        store.mark_attempt_failed(item.id, "association rejected", next_attempt_at=t0)
        store.mark_attempt_failed(item.id, "association rejected", next_attempt_at=t0)
        store.mark_sent(item.id)

        m = scrape(server)
    finally:
        server.stop()

    assert m["aidx_instances_received_total"][()] == 4
    assert m["aidx_bytes_received_total"][()] == 1000 + 2000 + 3000 + 500
    studies = {labels[0][1]: value for labels, value in m["aidx_studies"].items()}
    assert studies == {"receiving": 1, "complete": 1, "updated": 0}
    jobs = {labels[0][1]: value for labels, value in m["aidx_jobs"].items()}
    assert jobs == {
        "queued": 0,
        "running": 0,
        "results_ready": 0,
        "sent": 1,
        "failed": 0,
        "not_applicable": 0,
        "superseded": 0,
    }
    assert m["aidx_queue_depth"][()] == 0
    buckets = {dict(k)["le"]: v for k, v in m["aidx_inference_seconds_bucket"].items()}
    assert len(buckets) == len(INFERENCE_BUCKETS) + 1
    assert buckets["10.0"] == 0 and buckets["15.0"] == 1 and buckets["+Inf"] == 1
    assert m["aidx_inference_seconds_count"][()] == 1
    assert m["aidx_inference_seconds_sum"][()] == 12.5
    assert m["aidx_send_retries_total"][()] == 2
    outbox = {labels[0][1]: value for labels, value in m["aidx_outbox_items"].items()}
    assert outbox == {"pending": 0, "sending": 0, "sent": 1, "failed": 0}
    # The default process collector is there too.
    assert "process_cpu_seconds_total" in m


def test_healthz_is_503_when_a_check_fails(store: Store) -> None:
    listening = {"dicom_listener": True, "workers": True}
    server = MetricsServer("127.0.0.1", 0, store, lambda: dict(listening))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, content_type, body = get(base + "/healthz")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {
            "status": "ok",
            "checks": {"store": True, "dicom_listener": True, "workers": True},
        }

        listening["workers"] = False
        status, _, body = get(base + "/healthz")
        assert status == 503
        assert json.loads(body) == {
            "status": "unhealthy",
            "checks": {"store": True, "dicom_listener": True, "workers": False},
        }

        assert get(base + "/nothing-here")[0] == 404
        assert get(base + "/metrics/")[0] == 404
    finally:
        server.stop()


def test_healthz_reports_a_store_that_does_not_answer(tmp_path: Path) -> None:
    broken = Store(f"sqlite:///{tmp_path / 'aidx.db'}")
    broken.url = "sqlite:////nonexistent-dir/aidx.db"
    broken.engine.dispose()
    broken.engine = create_engine(broken.url)
    server = MetricsServer("127.0.0.1", 0, broken, lambda: {"workers": True})
    server.start()
    try:
        status, _, body = get(f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503
        assert json.loads(body)["checks"] == {"store": False, "workers": True}
        assert get(f"http://127.0.0.1:{server.port}/metrics")[0] == 500
    finally:
        server.stop()


def test_a_taken_port_says_what_to_change(store: Store) -> None:
    first = MetricsServer("127.0.0.1", 0, store, lambda: {})
    first.start()
    try:
        second = MetricsServer("127.0.0.1", first.port, store, lambda: {})
        with pytest.raises(OSError, match=r"metrics\.port"):
            second.start()
    finally:
        first.stop()
