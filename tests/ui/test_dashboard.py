"""The dashboard's figures (ui/dashboard.py) from a real AI result and real review decisions:
turnaround per stage, final counts per study, rates per model version, the summary, ``since``,
and an empty store."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from aidx.store.schema import jobs, patients, results, studies
from aidx.store.store import Store
from dicom_node.parse import read_file
from inference.findings import FindingsReport
from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from ui import dashboard
from ui.review import Reviews

SIGNED_SR = "1.2.826.0.1.3680043.8.498.1"


class Clock:
    """The review's clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def study(tmp_path: Path, store_url: str) -> ReviewedStudy:
    return reviewed_study(tmp_path, store_url=store_url)


def _times(store: Store) -> dict[str, Any]:
    """The fixture's receipt, AI result and job figures, as the store holds them."""
    with store.engine.connect() as conn:
        row = conn.execute(
            select(
                studies.c.last_arrival,
                results.c.created_at,
                results.c.model,
                jobs.c.inference_s,
            )
            .join(results, results.c.study_uid == studies.c.study_uid)
            .join(jobs, jobs.c.id == results.c.job_id)
        ).one()
    return dict(row._mapping)


def test_figures_follow_the_latest_decisions_and_the_first_signoff(
    study: ReviewedStudy, tmp_path: Path
) -> None:
    t = _times(study.store)
    received, result_at = t["last_arrival"], t["created_at"]
    clock = Clock(result_at + 600.0)
    reviews, rad = Reviews(study.store, clock=clock), study.radiologist
    rid = study.review_id()
    keys = [f.key for f in reviews.findings(rid)]
    assert len(keys) == 18  # the stand-in model on this phantom

    (row,) = dashboard.turnaround(study.store).to_dict("records")
    assert row["review_id"] == rid and row["study_uid"] == study.study_uid
    assert row["model"] == t["model"] == "soft-tissue@0.0.1" and row["study_version"] == 1
    assert row["status"] == "new" and row["sign_count"] == 0
    assert row["received_at"] == datetime.fromtimestamp(received)
    assert row["result_at"] == datetime.fromtimestamp(result_at)
    assert row["receipt_to_result_min"] == pytest.approx((result_at - received) / 60, abs=1e-9)
    assert math.isnan(row["result_to_signoff_min"]) and math.isnan(row["receipt_to_signoff_min"])
    assert row["inference_s"] == t["inference_s"]
    stages = dashboard.turnaround_stages(dashboard.turnaround(study.store))
    assert list(stages["stage"]) == ["receipt_to_result"]

    reviews.decide(rid, keys[0], "accept", rad)
    reviews.decide(rid, keys[1], "reject", rad, reason="vessel")
    reviews.decide(rid, keys[2], "edit", rad, diameter_mm=7.5)
    reviews.decide(rid, keys[3], "reject", rad)
    reviews.decide(rid, keys[3], "accept", rad)  # the latest decision counts
    reviews.decide(rid, keys[4], "accept", rad)
    reviews.decide(rid, keys[4], "reset", rad)  # back to pending
    reviews.add(rid, (10.0, -20.0, 30.0), 6.0, rad)
    reviews.add(rid, (-10.0, 20.0, 40.0), 5.0, rad)
    reviews.decide(rid, "added-2", "remove", rad)
    expected = {
        "ai_findings": 18,
        "accepted": 3,  # keys 0, 2 (edited) and 3
        "edited": 1,
        "rejected": 1,
        "pending": 14,
        "added": 1,
    }

    clock.now = result_at + 3600.0
    reviews.record_signed(rid, rad, SIGNED_SR, tmp_path / "signed.dcm")
    clock.now = result_at + 7200.0  # an amendment does not move the sign-off
    reviews.reopen(rid, rad)
    clock.now = result_at + 10800.0
    reviews.record_signed(rid, rad, SIGNED_SR + ".2", tmp_path / "signed2.dcm")

    (row,) = dashboard.turnaround(reviews).to_dict("records")
    assert row["status"] == "signed" and row["sign_count"] == 2
    assert row["signed_at"] == datetime.fromtimestamp(result_at + 3600.0)
    assert row["result_to_signoff_min"] == pytest.approx(60.0, abs=1e-6)
    assert row["receipt_to_signoff_min"] == pytest.approx(
        (result_at + 3600.0 - received) / 60, abs=1e-6
    )
    stages = dashboard.turnaround_stages(dashboard.turnaround(study.store))
    assert list(stages.columns) == list(dashboard.STAGE_COLUMNS)
    assert list(stages["stage"]) == list(dashboard.STAGES)
    assert list(stages["minutes"]) == pytest.approx(
        [(result_at - received) / 60, 60.0, (result_at + 3600.0 - received) / 60], abs=1e-6
    )

    per_study = dashboard.findings_per_study(study.store)
    (counts,) = per_study.to_dict("records")
    assert {k: counts[k] for k in expected} == expected
    assert counts["study_uid"] == study.study_uid and counts["status"] == "signed"
    long = dashboard.findings_long(per_study)
    assert list(long.columns) == list(dashboard.FINDING_LONG_COLUMNS)
    assert dict(zip(long["kind"], long["count"], strict=True)) == {
        "ai_findings": 18,
        "accepted": 3,
        "added": 1,
    }

    (rates,) = dashboard.decision_rates(study.store).to_dict("records")
    assert rates == {
        "model": "soft-tissue@0.0.1",
        "results": 1,
        "findings": 18,
        "decided": 4,
        "accepted": 3,
        "edited": 1,
        "rejected": 1,
        "pending": 14,
        "added": 1,
        "acceptance_rate": 0.75,
        "rejection_rate": 0.25,
    }

    summary = dashboard.summary(study.store)
    assert summary == {
        "studies_received": 1,
        "ai_results": 1,
        "signed": 1,
        "awaiting_signoff": 0,
        "median_receipt_to_result_min": pytest.approx((result_at - received) / 60, abs=1e-9),
        "median_result_to_signoff_min": pytest.approx(60.0, abs=1e-6),
        "median_receipt_to_signoff_min": pytest.approx(
            (result_at + 3600.0 - received) / 60, abs=1e-6
        ),
        "findings_decided": 4,
        "acceptance_rate": 0.75,
        "rejection_rate": 0.25,
    }

    # Never patient data: the phantom's name and ID appear in no figure.
    with study.store.engine.connect() as conn:
        name, pid = conn.execute(select(patients.c.patient_name, patients.c.patient_id)).one()
    for frame in (dashboard.turnaround(study.store), per_study, long, stages):
        text = frame.to_csv()
        assert str(name) not in text and str(pid) not in text


