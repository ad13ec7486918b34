"""The radiologist's sign-off (ui/signoff.py): a verified SR built from the review decisions,
read back with highdicom, validated with dciodvfy, queued through the outbox and audited; the
amendment, the refusals, and retries that never queue two reports."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from aidx.cli.status import recent_status, study_status
from aidx.store.schema import outbox
from aidx.store.store import Store
from inference.sr import finding_groups
from tests.conftest import REPO
from tests.inference.results_case import dciodvfy_errors, text_items
from tests.ui.reviewed_study import PASSWORD, ReviewedStudy, reviewed_study
from ui.accounts import PermissionDenied, User
from ui.review import ReviewedFinding, ReviewError, Reviews
from ui.signoff import (
    ACCEPTED,
    ADDED,
    AI_LONG_AXIS,
    DECISION,
    EDITED,
    SignResult,
    person_name,
    sign,
)

LONG_AXIS = Code("103339001", "SCT", "Long Axis")
VOLUME = Code("118565006", "SCT", "Volume")
PROBABILITY = Code("122157", "DCM", "Probability")
NODULE = Code("27925004", "SCT", "Nodule")
ABSENT = Code("272519000", "SCT", "Absent")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PERSON = Code("121006", "DCM", "Person")
EDITED_DIAMETER = 9.5
ADDED_DIAMETER = 6.0


@dataclass
class Signed:
    """A study reviewed (accept, edit, reject with reason, add, the rest rejected) and signed."""

    study: ReviewedStudy
    review_id: int
    accepted: ReviewedFinding
    edited: ReviewedFinding
    rejected: ReviewedFinding
    added: ReviewedFinding
    added_key_slice: str  # SOP Instance UID of the image nearest the added centre
    result: SignResult


def signed_dir(study: ReviewedStudy) -> Path:
    return study.config.data_dir / "signed"


def volume_middle(study: ReviewedStudy) -> tuple[tuple[float, float, float], str]:
    """A point inside the volume, 0.4 mm above the middle image (axial phantom), and that
    image's SOP Instance UID."""
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in study.files),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    middle = headers[len(headers) // 2]
    x, y, z = (float(v) for v in middle.ImagePositionPatient)
    spacing = float(middle.PixelSpacing[0])
    half = int(middle.Columns) // 2 * spacing
    return (x + half + 3.0, y + half - 5.0, z + 0.4), str(middle.SOPInstanceUID)


def decide_all(study: ReviewedStudy, review_id: int, user: User, action: str = "reject") -> None:
    for f in study.reviews.findings(review_id):
        if f.status == "pending":
            study.reviews.decide(review_id, f.key, action, user)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    study = reviewed_study(tmp_path_factory.mktemp("signoff"))
    reviews, rad = study.reviews, study.radiologist
    rid = study.review_id()
    reviews.open(rid, rad)
    first, second, third, *_ = reviews.findings(rid)
    accepted = reviews.decide(rid, first.key, "accept", rad)
    edited = reviews.decide(rid, second.key, "edit", rad, diameter_mm=EDITED_DIAMETER)
    rejected = reviews.decide(rid, third.key, "reject", rad, reason="vessel")
    centre, key_slice = volume_middle(study)
    added = reviews.add(rid, centre, ADDED_DIAMETER, rad)
    decide_all(study, rid, rad)
    result = sign(reviews, study.store, rid, rad, signed_dir(study), client="10.0.0.7")
    return Signed(study, rid, accepted, edited, rejected, added, key_slice, result)


@pytest.fixture
def study(tmp_path: Path) -> ReviewedStudy:
    return reviewed_study(tmp_path)


def report_of(path: Path) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr.content


def groups_by_id(path: Path) -> dict[str, Any]:
    """The measurement groups of a report (the AI SR's TID 1411, the signed SR's TID 1501)."""
    return {str(g.tracking_identifier): g for g in finding_groups(report_of(path))}


def decision(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> Code:
    (evaluation,) = group.get_qualitative_evaluations(name=DECISION)
    value = evaluation[0].ConceptCodeSequence[0]
    return Code(value.CodeValue, value.CodingSchemeDesignator, value.CodeMeaning)


def value_of(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> float:
    (measurement,) = group.get_measurements(name=name)
    return float(measurement.value)


def predecessors(ds: Dataset) -> list[str]:
    return [
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]


def signed_items(store: Store) -> list[Any]:
    return [i for i in store.outbox_items() if i.item_key.startswith("signed:")]


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm")) if folder.exists() else []


# ------------------------------------------------------------------------- the signed report
def test_signed_sr_is_verified_by_the_radiologist_and_supersedes_the_ai_sr(
    signed: Signed,
) -> None:
    case = signed.study.reviews.case(signed.review_id)
    result = signed.result
    assert result.sr_path == signed_dir(signed.study) / case.study_uid / f"{result.sr_uid}.dcm"
    assert result.predecessor_uids == (case.sr_sop_uid,)
    sr = hd.sr.srread(result.sr_path)
    ai = pydicom.dcmread(case.sr_path, stop_before_pixels=True)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.SOPInstanceUID == result.sr_uid != ai.SOPInstanceUID
    assert (sr.CompletionFlag, sr.PreliminaryFlag, sr.VerificationFlag) == (
        "COMPLETE",
        "FINAL",
        "VERIFIED",
    )
    (observer,) = sr.VerifyingObserverSequence
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
        "Smith^Anna",
        "General Hospital",
    )
    assert predecessors(sr) == [case.sr_sop_uid]
    # Same study and patient; a series of its own.
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert sr[keyword].value == ai[keyword].value, keyword
    assert sr.SeriesInstanceUID == result.series_uid != ai.SeriesInstanceUID
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9004, 1)
    assert sr.SeriesDescription == "Radiologist-verified nodule findings"
    # The person observer in the observation context.
    (person,) = report_of(result.sr_path).get_observer_contexts(observer_type=PERSON)
    attributes = person.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.PersonObserverIdentifyingAttributes)
    assert (str(attributes.name), attributes.login_name, attributes.organization_name) == (
        "Smith^Anna",
        "rad",
        "General Hospital",
    )


