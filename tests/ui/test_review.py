"""Review decisions in the store (ui/review.py): worklist, decisions appended and audited,
the state machine, and refusals with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from ui.accounts import PermissionDenied
from ui.review import ReviewError


@pytest.fixture
def study(tmp_path: Path, store_url: str) -> ReviewedStudy:
    return reviewed_study(tmp_path, store_url=store_url)


def test_worklist_lists_the_result_as_new_with_its_counts(study: ReviewedStudy) -> None:
    (row,) = study.reviews.worklist()
    assert row.study_uid == study.study_uid and row.status == "new"
    assert row.finding_count == len(study.reviews.findings(row.review_id)) > 0
    assert row.model == "soft-tissue@0.0.1" and row.max_probability is not None
    assert study.reviews.worklist(status="signed") == []
    assert study.reviews.worklist(search="no such thing") == []
    assert study.reviews.worklist(search=study.study_uid[-8:]) == [row]
    with pytest.raises(ReviewError, match="unknown review status"):
        study.reviews.worklist(status="done")


def test_decisions_are_appended_latest_wins_and_each_is_audited(study: ReviewedStudy) -> None:
    reviews, rad = study.reviews, study.radiologist
    rid = study.review_id()
    first, *rest = reviews.findings(rid)
    assert first.status == "pending" and first.source == "ai"
    assert reviews.open(rid, rad).state == "in_review"
    reviews.decide(rid, first.key, "reject", rad, reason="vessel")
    edited = reviews.decide(rid, first.key, "edit", rad, diameter_mm=7.5)
    assert edited.status == "edited" and edited.diameter_mm == 7.5
    accepted = reviews.decide(rid, first.key, "accept", rad)
    assert accepted.status == "edited" and accepted.diameter_mm == 7.5  # keeps the edit
    added = reviews.add(rid, (10.0, -20.5, 30.0), 6.0, rad)
    assert added.key == "added-1" and added.status == "added" and added.center_mm[1] == -20.5
    assert reviews.decide(rid, "added-1", "remove", rad).status == "removed"
    history = reviews.decision_history(rid)
    assert [h["action"] for h in history] == ["reject", "edit", "accept", "add", "remove"]
    actions = [e.action for e in study.accounts.audit.query()]
    for action in (
        "study_view",
        "finding_reject",
        "finding_edit",
        "finding_accept",
        "finding_add",
        "finding_remove",
    ):
        assert action in actions
    # Another Reviews on the same store (a new browser, a restarted server) sees the same.
    from ui.review import Reviews

    again = {f.key: f.status for f in Reviews(study.store).findings(rid)}
    assert again[first.key] == "edited" and again["added-1"] == "removed"
    assert all(again[f.key] == "pending" for f in rest)


def test_refusals_name_the_reason(study: ReviewedStudy) -> None:
    reviews, rid = study.reviews, study.review_id()
    key = reviews.findings(rid)[0].key
    with pytest.raises(PermissionDenied):
        reviews.decide(rid, key, "accept", study.engineer)
    with pytest.raises(ReviewError, match="diameter"):
        reviews.decide(rid, key, "edit", study.radiologist, diameter_mm=-1)
    with pytest.raises(ReviewError, match="no finding"):
        reviews.decide(rid, "ai-999", "accept", study.radiologist)
    with pytest.raises(ReviewError, match="only an added finding"):
        reviews.decide(rid, key, "remove", study.radiologist)
    with pytest.raises(ReviewError, match="three finite"):
        reviews.add(rid, (1.0, float("nan"), 2.0), 5.0, study.radiologist)
    sr = study.config.data_dir / "signed.dcm"
    reviews.record_signed(rid, study.radiologist, "1.2.3", sr)
    with pytest.raises(ReviewError, match="re-open it"):
        reviews.decide(rid, key, "accept", study.radiologist)
    case = reviews.reopen(rid, study.radiologist)
    assert case.state == "in_review" and case.sign_count == 1 and case.signed_sr_uid == "1.2.3"
    assert [c.review_id for c in reviews.signed()] == [rid]