def test_since_keeps_results_received_at_or_after_it(study: ReviewedStudy) -> None:
    received = _times(study.store)["last_arrival"]
    assert len(dashboard.turnaround(study.store, since=received)) == 1
    assert len(dashboard.findings_per_study(study.store, datetime.fromtimestamp(received))) == 1
    later = received + 1.0
    assert dashboard.turnaround(study.store, since=later).empty
    assert dashboard.decision_rates(study.store, since=datetime.fromtimestamp(later)).empty
    summary = dashboard.summary(study.store, since=later)
    assert summary["studies_received"] == summary["ai_results"] == 0
    assert summary["acceptance_rate"] is None


def test_rates_per_model_version(study: ReviewedStudy, tmp_path: Path) -> None:
    """A second model version's result for the same job (as a route with two models records),
    reporting the first two findings only; the dashboard reads neither result's SR."""
    rad = study.radiologist
    with study.store.engine.connect() as conn:
        first = dict(conn.execute(select(results)).one()._mapping)
    report = FindingsReport.read(Path(first["findings_path"]))
    second = replace(report, model_version="0.0.2", findings=report.findings[:2])
    path = tmp_path / "v002-findings.json"
    second.write(path)
    with study.store._write() as conn:
        conn.execute(
            results.insert().values(
                {
                    **{k: v for k, v in first.items() if k != "id"},
                    "model": "soft-tissue@0.0.2",
                    "findings_path": str(path),
                    "finding_count": 2,
                    "created_at": first["created_at"] + 60.0,
                }
            )
        )
    rows = {w.model: w.review_id for w in study.reviews.worklist()}
    old, new = rows["soft-tissue@0.0.1"], rows["soft-tissue@0.0.2"]
    study.reviews.decide(old, "ai-1", "reject", rad)
    study.reviews.decide(new, "ai-1", "accept", rad)
    study.reviews.decide(new, "ai-2", "reject", rad)
    study.reviews.add(new, (0.0, 0.0, 0.0), 4.0, rad)

    rates = dashboard.decision_rates(study.reviews).set_index("model")
    assert sorted(rates.index) == ["soft-tissue@0.0.1", "soft-tissue@0.0.2"]
    old_rates = rates.loc["soft-tissue@0.0.1"]
    assert (old_rates["findings"], old_rates["decided"], old_rates["pending"]) == (18, 1, 17)
    assert (old_rates["acceptance_rate"], old_rates["rejection_rate"]) == (0.0, 1.0)
    new_rates = rates.loc["soft-tissue@0.0.2"]
    assert (new_rates["findings"], new_rates["decided"], new_rates["pending"]) == (2, 2, 0)
    assert (new_rates["accepted"], new_rates["rejected"], new_rates["added"]) == (1, 1, 1)
    assert (new_rates["acceptance_rate"], new_rates["rejection_rate"]) == (0.5, 0.5)

    summary = dashboard.summary(study.store)
    assert summary["studies_received"] == 1 and summary["ai_results"] == 2
    assert summary["findings_decided"] == 3
    assert summary["acceptance_rate"] == pytest.approx(1 / 3)
    times = dashboard.turnaround(study.store).set_index("model")
    assert times.loc["soft-tissue@0.0.2", "receipt_to_result_min"] == pytest.approx(
        times.loc["soft-tissue@0.0.1", "receipt_to_result_min"] + 1.0, abs=1e-6
    )


