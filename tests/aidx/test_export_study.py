"""`aidx export-study`: a study's images with its AI SR, SEG and signed SR, de-identified per the
PS3.15 Basic Application Level Confidentiality Profile (checked against the profile's table as
``dicom-anonymizer`` ships it), valid (dciodvfy), with the results still referencing the
exported images (highdicom), the same UIDs on a re-export, audited; bad input refused.

One study for the module: a phantom that carries what a hospital's images do (names, IDs, an
address, other patient IDs, a private block, a nested request), reviewed and signed.
"""

from __future__ import annotations

import functools
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from aidx.cli import main
from aidx.deidentify import Deidentifier, Options, is_descriptor
from tests.inference.results_case import dciodvfy_errors
from tests.ui.reviewed_study import ReviewedStudy, reviewed_study
from tests.ui.test_signoff import decide_all, signed_dir
from ui.audit import Audit
from ui.signoff import sign

PATIENT = "Mustermann^Erika"
PATIENT_ID = "PID-4711-X"
BIRTH_DATE = "19610203"
# What must not leave in any byte of a de-identified export.
IDENTIFYING = (
    "Mustermann",
    "Erika",
    PATIENT_ID,
    BIRTH_DATE,
    "Hauptstrasse",
    "Klinikum Bonn",
    "OTHER-99",
    "Tech^Tina",
    "ACME secret",
    "Smith",  # the radiologist who signed (Smith^Anna)
)
CLEAN_SERIES_DESCRIPTION = "Axial 2.5 mm"


