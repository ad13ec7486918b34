"""`aidx status`: the recent studies and one study's timeline, as text and as JSON."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from aidx.cli import main
from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE
from aidx.store.jobs import Delivery, ResultRecord
from aidx.store.store import InstanceRecord, Store
from tests.aidx.instances import instance_record

DONE = "1.2.826.0.1.3680043.10.543.10"
WAITING = "1.2.826.0.1.3680043.10.543.20"
NOTHING = "1.2.826.0.1.3680043.10.543.30"
# Recent, so that the steps the store timestamps itself (time.time()) come minutes later.
T0 = time.time() - 600
PATIENT_DETAILS = ("DOE^JANE", "PID-SECRET-77", "19600101", "ACC-SECRET-5")


def record(study: str, n: int) -> InstanceRecord:
    name, patient_id, birth_date, accession = PATIENT_DETAILS
    return instance_record(
        study,
        n,
        patient_id=patient_id,
        patient_name=name,
        birth_date=birth_date,
        accession_number=accession,
    )


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A store like `aidx serve` leaves it: one study sent (after a failed attempt), one failed,
    one still receiving."""
    for name in [k for k in os.environ if k.startswith("AIDX_")]:
        monkeypatch.delenv(name)
    store = Store(f"sqlite:///{(tmp_path / 'aidx.db').resolve()}")
    worker = "host:1:0"
    for n in range(3):
        store.index_instance(record(DONE, n), T0 + n, quiet_period_s=10)
    store.complete_study(DONE, T0 + 12.0, priority=5)
    job = store.claim_job(worker, lease_s=60, now=T0 + 13, alive=lambda _pid: True)
    assert job is not None
    result = ResultRecord(
        series_uid=DONE + ".1",
        model="lung-nodule@1.0.0",
        findings_path="/results/1/findings.json",
        sr_path="/results/1/sr.dcm",
        sr_sop_uid="1.2.3.4",
        seg_path="/results/1/seg.dcm",
        finding_count=2,
        max_probability=0.93,
    )
    deliveries = [Delivery("pacs", f"job:{job.id}", [result.sr_path, str(result.seg_path)])]
    assert store.finish_job(job, worker, [result], deliveries, inference_s=4.2)
    (item,) = store.outbox_items()
    store.mark_attempt_failed(item.id, "association rejected by PACS", next_attempt_at=T0 + 60)
    store.mark_sent(item.id)

    store.index_instance(record(NOTHING, 0), T0 + 100, quiet_period_s=10)
    store.complete_study(NOTHING, T0 + 111)
    job = store.claim_job(worker, lease_s=60, now=T0 + 112, alive=lambda _pid: True)
    assert job is not None
    store.fail_job(job, worker, "no CT series with at least 20 slices", max_attempts=1)

    store.index_instance(record(WAITING, 0), T0 + 200, quiet_period_s=10)
    store.close()
    yield tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_lists_recent_studies_latest_first(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "status")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["STUDY", "UID", "IMAGES", "STUDY"]
    assert [line.split()[0] for line in lines[1:]] == [WAITING, NOTHING, DONE]
    assert lines[1].split()[1:4] == ["1", "receiving", "-"]
    assert lines[2].split()[1:4] == ["1", "complete", "failed"]
    assert lines[2].endswith("no CT series with at least 20 slices")
    # The REVIEW column: no review yet (`-`); tests/ui/test_signoff checks a signed one.
    assert lines[3].split()[1:6] == ["3", "complete", "sent", "-", "5"]
    assert not any(secret in out for secret in PATIENT_DETAILS)

    code, out, _ = run(capsys, "--data-dir", str(data_dir), "status", "--json", "--limit", "2")
    assert code == EXIT_OK
    studies = json.loads(out)["studies"]
    assert [s["study_uid"] for s in studies] == [WAITING, NOTHING]
    assert studies[1]["job_state"] == "failed"
    assert studies[1]["reason"] == "no CT series with at least 20 slices"
    assert studies[0]["job_state"] is None and studies[0]["instances"] == 1