def test_groups_are_the_included_findings_with_final_values_and_decisions(
    signed: Signed,
) -> None:
    case = signed.study.reviews.case(signed.review_id)
    groups = groups_by_id(signed.result.sr_path)
    accepted, edited, added = signed.accepted, signed.edited, signed.added
    assert accepted.ai is not None and edited.ai is not None
    assert set(groups) == {f"Nodule {accepted.ai.id}", f"Nodule {edited.ai.id}", "Added nodule 1"}
    assert signed.result.included == 3
    assert signed.result.rejected == len(signed.study.reviews.findings(signed.review_id)) - 3
    # AI findings keep the AI SR's (and SEG's) tracking UIDs, so viewers can match them.
    ai_groups = groups_by_id(case.sr_path)
    assert case.seg_path is not None
    seg = hd.seg.segread(case.seg_path)
    seg_uids = {
        seg.get_segment_description(n).tracking_uid for n in range(1, seg.number_of_segments + 1)
    }
    for f in (accepted, edited):
        assert f.ai is not None
        group, ai_group = groups[f"Nodule {f.ai.id}"], ai_groups[f"Nodule {f.ai.id}"]
        assert group.tracking_uid == ai_group.tracking_uid
        assert group.tracking_uid in seg_uids
        assert group.finding_type == NODULE
        assert value_of(group, PROBABILITY) == pytest.approx(100.0 * f.ai.probability)  # %
        texts = text_items(group)
        assert (texts["111001"], texts["111003"]) == ("soft-tissue", "0.0.1")
        check_centre(group, f.center_mm, f.ai.key_sop_instance_uid)
    # Accepted: the model's values, volume included.
    group = groups[f"Nodule {accepted.ai.id}"]
    assert decision(group) == ACCEPTED
    assert value_of(group, LONG_AXIS) == pytest.approx(accepted.ai.diameter_mm)
    assert value_of(group, VOLUME) == pytest.approx(accepted.ai.volume_mm3)
    assert group.get_measurements(name=AI_LONG_AXIS) == []
    # Edited: the radiologist's diameter, and the model's next to it; no volume.
    group = groups[f"Nodule {edited.ai.id}"]
    assert decision(group) == EDITED
    assert value_of(group, LONG_AXIS) == pytest.approx(EDITED_DIAMETER)
    assert value_of(group, AI_LONG_AXIS) == pytest.approx(edited.ai.diameter_mm)
    assert group.get_measurements(name=VOLUME) == []
    # Added: a new tracking UID, no probability and no algorithm; key slice nearest the centre.
    group = groups["Added nodule 1"]
    assert decision(group) == ADDED
    assert group.tracking_uid not in seg_uids
    assert value_of(group, LONG_AXIS) == pytest.approx(ADDED_DIAMETER)
    assert group.get_measurements(name=PROBABILITY) == []
    assert "111001" not in text_items(group)
    check_centre(group, added.center_mm, signed.added_key_slice)
    # The rejected finding is absent, by tracking UID too.
    assert signed.rejected.ai is not None
    rejected_uid = ai_groups[f"Nodule {signed.rejected.ai.id}"].tracking_uid
    assert all(g.tracking_uid != rejected_uid for g in groups.values())


