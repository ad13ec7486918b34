"""`aidx feedback export` (training/feedback.py, aidx/cli/feedback.py): signed review decisions
as a canonical training dataset, read back by the dataset loader and the training pipeline, with
no patient data or UIDs in any file."""

from __future__ import annotations

import gzip
import math
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from aidx.cli import main
from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from inference.volume import load_series
from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from training.dataset import Case, Dataset, case_label, case_volume
from training.feedback import (
    AUDIT_ACTION,
    KEY_FILE,
    FeedbackError,
    case_id,
    export_feedback,
    feedback_key,
)

REASON = "Mr Jones's old scar"  # free text a radiologist typed: must not reach the dataset
ACCEPTED, EDITED, REJECTED, PENDING = "ai-18", "ai-4", "ai-1", "ai-2"
EDITED_MM, ADDED_MM = 12.0, 10.0


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIDX_CONFIG", raising=False)


@dataclass
class Signed:
    study: ReviewedStudy
    review_id: int
    added_center: tuple[float, float, float]


def sign(study: ReviewedStudy) -> Signed:
    """The phantom's nodule (ai-18) accepted, a body-sized finding rejected, one edited, one
    added (at the middle of the series) and one added then removed; the rest left pending."""
    reviews, rad, rid = study.reviews, study.radiologist, study.review_id()
    volume = load_series(study.files)
    middle = volume.to_patient(np.asarray(volume.hu.shape, dtype=float) / 2.0)
    added = (float(middle[0]), float(middle[1]), float(middle[2]))
    reviews.decide(rid, ACCEPTED, "accept", rad)
    reviews.decide(rid, REJECTED, "reject", rad, reason=REASON)
    reviews.decide(rid, EDITED, "edit", rad, diameter_mm=EDITED_MM)
    reviews.add(rid, added, ADDED_MM, rad)
    reviews.add(rid, (0.0, 0.0, 0.0), 5.0, rad)
    reviews.decide(rid, "added-2", "remove", rad)
    reviews.record_signed(rid, rad, "1.2.3.4.5", study.config.data_dir / "signed.dcm")
    return Signed(study, rid, added)


def export(signed: Signed, out: Path, **kwargs: Any) -> Any:
    study = signed.study
    return export_feedback(
        study.reviews, study.store, out, feedback_key(study.config.data_dir), **kwargs
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Signed, Path]:
    root = tmp_path_factory.mktemp("feedback")
    signed = sign(reviewed_study(root))
    out = root / "out"
    summary = export(signed, out)
    assert (summary.studies, summary.lesions, summary.hard_negatives) == (1, 3, 1)
    assert summary.failed == [] and summary.skipped == []
    return signed, out


def the_case(out: Path) -> Case:
    (case,) = Dataset.load(out).cases
    return case