def test_shows_one_study_timeline_results_and_deliveries(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "status", DONE)
    assert code == EXIT_OK, out
    assert not any(secret in out for secret in PATIENT_DETAILS)
    timeline = [
        line for line in out.split("Timeline")[1].split("Results")[0].splitlines()[1:] if line
    ]
    # Columns: time (23 characters), offset (12), event name.
    names = [line[41:59].strip() for line in timeline]
    assert names == [
        "first image",
        "last image",
        "complete",
        "inference_started",
        "inference_done",
        "send_queued",
        "results_ready",
        "send_retry",
        "sent",
        "sent",
    ]
    offsets = [line[27:39].strip() for line in timeline]
    # The last image came at T0 + 2; the study completed 10 s (its quiet period) later, and
    # inference finished about ten minutes after that.
    assert offsets[:4] == ["-2.0 s", "+0.0 s", "+10.0 s", "+11.0 s"]
    # Sent "now", about 10 minutes after T0, which is taken when the module is collected: on a
    # loaded machine the test may run minutes after collection.
    sent = re.fullmatch(r"\+(\d+) min \d\d s", offsets[4])
    assert sent and int(sent.group(1)) >= 9, offsets[4]
    assert "lung-nodule@1.0.0" in out and "2 findings" in out
    assert "/results/1/sr.dcm" in out and "/results/1/seg.dcm" in out
    destinations = out.split("Destinations")[1].strip().splitlines()
    assert destinations[0].split()[:4] == ["pacs", "sent", "attempts", "2"]
    assert "all destinations" in out

    code, out, _ = run(capsys, "--data-dir", str(data_dir), "status", DONE, "--json")
    assert code == EXIT_OK
    report = json.loads(out)
    assert report["study_uid"] == DONE and report["instances"] == 3
    assert report["first_image_offset_s"] == -2.0
    events = report["events"]
    assert events[0]["event"] == "complete" and events[0]["offset_s"] == 10.0
    assert events[-1] == {**events[-1], "event": "sent", "detail": "all destinations"}
    assert report["results"] == [
        {
            "job_id": report["jobs"][0]["id"],
            "study_version": 1,
            "model": "lung-nodule@1.0.0",
            "shadow": False,
            "series_uid": DONE + ".1",
            "findings": 2,
            "max_probability": 0.93,
            "findings_path": "/results/1/findings.json",
            "sr_path": "/results/1/sr.dcm",
            "seg_path": "/results/1/seg.dcm",
        }
    ]
    (delivery,) = report["destinations"]
    assert delivery["destination"] == "pacs" and delivery["state"] == "sent"
    assert delivery["attempts"] == 2 and delivery["sent_at"] is not None
    assert delivery["last_error"] is None and delivery["files"] == 2
    assert report["jobs"][0]["state"] == "sent" and report["jobs"][0]["inference_s"] == 4.2
    started = datetime.fromisoformat(report["jobs"][0]["started_at"]).timestamp()
    assert started == pytest.approx(T0 + 13, abs=1e-3)  # claimed by the worker then
    assert not any(secret in out for secret in PATIENT_DETAILS)


def test_a_failed_study_shows_why_and_no_deliveries(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "status", NOTHING)
    assert code == EXIT_OK
    assert "failed" in out and "no CT series with at least 20 slices" in out
    assert out.split("Destinations")[1].split() == ["none"]


def test_unknown_study_or_data_dir_is_a_usage_error(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--data-dir", str(data_dir), "status", "1.2.3.999")
    assert code == EXIT_USAGE and out == ""
    assert "no study 1.2.3.999" in err

    empty = tmp_path_factory.mktemp("empty")
    code, _, err = run(capsys, "--data-dir", str(empty), "status")
    assert code == EXIT_USAGE
    assert "no store at" in err and "--data-dir" in err
    assert not (empty / "aidx.db").exists()

    code, _, err = run(capsys, "--data-dir", str(data_dir), "status", "--limit", "0")
    assert code == EXIT_USAGE and "--limit" in err


def test_the_timeline_keeps_the_order_the_store_wrote_even_when_clocks_disagree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that read its clock just before the assembler completed the study claims the job
    with an earlier time: the timeline still shows the completion first (a loaded CI run did)."""
    for name in [k for k in os.environ if k.startswith("AIDX_")]:
        monkeypatch.delenv(name)
    store = Store(f"sqlite:///{(tmp_path / 'aidx.db').resolve()}")
    store.index_instance(record(DONE, 0), T0, quiet_period_s=10)
    store.complete_study(DONE, T0 + 12.0)
    job = store.claim_job("host:1:0", lease_s=60, now=T0 + 11.99, alive=lambda _pid: True)
    assert job is not None
    store.close()
    code, out, _ = run(capsys, "--data-dir", str(tmp_path), "status", DONE, "--json")
    assert code == EXIT_OK, out
    assert [e["event"] for e in json.loads(out)["events"]] == ["complete", "inference_started"]