def check_centre(
    group: hd.sr.MeasurementsAndQualitativeEvaluations,
    centre: tuple[float, float, float],
    key_slice: str,
) -> None:
    (long_axis,) = group.get_measurements(name=LONG_AXIS)
    by_type = {type(c): c for c in long_axis.referenced_coordinates}
    point = by_type[hd.sr.CoordinatesForMeasurement]
    space = by_type[hd.sr.CoordinatesForMeasurement3D]
    assert point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_slice
    assert np.allclose(space.value[0], centre, atol=1e-3)


def test_signed_sr_passes_dciodvfy(signed: Signed) -> None:
    assert dciodvfy_errors(signed.result.sr_path) == []


def test_signed_sr_is_queued_to_the_ai_srs_destination_and_audited(signed: Signed) -> None:
    store, result = signed.study.store, signed.result
    assert result.destinations == ("PACS",) and result.queued
    assert result.not_queued_reason is None
    (item,) = signed_items(store)
    assert (item.destination, item.files, item.state) == ("PACS", [str(result.sr_path)], "pending")
    assert (item.study_uid, item.series_uid) == (signed.study.study_uid, result.series_uid)
    case = signed.study.reviews.case(signed.review_id)
    assert (case.state, case.sign_count, case.signed_by) == ("signed", 1, "rad")
    assert (case.signed_sr_uid, case.signed_sr_path) == (result.sr_uid, result.sr_path)
    (entry,) = signed.study.accounts.audit.query(action="sign")
    assert (entry.username, entry.study_uid, entry.client) == ("rad", case.study_uid, "10.0.0.7")
    assert entry.detail["sr"] == result.sr_uid
    assert entry.detail["predecessors"] == [case.sr_sop_uid]
    assert entry.detail["destinations"] == ["PACS"]