def hospital_attributes(files: list[Path]) -> None:
    """What a hospital's CT carries beyond the phantom's attributes."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = BIRTH_DATE
        ds.PatientAddress = "Hauptstrasse 1, Bonn"
        other = Dataset()
        other.PatientID = "OTHER-99"
        ds.OtherPatientIDsSequence = [other]
        ds.OperatorsName = "Tech^Tina"
        ds.InstitutionName = "Klinikum Bonn"
        ds.StudyDescription = "CT thorax Mustermann"
        ds.SeriesDescription = CLEAN_SERIES_DESCRIPTION
        request = Dataset()
        request.RequestedProcedureID = "RP-0815"
        request.ScheduledProcedureStepID = "SPS-0815"
        ds.RequestAttributesSequence = [request]
        ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", "ACME secret")
        ds.save_as(path)


@dataclass
class Exported:
    study: ReviewedStudy
    sources: list[Path]  # images, AI SR, SEG, signed SR as stored
    plain: Path  # --deidentify
    options: Path  # --deidentify --retain-full-dates --clean-descriptors
    received: Path  # no --deidentify


def export(study: ReviewedStudy, out: Path, *flags: str) -> int:
    data = str(study.config.data_dir)
    return main(["--data-dir", data, "export-study", study.study_uid, str(out), *flags])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("export")
    study = reviewed_study(root, patient_name=PATIENT, prepare=hospital_attributes)
    rid = study.review_id()
    study.reviews.open(rid, study.radiologist)
    decide_all(study, rid, study.radiologist, "accept")
    signed = sign(study.reviews, study.store, rid, study.radiologist, signed_dir(study))
    (result,) = study.store.study_results(study.study_uid)
    sources = [*study.files, Path(result["sr_path"]), Path(result["seg_path"]), signed.sr_path]
    out = Exported(study, sources, root / "deid", root / "deid-options", root / "received")
    assert export(study, out.plain, "--deidentify") == 0
    assert (
        export(study, out.options, "--deidentify", "--retain-full-dates", "--clean-descriptors")
        == 0
    )
    assert export(study, out.received) == 0
    return out


def manifest(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "manifest.json").read_text(encoding="utf-8")))


def files_of(folder: Path, kind: str | None = None) -> list[Path]:
    return [folder / f["path"] for f in manifest(folder)["files"] if kind in (None, f["kind"])]


@functools.cache
def header(path: Path) -> Dataset:
    """A file's data set without pixel data, read once for the module's tests (no test
    changes one)."""
    return pydicom.dcmread(path, stop_before_pixels=True)


# The profile's table as the library ships it: tag -> the actions it allows.
def _table() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    single: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name in dir(table):
        if name.endswith("_TAGS") and name != "ALL_TAGS":
            actions = name.removesuffix("_TAGS").replace("_STAR", "").replace("_", "")
            for entry in getattr(table, name):
                if len(entry) == 2:
                    single[Tag(*entry)] = actions
                else:
                    masked.append((*entry, actions))
    return single, masked


SINGLE, MASKED = _table()


def table_action(tag: BaseTag) -> str | None:
    if tag in SINGLE:
        return SINGLE[tag]
    for group, element, gmask, emask, actions in MASKED:
        if tag.group & gmask == group & gmask and tag.element & emask == element & emask:
            return actions
    return None


@functools.cache
def originals(sources: tuple[Path, ...]) -> tuple[dict[BaseTag, set[str]], set[str]]:
    """The values of the stored objects that the table removes, empties or replaces (by tag),
    and the UIDs it replaces."""
    values: dict[BaseTag, set[str]] = {}
    uids: set[str] = set()
    for path in sources:
        for elem in header(path).iterall():
            action = table_action(elem.tag)
            if action is None or elem.VR == "SQ" or elem.value in (None, ""):
                continue
            found = {str(v) for v in (elem.value if elem.VM > 1 else [elem.value])}
            if "U" in action:
                uids |= found
            else:
                values.setdefault(elem.tag, set()).update(found)
    return values, uids


# ---------------------------------------------------------------------------------- tests
def test_every_exported_object_passes_dciodvfy(exported: Exported) -> None:
    files = files_of(exported.plain)
    assert len(files) == len(exported.sources) == len(exported.study.files) + 3
    for path in files:
        assert dciodvfy_errors(path) == [], path


@pytest.mark.parametrize("which", ["plain", "options"])
def test_nothing_the_profile_removes_is_kept(exported: Exported, which: str) -> None:
    """Against the profile's table: no private attribute, no attribute the table removes (X),
    no value it removes, empties or replaces (X/Z/D) and no UID it replaces (U) survives, at
    any depth; the options keep only the study's dates (full dates) and descriptions without
    an identifying value (none of IDENTIFYING is in any file's bytes)."""
    folder = getattr(exported, which)
    retain = which == "options"
    original_values, original_uids = originals(tuple(exported.sources))
    assert original_values[Tag("PatientName")] == {PATIENT}
    kept: list[str] = []
    for path in files_of(folder):
        data = path.read_bytes()
        assert not [s for s in IDENTIFYING if s.encode() in data], path
        ds = header(path)
        assert ds.PatientIdentityRemoved == "YES"
        for elem in ds.iterall():
            where = f"{path.name}: {elem.tag} {elem.keyword}"
            assert not elem.tag.is_private, where
            action = table_action(elem.tag)
            if action is None:
                continue
            dates_kept = retain and elem.VR in ("DA", "DT", "TM") and elem.tag.group != 0x0010
            cleaned = retain and is_descriptor(elem.tag, elem.VR)  # kept only if clean (bytes)
            if dates_kept or cleaned:
                kept.append(elem.keyword)
                continue
            assert action != "X", f"{where} is removed by the profile"
            if elem.VR == "SQ":
                if action == "Z":
                    assert len(elem.value) == 0, where
                continue
            values = {str(v) for v in (elem.value if elem.VM > 1 else [elem.value])}
            if "U" in action:
                assert not values & original_uids, f"{where} keeps an original UID"
                continue
            if action == "Z":
                assert elem.value in (None, ""), where
            survived = values & original_values.get(elem.tag, set())
            assert not survived, f"{where} keeps its original value"
    if retain:
        assert {"StudyDate", "ContentDate", "SeriesDescription"} <= set(kept)


def test_results_reference_the_exported_images(exported: Exported) -> None:
    """highdicom reads the SR, SEG and signed SR, and every reference in them (SR content,
    evidence, SEG source images and referenced series, predecessor) names an exported object;
    the SR's and SEG's tracking UIDs still match."""
    folder = exported.plain
    images = [header(p) for p in files_of(folder, "image")]
    image_uids = {str(ds.SOPInstanceUID) for ds in images}
    (series_uid,) = {str(ds.SeriesInstanceUID) for ds in images}
    (frame_of_reference,) = {str(ds.FrameOfReferenceUID) for ds in images}
    (study_uid,) = {str(ds.StudyInstanceUID) for ds in images}
    assert study_uid == manifest(folder)["study_uid"] != exported.study.study_uid
    (sr_path,) = files_of(folder, "sr")
    (seg_path,) = files_of(folder, "seg")
    (signed_path,) = files_of(folder, "signed-sr")
    every_uid = image_uids | {
        str(header(p).SOPInstanceUID) for p in (sr_path, seg_path, signed_path)
    }

    for path in (sr_path, seg_path, signed_path):
        ds = header(path)
        assert ds.StudyInstanceUID == study_uid
        referenced = {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert referenced and referenced <= every_uid, path.name
        assert image_uids & referenced, path.name

    sr = hd.sr.srread(sr_path)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = (
        report.get_volumetric_roi_measurement_groups() + report.get_planar_roi_measurement_groups()
    )
    tracking = {str(g.tracking_uid) for g in groups}
    assert tracking
    seg = hd.seg.segread(seg_path)
    assert str(seg.FrameOfReferenceUID) == frame_of_reference
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series_uid
    assert {sop for _, _, sop in seg.get_source_image_uids()} <= image_uids
    segments = {str(seg.get_segment_description(n).TrackingUID) for n in seg.segment_numbers}
    assert segments == tracking
    signed = hd.sr.srread(signed_path)
    assert signed.VerificationFlag == "VERIFIED"
    (predecessor,) = signed.PredecessorDocumentsSequence
    ai_sr_uid = str(sr.SOPInstanceUID)
    assert ai_sr_uid in {
        str(i.ReferencedSOPInstanceUID)
        for s in predecessor.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }


def test_a_second_export_gives_the_same_uids_and_the_options_what_they_say(
    exported: Exported,
) -> None:
    plain, options = manifest(exported.plain), manifest(exported.options)
    assert plain["study_uid"] == options["study_uid"]
    assert {f["sop_instance_uid"] for f in plain["files"]} == {
        f["sop_instance_uid"] for f in options["files"]
    }
    assert options["options"] == ["retain-full-dates", "clean-descriptors"]
    original = header(exported.study.files[0])
    (first_plain, first_options) = (
        header(files_of(folder, "image")[0]) for folder in (exported.plain, exported.options)
    )
    codes = {c.CodeValue for c in first_options.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113106"}
    assert {c.CodeValue for c in first_plain.DeidentificationMethodCodeSequence} == {"113100"}
    assert first_options.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert first_options.StudyDate == original.StudyDate != ""
    assert first_options.SeriesDescription == CLEAN_SERIES_DESCRIPTION
    assert "StudyDescription" not in first_options  # it named the patient
    assert first_options.PatientBirthDate == ""  # the patient's, not the study's, date
    assert first_plain.LongitudinalTemporalInformationModified == "REMOVED"
    assert first_plain.StudyDate == ""
    # The patient's pseudonym is the same in every object of both exports.
    ids = {
        str(header(p).PatientID)
        for folder in (exported.plain, exported.options)
        for p in files_of(folder)
    }
    assert len(ids) == 1 and ids.pop().startswith("ANON-")


def test_an_export_as_received_copies_the_files(exported: Exported) -> None:
    written = sorted(p.read_bytes() for p in files_of(exported.received))
    assert written == sorted(p.read_bytes() for p in exported.sources)


def test_exports_are_audited_with_uids_only(exported: Exported) -> None:
    entries = Audit(exported.study.store).query(action="study_export")
    assert len(entries) == 3
    assert {e.study_uid for e in entries} == {exported.study.study_uid}
    text = json.dumps([e.detail for e in entries])
    assert not [s for s in IDENTIFYING if s in text]
    by_out = {e.detail["deidentified"]: e for e in entries}
    assert by_out[False].detail["exported_study_uid"] == exported.study.study_uid
    deidentified = [e.detail for e in entries if e.detail["deidentified"]]
    assert {d["exported_study_uid"] for d in deidentified} == {
        manifest(exported.plain)["study_uid"]
    }
    assert all(d["files"] == len(exported.sources) for d in deidentified)


def test_the_key_is_the_owners_alone(exported: Exported) -> None:
    keys = exported.study.config.data_dir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "deid.key").stat().st_mode) == 0o600


@pytest.mark.usefixtures("fresh_logging")  # `aidx` runs in-process under capsys
def test_bad_input_is_refused_and_nothing_is_written(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = exported.study
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me", encoding="utf-8")
    capsys.readouterr()

    assert export(study, taken, "--deidentify") == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]

    bad = ReviewedStudy.__new__(ReviewedStudy)
    bad.config, bad.study_uid = study.config, "1.2.3.999"
    assert export(bad, tmp_path / "new", "--deidentify") == 2
    err = capsys.readouterr().err
    assert "no study 1.2.3.999" in err and "aidx status" in err

    assert export(study, tmp_path / "new", "--retain-full-dates") == 2
    assert "go with --deidentify" in capsys.readouterr().err

    image = exported.sources[3]
    moved = image.rename(tmp_path.parent / image.name)
    try:
        assert export(study, tmp_path / "new", "--deidentify") == 1
    finally:
        moved.rename(image)
    err = capsys.readouterr().err
    sop = str(header(image).SOPInstanceUID)
    assert f"the image {sop} is not at {image}" in err and "nothing was written" in err
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no export, no partial folder


def test_cleaning_knows_chinese_names_and_text_items() -> None:
    """Clean Descriptors and structured content on small data sets: a description or a TEXT
    content item that holds a name of the export (a Chinese name's one- or two-character
    components too) goes; one that holds none stays."""
    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    image.SOPInstanceUID = "1.2.3.4.1"
    image.PatientName = "Wang^Fang=王^芳"
    image.StudyDescription = "胸部CT 王芳"
    image.SeriesDescription = "Lung 1.25 mm"
    image.ImageComments = "for Dr. Wang"
    text = Dataset()
    text.ValueType = "TEXT"
    text.TextValue = "reviewed with 王芳's family"
    plain_text = Dataset()
    plain_text.ValueType = "TEXT"
    plain_text.TextValue = "Nodule 1"
    image.ContentSequence = [text, plain_text]
    deid = Deidentifier(b"k" * 32, Options(clean_descriptors=True))
    deid.learn(image)
    out = deid.apply(image)
    assert "StudyDescription" not in out and "ImageComments" not in out
    assert out.SeriesDescription == "Lung 1.25 mm"
    assert [i.TextValue for i in out.ContentSequence] == ["ANONYMIZED", "Nodule 1"]
    assert out.PatientName == "" and out.SOPInstanceUID == deid.uid("1.2.3.4.1")
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