def centroid_lps(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    zyx = np.argwhere(label == value).mean(axis=0)
    return np.asarray((affine @ np.append(zyx, 1.0))[:3])


# ------------------------------------------------------------------------------ round trip
def test_export_round_trips_through_the_dataset_loader(exported: tuple[Signed, Path]) -> None:
    signed, out = exported
    study = signed.study
    case = the_case(out)
    assert case.id.startswith("rv-") and case.label == f"labels/{case.id}.nii.gz"
    image, image_affine = case_volume(case)
    loaded = case_label(case)
    assert loaded is not None
    label, label_affine = loaded
    assert label.shape == image.shape and np.allclose(label_affine, image_affine, atol=1e-4)
    assert sorted(np.unique(label).tolist()) == [0, 1, 2, 3]

    findings = {f.key: f for f in study.reviews.findings(signed.review_id)}
    expected = [  # in the review's order: AI findings by id, then added ones
        (findings[EDITED].center_mm, EDITED_MM),
        (findings[ACCEPTED].center_mm, findings[ACCEPTED].diameter_mm),
        (signed.added_center, ADDED_MM),
    ]
    assert len(case.lesions) == 3
    spacing = np.linalg.norm(image_affine[:3, :3], axis=0)
    for n, (lesion, (centre, diameter)) in enumerate(zip(case.lesions, expected, strict=True), 1):
        assert np.allclose(lesion.center_mm, centre, atol=1e-6)
        assert lesion.diameter_mm == pytest.approx(diameter)
        # Each label blob lies on its lesion, within a voxel.
        offset = np.abs(centroid_lps(label, label_affine, n) - np.asarray(centre))
        assert np.all(offset <= spacing[::-1] + 1e-6), (n, offset)

    # The accepted finding's label is its AI SEG segment ("Nodule 18"), voxel for voxel: count
    # the segment's pixels frame by frame.
    seg_path = study.reviews.case(signed.review_id).seg_path
    assert seg_path is not None
    seg = hd.seg.segread(seg_path)
    (number,) = [
        n
        for n in seg.segment_numbers
        if seg.get_segment_description(n).tracking_id == f"Nodule {ACCEPTED[3:]}"
    ]
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    in_segment = [
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    assert np.sum(label == 2) == sum(
        int(np.count_nonzero(frame)) for frame, yes in zip(frames, in_segment, strict=True) if yes
    )
    voxel_mm3 = float(np.prod(spacing))
    # Spheres: about the volume of a ball of the final diameter (coarse voxels: within 40 %).
    for n, diameter in ((1, EDITED_MM), (3, ADDED_MM)):
        ball = math.pi / 6.0 * diameter**3
        assert np.sum(label == n) * voxel_mm3 == pytest.approx(ball, rel=0.4)


def test_provenance_holds_model_decisions_roles_and_hard_negatives(
    exported: tuple[Signed, Path],
) -> None:
    signed, out = exported
    study = signed.study
    source = the_case(out).source
    assert source["kind"] == "aidx-review"
    assert source["model"] == {"name": "soft-tissue", "version": "0.0.1"}
    assert len(source["signed_date"]) == 10 and source["amendments"] == 0
    entries = {e["key"]: e for e in source["findings"]}
    ai = {f.key: f.ai for f in study.reviews.findings(signed.review_id) if f.ai is not None}
    assert set(entries) == {*ai, "added-1", "added-2"}
    accepted, edited, rejected = entries[ACCEPTED], entries[EDITED], entries[REJECTED]
    assert accepted["decision"] == "accepted" and accepted["mask"] == "ai-seg"
    assert accepted["lesion"] == 2 and accepted["reviewer_role"] == "radiologist"
    assert accepted["probability"] == pytest.approx(ai[ACCEPTED].probability, abs=1e-6)
    assert edited["decision"] == "edited" and edited["mask"] == "sphere" and edited["lesion"] == 1
    assert edited["ai_diameter_mm"] == pytest.approx(ai[EDITED].diameter_mm, abs=1e-3)
    assert edited["final_diameter_mm"] == EDITED_MM
    assert rejected["decision"] == "rejected" and rejected["lesion"] is None
    assert rejected["final_diameter_mm"] is None and rejected["reviewer_role"] == "radiologist"
    assert entries["added-1"]["decision"] == "added" and entries["added-1"]["probability"] is None
    assert entries["added-1"]["lesion"] == 3 and entries["added-1"]["mask"] == "sphere"
    assert entries["added-2"]["decision"] == "removed" and entries["added-2"]["lesion"] is None
    assert entries[PENDING]["decision"] == "pending" and entries[PENDING]["reviewer_role"] is None
    (negative,) = source["hard_negatives"]
    assert negative["key"] == REJECTED
    assert negative["probability"] == pytest.approx(ai[REJECTED].probability, abs=1e-6)
    assert np.allclose(negative["center_mm"], ai[REJECTED].center_mm, atol=1e-3)
    # Roles only: no username, no free text, nothing that says who.
    for entry in source["findings"]:
        assert set(entry) == {
            "key",
            "source",
            "decision",
            "reviewer_role",
            "probability",
            "center_mm",
            "ai_diameter_mm",
            "final_diameter_mm",
            "lesion",
            "mask",
        }


def test_the_training_pipeline_prepares_the_exported_cases(
    exported: tuple[Signed, Path], tmp_path: Path
) -> None:
    from training.train import TrainConfig, prepare_cases  # imports torch

    _, out = exported
    config = TrainConfig(
        dataset=out, output=tmp_path / "train", features=4, patch_size=(16, 32, 32)
    )
    (prepared,) = prepare_cases(config)
    assert prepared.item["label"].shape == prepared.item["image"].shape
    assert prepared.item["label"].sum() > 0 and len(prepared.item["fg"]) > 0
    assert len(prepared.nodules) == 3


# ---------------------------------------------------------------------------- no patient data
def test_no_patient_data_or_uids_in_any_file(exported: tuple[Signed, Path]) -> None:
    signed, out = exported
    study = signed.study
    review = study.reviews.case(signed.review_id)
    first = dcmread(study.files[0])
    secrets = {
        str(first.PatientName),
        str(first.PatientID),
        str(first.AccessionNumber),
        str(first.PatientBirthDate),
        str(first.StudyDate),
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        str(first.FrameOfReferenceUID),
        review.sr_sop_uid,
        "1.2.3.4.5",  # the signed SR
        study.radiologist.display_name,
        '"rad"',  # the reviewer's username, as a JSON string
        REASON,
    } | {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study.files}
    assert all(secrets)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 3  # dataset.json, the image and the label: no leftovers
    for path in files:
        raw = path.read_bytes()
        contents = [raw, gzip.decompress(raw)] if path.suffix == ".gz" else [raw]
        for data in contents:
            for secret in secrets:
                assert secret.encode() not in data, (path.name, secret)
        if path.suffix == ".gz":
            header: Any = nib.load(path).header
            for field in ("descrip", "aux_file", "db_name", "intent_name"):
                assert header[field].item() == b"", (path.name, field)
            assert len(header.extensions) == 0


def test_case_ids_are_keyed_stable_and_the_key_is_private(tmp_path: Path) -> None:
    key = feedback_key(tmp_path / "data")
    path = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 32
    assert feedback_key(tmp_path / "data") == key  # created once
    series = "1.2.826.0.1.3680043.8.498.1"
    assert case_id(key, series) == case_id(key, series)
    assert case_id(key, series) != case_id(b"\x00" * 32, series)
    assert case_id(key, series) != case_id(key, series + "1")
    import hashlib

    plain = hashlib.sha256(series.encode()).hexdigest()
    assert plain[:16] not in case_id(key, series)  # not the unkeyed hash
    path.write_text("not a key\n", encoding="ascii")
    with pytest.raises(FeedbackError, match=r"does not hold a key.*new case id"):
        feedback_key(tmp_path / "data")


# --------------------------------------------------------------------------- which reviews
def test_only_signed_reviews_are_exported_and_since_filters(tmp_path: Path) -> None:
    study = reviewed_study(tmp_path)
    rid = study.review_id()
    study.reviews.decide(rid, ACCEPTED, "accept", study.radiologist)
    key = feedback_key(study.config.data_dir)
    out = tmp_path / "out"
    unsigned = export_feedback(study.reviews, study.store, out, key)
    assert unsigned.studies == 0 and not (out / "dataset.json").exists()
    study.reviews.record_signed(rid, study.radiologist, "1.2.3.4.5", tmp_path / "sr.dcm")
    signed_at = study.reviews.case(rid).signed_at
    assert signed_at is not None
    later = export_feedback(study.reviews, study.store, out, key, since=signed_at + 1.0)
    assert later.studies == 0 and not (out / "dataset.json").exists()
    since = export_feedback(study.reviews, study.store, out, key, since=signed_at - 1.0)
    assert since.studies == 1 and since.lesions == 1 and since.hard_negatives == 0
    (case,) = Dataset.load(out).cases
    assert case.id == case_id(key, study.reviews.case(rid).series_uid)


def test_export_again_replaces_the_case_and_amendments_wait_for_the_signature(
    tmp_path: Path,
) -> None:
    signed = sign(reviewed_study(tmp_path))
    study, rid, rad = signed.study, signed.review_id, signed.study.radiologist
    out = tmp_path / "out"
    first = export(signed, out)
    before = the_case(out)
    again = export(signed, out)
    assert again.case_ids == first.case_ids and the_case(out) == before  # no duplicate
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "labels"]

    # Re-opened without a change: still the signed decisions.
    study.reviews.reopen(rid, rad)
    assert export(signed, out).studies == 1
    # Being amended: skipped, the case exported before stays.
    study.reviews.decide(rid, ACCEPTED, "reject", rad)
    amending = export(signed, out)
    assert amending.studies == 0 and "being amended" in amending.skipped[0]
    assert the_case(out) == before
    # Signed again: the amended decisions replace the case.
    study.reviews.record_signed(rid, rad, "1.2.3.4.6", tmp_path / "sr2.dcm")
    amended = export(signed, out)
    assert amended.case_ids == first.case_ids and amended.cases_total == 1
    case = the_case(out)
    assert len(case.lesions) == 2 and case.source["amendments"] == 1
    assert {n["key"] for n in case.source["hard_negatives"]} == {REJECTED, ACCEPTED}
    loaded = case_label(case)
    assert loaded is not None and sorted(np.unique(loaded[0]).tolist()) == [0, 1, 2]

    # Cases of other studies in the folder are kept (here: the same study under another key).
    other = export_feedback(study.reviews, study.store, out, b"\x01" * 32)
    assert other.cases_total == 2 and len(Dataset.load(out).cases) == 2


def test_a_folder_holding_another_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    Dataset("phantoms").write(tmp_path / "out")
    study = reviewed_study(tmp_path / "study")
    rid = study.review_id()
    study.reviews.decide(rid, ACCEPTED, "accept", study.radiologist)
    study.reviews.record_signed(rid, study.radiologist, "1.2.3.4.5", tmp_path / "sr.dcm")
    with pytest.raises(FeedbackError, match="not a feedback export"):
        export_feedback(
            study.reviews, study.store, tmp_path / "out", feedback_key(study.config.data_dir)
        )


# ------------------------------------------------------------------------------------ CLI
def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exports_reports_counts_and_audits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signed = sign(reviewed_study(tmp_path))
    study = signed.study
    data, out = str(study.config.data_dir), tmp_path / "out"
    code, stdout, err = run(["--data-dir", data, "feedback", "export", str(out)], capsys)
    assert code == EXIT_OK, err
    assert "exported 1 study (3 lesions, 1 hard negative)" in stdout
    assert "the dataset holds 1 case" in stdout
    assert len(Dataset.load(out).cases) == 1
    (entry,) = study.accounts.audit.query(action=AUDIT_ACTION)
    assert entry.study_uid == study.study_uid and entry.detail["case"] == the_case(out).id

    code, stdout, _ = run(
        ["--data-dir", data, "feedback", "export", str(out), "--since", "2999-01-01"], capsys
    )
    assert code == EXIT_OK and "no review signed since 2999-01-01 00:00:00 to export" in stdout

    with pytest.raises(SystemExit) as exc:
        main(["--data-dir", data, "feedback", "export", str(out), "--since", "01/11/2026"])
    assert exc.value.code == EXIT_USAGE
    assert "YYYY-MM-DD" in capsys.readouterr().err

    code, _, err = run(
        ["--data-dir", str(tmp_path / "nothing"), "feedback", "export", str(out)], capsys
    )
    assert code == EXIT_USAGE and "no store at" in err


def test_cli_reports_a_study_whose_series_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signed = sign(reviewed_study(tmp_path))
    study = signed.study
    for path in study.files[:3]:
        path.unlink()
    out = tmp_path / "out"
    code, _, err = run(
        ["--data-dir", str(study.config.data_dir), "feedback", "export", str(out)], capsys
    )
    assert code == EXIT_FAILED
    series = study.reviews.case(signed.review_id).series_uid
    assert f"series {series}" in err and "3 of the series' 30 files are missing" in err
    assert not (out / "dataset.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file()]  # the staging folder is gone too