# ------------------------------------------------------------------------------- amendment
def test_amendment_names_the_previous_signed_report(study: ReviewedStudy) -> None:
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    decide_all(study, rid, rad, "accept")
    first = sign(reviews, study.store, rid, rad, signed_dir(study))
    first_groups = groups_by_id(first.sr_path)
    reviews.reopen(rid, rad)
    changed = reviews.findings(rid)[0]
    reviews.decide(rid, changed.key, "reject", rad, reason="scar")
    second = sign(reviews, study.store, rid, rad, signed_dir(study))

    case = reviews.case(rid)
    assert second.sr_uid != first.sr_uid
    assert (second.sign_count, case.sign_count, case.signed_sr_uid) == (2, 2, second.sr_uid)
    assert second.predecessor_uids == (first.sr_uid, case.sr_sop_uid)
    sr = pydicom.dcmread(second.sr_path)
    assert predecessors(sr) == [first.sr_uid, case.sr_sop_uid]
    assert sr.InstanceNumber == 2 and sr.SeriesInstanceUID == first.series_uid
    assert sr.VerificationFlag == "VERIFIED"
    assert len(groups_by_id(second.sr_path)) == len(first_groups) - 1
    assert f"Nodule {changed.key.partition('-')[2]}" not in groups_by_id(second.sr_path)
    assert first.sr_path.is_file()  # the first report stays: the PACS may hold it
    assert {i.files[0] for i in signed_items(study.store)} == {
        str(first.sr_path),
        str(second.sr_path),
    }
    assert len(study.accounts.audit.query(action="sign")) == 2
    assert dciodvfy_errors(second.sr_path) == []
    # `aidx status` tells the review's state, who signed, how often, and where the SR is.
    (recent,) = recent_status(study.store)
    assert recent["review_state"] == "signed"
    report = study_status(study.store, study.study_uid)
    assert report is not None
    (review,) = report["reviews"]
    assert (review["state"], review["signed_by"], review["signings"]) == ("signed", rad.username, 2)
    assert review["signed_sr_path"] == str(second.sr_path)
    assert review["signed_sr_uid"] == second.sr_uid
    steps = [e["event"] for e in report["events"]]
    assert steps.index("review opened") < steps.index("signed")


# -------------------------------------------------------------------------------- refusals
def test_refusals_name_the_reason_and_leave_nothing_behind(study: ReviewedStudy) -> None:
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    findings = reviews.findings(rid)
    reviews.decide(rid, findings[0].key, "accept", rad)
    with pytest.raises(ReviewError, match=f"{len(findings) - 1} of {len(findings)} findings"):
        sign(reviews, study.store, rid, rad, signed_dir(study))
    decide_all(study, rid, rad)
    with pytest.raises(PermissionDenied, match="engineer"):
        sign(reviews, study.store, rid, study.engineer, signed_dir(study))
    with pytest.raises(PermissionDenied):
        sign(reviews, study.store, rid, study.admin, signed_dir(study))
    assert dicom_files(signed_dir(study)) == [] and signed_items(study.store) == []
    assert reviews.case(rid).state == "in_review"
    first = sign(reviews, study.store, rid, rad, signed_dir(study))
    with pytest.raises(ReviewError, match="already signed"):
        sign(reviews, study.store, rid, rad, signed_dir(study))
    assert dicom_files(signed_dir(study)) == [first.sr_path]
    assert len(signed_items(study.store)) == 1
    assert reviews.case(rid).sign_count == 1


def test_a_signer_needs_an_organisation(study: ReviewedStudy) -> None:
    reviews, rid = study.reviews, study.review_id()
    nobody = study.accounts.add_user("kim", PASSWORD, role="radiologist", display_name="Kim Lee")
    decide_all(study, rid, nobody)
    with pytest.raises(ReviewError, match="organisation"):
        sign(reviews, study.store, rid, nobody, signed_dir(study))
    result = sign(
        reviews, study.store, rid, nobody, signed_dir(study), default_organisation="City Clinic"
    )
    (observer,) = pydicom.dcmread(result.sr_path).VerifyingObserverSequence
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
        "Lee^Kim",
        "City Clinic",
    )