def test_a_later_version_keeps_the_earlier_results_receipt(study: ReviewedStudy) -> None:
    """A late instance makes the study "updated" and moves its last_arrival; the result of
    version 1 was still made from the images received before."""
    before = _times(study.store)
    record = read_file(study.files[0].read_bytes(), "PACS")
    late = replace(record, sop_uid=generate_uid(), path=str(study.files[0]))  # a new instance
    study.store.index_instance(late, time.time() + 5.0, 1.0)
    assert _times(study.store)["last_arrival"] > before["created_at"]
    (row,) = dashboard.turnaround(study.store).to_dict("records")
    assert row["received_at"] == datetime.fromtimestamp(before["last_arrival"])
    assert row["receipt_to_result_min"] == pytest.approx(
        (before["created_at"] - before["last_arrival"]) / 60, abs=1e-9
    )


def test_an_empty_store_gives_empty_frames_with_their_columns(store_url: str) -> None:
    store = Store(store_url)
    times = dashboard.turnaround(store)
    per_study = dashboard.findings_per_study(store)
    frames = {
        dashboard.TURNAROUND_COLUMNS: times,
        dashboard.STAGE_COLUMNS: dashboard.turnaround_stages(times),
        dashboard.STUDY_COLUMNS: per_study,
        dashboard.FINDING_LONG_COLUMNS: dashboard.findings_long(per_study),
        dashboard.RATE_COLUMNS: dashboard.decision_rates(Reviews(store)),
    }
    for columns, frame in frames.items():
        assert frame.empty and list(frame.columns) == list(columns)
    assert str(times["received_at"].dtype).startswith("datetime64")
    assert times["receipt_to_result_min"].dtype == "float64"
    assert dashboard.summary(store) == {
        "studies_received": 0,
        "ai_results": 0,
        "signed": 0,
        "awaiting_signoff": 0,
        "median_receipt_to_result_min": None,
        "median_result_to_signoff_min": None,
        "median_receipt_to_signoff_min": None,
        "findings_decided": 0,
        "acceptance_rate": None,
        "rejection_rate": None,
    }


def test_the_plots_stack_disjoint_parts_in_the_users_language(
    study: ReviewedStudy, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from ui.app_dashboard import dashboard_data
    from ui.i18n import text

    reviews, rad = Reviews(study.store), study.radiologist
    rid = study.review_id()
    keys = [f.key for f in reviews.findings(rid)]
    reviews.decide(rid, keys[0], "accept", rad)
    reviews.decide(rid, keys[1], "edit", rad, diameter_mm=7.5)
    reviews.decide(rid, keys[2], "reject", rad)
    reviews.add(rid, (10.0, -20.0, 30.0), 6.0, rad)
    reviews.record_signed(rid, rad, SIGNED_SR, tmp_path / "signed.dcm")
    (whole,) = dashboard.turnaround(reviews)["receipt_to_signoff_min"]

    for lang in ("en", "zh"):

        def t(key: str, lang: str = lang, **values: object) -> str:
            return text(lang, key, **values)

        summary, stages, decisions, findings = dashboard_data(SimpleNamespace(reviews=reviews), t)
        # turnaround: the two stages that add up to the whole, not the whole beside them
        by_stage = dict(zip(stages[t("dash_stage")], stages[t("dash_minutes")], strict=True))
        assert set(by_stage) == {t("stage_receipt_to_result"), t("stage_result_to_signoff")}
        assert sum(by_stage.values()) == pytest.approx(whole, abs=1e-6)
        # findings per study: the AI's findings split by decision, plus the radiologist's own
        parts = dict(zip(findings[t("dash_kind")], findings[t("dash_count")], strict=True))
        assert parts[t("kind_accepted")] == 1 and parts[t("kind_edited")] == 1
        assert parts[t("kind_rejected")] == 1 and parts[t("kind_added")] == 1
        assert sum(parts.values()) == len(keys) + 1
        assert decisions[t("dash_count")].sum() == len(keys) + 1
        # the summary in the user's language, the model version as code (no mail link)
        assert "`soft-tissue@0.0.1`" in summary
        if lang == "zh":
            assert "已接收检查" in summary and "studies received" not in summary
            assert set(stages.columns) == {"检查", "阶段", "分钟"}