def test_an_added_finding_outside_the_images_is_refused(study: ReviewedStudy) -> None:
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    decide_all(study, rid, rad)
    centre, _ = volume_middle(study)
    reviews.add(rid, (centre[0], centre[1], centre[2] + 500.0), 5.0, rad)
    with pytest.raises(ReviewError, match=r"added finding added-1 .* beyond the series"):
        sign(reviews, study.store, rid, rad, signed_dir(study))
    reviews.decide(rid, "added-1", "remove", rad)
    reviews.add(rid, (centre[0] + 1000.0, centre[1], centre[2]), 5.0, rad)
    with pytest.raises(ReviewError, match=r"added finding added-2 .* beside the images"):
        sign(reviews, study.store, rid, rad, signed_dir(study))
    assert dicom_files(signed_dir(study)) == [] and reviews.case(rid).state == "in_review"
    reviews.decide(rid, "added-2", "remove", rad)
    assert sign(reviews, study.store, rid, rad, signed_dir(study)).removed == 2


# ---------------------------------------------------------------------------- destinations
def test_without_ai_destinations_the_fallback_is_used_else_nothing_is_queued(
    study: ReviewedStudy,
) -> None:
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    with study.store._write() as conn:  # as if the result had been sent nowhere
        conn.execute(outbox.delete())
    decide_all(study, rid, rad)
    alone = sign(reviews, study.store, rid, rad, signed_dir(study))
    assert alone.destinations == () and not alone.queued
    assert alone.not_queued_reason is not None and "signoff_destinations" in alone.not_queued_reason
    assert alone.sr_path.is_file() and reviews.case(rid).state == "signed"
    assert study.store.outbox_items() == []
    reviews.reopen(rid, rad)
    queued = sign(reviews, study.store, rid, rad, signed_dir(study), ("ARCHIVE", "ARCHIVE", ""))
    assert queued.destinations == ("ARCHIVE",)
    assert [(i.destination, i.files) for i in study.store.outbox_items()] == [
        ("ARCHIVE", [str(queued.sr_path)])
    ]


# ---------------------------------------------------------------- no nodules, character set
def test_all_rejected_says_no_nodules_and_a_chinese_signer_gets_utf8(
    study: ReviewedStudy,
) -> None:
    reviews, rid = study.reviews, study.review_id()
    wang = study.accounts.add_user(
        "wang", PASSWORD, role="radiologist", display_name="王^小明", organisation="北京协和医院"
    )
    decide_all(study, rid, wang)
    result = sign(reviews, study.store, rid, wang, signed_dir(study))
    assert (result.included, result.rejected) == (0, len(reviews.findings(rid)))
    # As the AI SR without findings: no group, and "Nodule: Absent" (inference.sr).
    report = report_of(result.sr_path)
    assert finding_groups(report) == []
    (evaluations,) = hd.sr.utils.find_content_items(report[0], name=QUALITATIVE_EVALUATIONS)
    (absent,) = evaluations.ContentSequence
    assert absent.ConceptNameCodeSequence[0].CodeValue == NODULE.value
    assert absent.ConceptCodeSequence[0].CodeValue == ABSENT.value
    sr = pydicom.dcmread(result.sr_path)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    (observer,) = sr.VerifyingObserverSequence
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
        "王^小明",
        "北京协和医院",
    )
    source = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert sr.PatientName == source.PatientName
    assert dciodvfy_errors(result.sr_path) == []


# ------------------------------------------------------------------------ retries and races
def test_a_crash_before_queueing_is_repaired_by_the_next_sign(
    study: ReviewedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    decide_all(study, rid, rad, "accept")

    def crash(*_: object, **__: object) -> tuple[int, bool]:
        raise OSError("the process died here")

    with monkeypatch.context() as m:
        m.setattr(study.store, "enqueue", crash)
        with pytest.raises(OSError, match="died"):
            sign(reviews, study.store, rid, rad, signed_dir(study))
    case = reviews.case(rid)
    assert case.state == "signed" and signed_items(study.store) == []
    with pytest.raises(ReviewError, match="already signed"):
        sign(reviews, study.store, rid, rad, signed_dir(study))
    (item,) = signed_items(study.store)
    assert (item.destination, item.files) == ("PACS", [str(case.signed_sr_path)])


def test_a_crash_before_recording_is_retried_with_the_same_uid_and_file(
    study: ReviewedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    decide_all(study, rid, rad, "accept")

    def crash(*_: object, **__: object) -> None:
        raise OSError("the process died here")

    with monkeypatch.context() as m:
        m.setattr(reviews, "record_signed", crash)
        with pytest.raises(OSError, match="died"):
            sign(reviews, study.store, rid, rad, signed_dir(study))
    (written,) = dicom_files(signed_dir(study))
    assert reviews.case(rid).state == "in_review" and signed_items(study.store) == []
    retried = sign(reviews, study.store, rid, rad, signed_dir(study))
    assert retried.sr_path == written and retried.sr_uid == pydicom.dcmread(written).SOPInstanceUID
    assert dicom_files(signed_dir(study)) == [written]
    assert len(signed_items(study.store)) == 1
    # The same decisions signed again after a re-open are a new signing: a new object.
    reviews.reopen(rid, rad)
    assert sign(reviews, study.store, rid, rad, signed_dir(study)).sr_uid != retried.sr_uid


class RacingReviews(Reviews):
    """Reviews whose record_signed waits until both signings have built their reports."""

    def __init__(self, study: ReviewedStudy, barrier: threading.Barrier) -> None:
        super().__init__(study.store, study.accounts.audit)
        self.barrier = barrier

    def record_signed(self, *args: Any, **kwargs: Any) -> Any:
        self.barrier.wait(timeout=60)
        return super().record_signed(*args, **kwargs)


@pytest.mark.parametrize("signers", ["same radiologist", "two radiologists"])
def test_concurrent_signings_queue_one_report(study: ReviewedStudy, signers: str) -> None:
    rid = study.review_id()
    decide_all(study, rid, study.radiologist, "accept")
    users = [study.radiologist, study.radiologist]
    if signers == "two radiologists":
        users[1] = study.accounts.add_user(
            "lee", PASSWORD, role="radiologist", display_name="Lee^Kim", organisation="GH"
        )
    reviews = RacingReviews(study, threading.Barrier(2))
    outcomes: list[SignResult | Exception] = []

    def run(user: User) -> None:
        try:
            outcomes.append(sign(reviews, study.store, rid, user, signed_dir(study)))
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            outcomes.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    (won,) = [o for o in outcomes if isinstance(o, SignResult)]
    (lost,) = [o for o in outcomes if not isinstance(o, SignResult)]
    assert isinstance(lost, ReviewError) and "already signed" in str(lost)
    case = study.reviews.case(rid)
    assert (case.sign_count, case.signed_sr_uid) == (1, won.sr_uid)
    (item,) = signed_items(study.store)
    assert item.files == [str(won.sr_path)]
    assert dicom_files(signed_dir(study)) == [won.sr_path]  # the loser's file is gone
    assert len(study.accounts.audit.query(action="sign")) == 1


# ----------------------------------------------------------------------------- small parts
@pytest.mark.parametrize(
    ("display", "expected"),
    [
        ("Smith^Anna", "Smith^Anna"),
        ("Anna Smith", "Smith^Anna"),
        ("  Anna   Maria Smith ", "Smith^Anna Maria"),
        ("Smith", "Smith^"),
        ("", "rad^"),
        ("Anna\\Smith=X", "AnnaSmithX^"),
        ("王^小明", "王^小明"),
        ("A" * 80, "A" * 64),
    ],
)
def test_person_name_from_a_display_name(display: str, expected: str) -> None:
    assert person_name(display, "rad") == expected


def test_signoff_does_not_load_torch() -> None:
    code = "import sys, ui.signoff\nassert 'torch' not in sys.modules\nprint('ok')\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
