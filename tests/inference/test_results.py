"""DICOM results: the TID 1500 SR and the SEG of a phantom's nodules, validated and read back.

The findings are built from the phantom's ground truth and its NIfTI label volume, mapped onto
the volume grid; the SEG must then overlay exactly the ground-truth voxels, which checks the
orientation of every step (NIfTI axes, instance order, volume order, SEG frame placement).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from inference.findings import Finding
from inference.results_common import finding_colour, result_uid, tracking_uid
from inference.seg import build_seg, write_seg
from inference.sr import build_sr, finding_groups, key_slice_point, write_sr
from inference.volume import Volume
from tests.inference.results_case import (
    ABSENT,
    CHINESE_NAME,
    DEVICE,
    DIAMETER,
    IMAGING_MEASUREMENTS,
    LONG_AXIS,
    LUNG,
    MAXIMUM,
    MODEL,
    MORPHOLOGICALLY_ABNORMAL,
    NODULE,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    SHORT_AXIS,
    TWO_NODULES,
    VOLUME,
    Case,
    dciodvfy_errors,
    make_case,
    report_of,
    text_items,
)
from training.phantom import NoduleRequest, PhantomOptions


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("results_phantom"), TWO_NODULES)


@pytest.fixture(scope="module")
def gb18030_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(
        tmp_path_factory.mktemp("results_gb18030"),
        PhantomOptions(
            seed=3,
            slices=16,
            matrix=64,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(12.0, "solid", "isolated", "smooth"),),
            patient_name=CHINESE_NAME,
            accession_number="ACC-北京-1",
            charset="GB18030",
            write_mask=True,
            workers=1,
        ),
    )


@dataclass(frozen=True)
class Written:
    sr: Path
    seg: Path
    empty_sr: Path


@pytest.fixture(scope="module")
def written(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Written:
    out = tmp_path_factory.mktemp("results")
    result = Written(out / "sr.dcm", out / "seg.dcm", out / "empty_sr.dcm")
    write_sr(case.findings, case.datasets, MODEL, result.sr)
    write_seg(case.findings, case.datasets, MODEL, result.seg)
    write_sr([], case.datasets, MODEL, result.empty_sr)
    return result


def placed_segments(seg_path: Path, volume: Volume) -> NDArray[np.bool_]:
    """The SEG's frames put back on the volume grid: (segment - 1, k, row, column).

    Each frame goes where its Image Position (Patient) says; its referenced source image must
    be the volume slice at that position.
    """
    ds = pydicom.dcmread(seg_path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    placed = np.zeros((len(ds.SegmentSequence), *volume.hu.shape), dtype=bool)
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        k, row, column = volume.to_index(position)
        assert abs(row) < 1e-3 and abs(column) < 1e-3, "frame origin is off the volume grid"
        assert abs(k - round(k)) < 1e-3, "frame lies between volume slices"
        k = round(k)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == volume.sop_uids[k]
        placed[number - 1, k] |= frame.astype(bool)
    return placed


# --------------------------------------------------------------------- ground truth mapping
def test_label_volume_maps_onto_the_volume_grid(case: Case) -> None:
    volume, datasets = case.volume, case.datasets
    # The phantom writes head first (instance 1 at the top); the volume runs foot to head.
    instances = [int(ds.InstanceNumber) for ds in datasets]
    assert instances == list(range(len(datasets), 0, -1))
    # Every labelled voxel lies, by the NIfTI affine (RAS), where the volume puts it (LPS).
    assert case.phantom.mask_path is not None
    image = nib.load(case.phantom.mask_path)
    assert isinstance(image, nib.Nifti1Image)
    ks, rows, columns = np.nonzero(case.labels)
    nifti_ijk = np.stack([columns, rows, np.array(instances)[ks] - 1, np.ones_like(ks)])
    ras = (image.affine @ nifti_ijk)[:3].T
    lps = ras * np.array([-1.0, -1.0, 1.0])
    indices = np.stack([ks, rows, columns], axis=1).astype(np.float64)
    assert np.allclose(lps, volume.to_patient(indices), atol=1e-3)
    # Each nodule's centre is inside its own label, on the ground truth's key slice.
    assert set(np.unique(case.labels)) == {0, 1, 2}
    for n in case.phantom.ground_truth["nodules"]:
        k, row, column = np.round(volume.to_index(n["center_mm"])).astype(int)
        assert case.labels[k, row, column] == n["id"]
        assert volume.sop_uids[k] == n["key_slice_sop_instance_uid"]


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["sr", "seg", "empty_sr"])
def test_dciodvfy_finds_no_errors(written: Written, name: str) -> None:
    path: Path = getattr(written, name)
    assert dciodvfy_errors(path) == []


# ----------------------------------------------------------------------------------- the SR
def test_sr_is_a_comprehensive_3d_sr_in_the_source_study(case: Case, written: Written) -> None:
    sr = pydicom.dcmread(written.sr)
    source = case.datasets[0]
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    for keyword in ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyID"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == 9001
    assert sr.SeriesDescription == "AI nodule findings (aidx nodule-detector@1.2.0)"
    assert sr.Manufacturer == "aidx"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    # The evidence is the whole series (what the model looked at) and the SEG written beside
    # the SR (3D Slicer loads the SEG it finds there with the report).
    evidence = {uid for _, _, uid, _ in hd.sr.srread(written.sr).get_evidence()}
    seg = pydicom.dcmread(written.seg, stop_before_pixels=True)
    assert evidence == {*case.volume.sop_uids, str(seg.SOPInstanceUID)}
    (empty,) = [hd.sr.srread(written.empty_sr)]
    assert {uid for _, _, uid, _ in empty.get_evidence()} == set(case.volume.sop_uids)


def test_sr_observer_procedure_and_image_library(case: Case, written: Written) -> None:
    report = report_of(written.sr)
    (observer,) = report.get_observer_contexts(observer_type=DEVICE)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert (attributes.name, attributes.manufacturer_name, attributes.model_name) == (
        "aidx",
        "aidx",
        "nodule-detector@1.2.0",
    )
    root = report[0]
    procedures = [
        item.ConceptCodeSequence[0].CodeValue
        for item in root.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert procedures == ["169069000"]
    (library,) = hd.sr.utils.find_content_items(root, name=Code("111028", "DCM", "Image Library"))
    images = hd.sr.utils.find_content_items(library, value_type="IMAGE", recursive=True)
    library_uids = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images]
    assert sorted(library_uids) == sorted(f.key_sop_instance_uid for f in case.findings)


def test_sr_groups_carry_every_value_of_the_findings(case: Case, written: Written) -> None:
    report = report_of(written.sr)
    assert report.get_image_measurement_groups() == []
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(case.findings)
    seg = pydicom.dcmread(written.seg, stop_before_pixels=True)
    for number, finding in enumerate(case.findings, 1):
        (group,) = report.get_volumetric_roi_measurement_groups(
            tracking_uid=tracking_uid(case.volume.series_uid, MODEL, finding.id)
        )
        assert group.tracking_identifier == f"Nodule {finding.id}"
        assert group.finding_type == NODULE
        assert [site.value for site in group.finding_sites] == [LUNG]
        texts = text_items(group)
        assert (texts["111001"], texts["111003"]) == ("nodule-detector", "1.2.0")
        # TID 1411: the finding's segment in the SEG written beside the SR, and its source.
        segment = group.referenced_segment
        assert segment is not None
        reference = segment[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(reference.ReferencedSegmentNumber) == number
        assert case.volume.series_uid == segment[1].UID
        long_axis, short_axis = check_axes(group, finding, case)
        expected = (
            (LONG_AXIS, long_axis, "mm"),
            (SHORT_AXIS, short_axis, "mm"),
            (DIAMETER, finding.diameter_mm, "mm"),
            (VOLUME, finding.volume_mm3, "mm3"),
            (PROBABILITY, 100.0 * finding.probability, "%"),
        )
        for name, value, unit in expected:
            (measurement,) = group.get_measurements(name=name)
            assert measurement.value == pytest.approx(value, rel=1e-6), name.meaning
            assert measurement.unit.value == unit
        (diameter,) = group.get_measurements(name=DIAMETER)
        assert diameter.derivation == MAXIMUM
        # Reported sizes are those of the nodule: a sphere's axes within a pixel or two of
        # its diameter, the short axis no longer than the long one.
        assert long_axis == pytest.approx(finding.diameter_mm, abs=2.0)
        assert 0.6 * long_axis <= short_axis <= long_axis


def check_axes(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, finding: Finding, case: Case
) -> tuple[float, float]:
    """Each axis NUM is INFERRED FROM a 2-point POLYLINE on the key slice whose ends lie on the
    finding's outline there and whose length is the NUM's value; the two lines are
    perpendicular. Returns the two lengths (mm), measured from the coordinates."""
    k = case.volume.sop_uids.index(finding.key_sop_instance_uid)
    key = case.datasets[k]
    spacing = np.array([float(v) for v in key.PixelSpacing])  # (rows, columns)
    directions = []
    lengths = []
    for name in (LONG_AXIS, SHORT_AXIS):
        (measurement,) = group.get_measurements(name=name)
        (line,) = measurement.referenced_coordinates
        assert isinstance(line, hd.sr.CoordinatesForMeasurement)
        assert line.GraphicType == "POLYLINE"
        source = line.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == finding.key_sop_instance_uid
        points = np.array(line.GraphicData, dtype=np.float64).reshape(2, 2)  # (column, row)
        rows_columns = points[:, ::-1] - 0.5  # back to pixel index (row, column)
        delta = (rows_columns[1] - rows_columns[0]) * spacing
        lengths.append(float(np.linalg.norm(delta)))
        assert lengths[-1] == pytest.approx(measurement.value, rel=1e-6)
        directions.append(delta / lengths[-1])
        # Each end lies on the outline: within a pixel of a masked pixel.
        mask = finding.mask[k]
        inside = np.argwhere(mask)
        for end in rows_columns:
            nearest = np.min(np.linalg.norm(inside - end, axis=1))
            assert nearest <= 1.0
    assert abs(float(directions[0] @ directions[1])) < 1e-4  # Graphic Data is float32
    return lengths[0], lengths[1]


def test_key_slice_point_puts_pixel_centres_at_half_pixels(case: Case) -> None:
    key = case.datasets[7]
    centre = case.volume.to_patient([7, 10, 20])  # voxel (k, row, column)
    assert key_slice_point(key, centre) == pytest.approx((20.5, 10.5))


def test_sr_without_findings_says_no_nodule(case: Case, written: Written) -> None:
    """TID 1500's "searched, none found": no measurement group, and a Qualitative Evaluations
    container saying Nodule: Absent; the device observer names the model."""
    report = report_of(written.empty_sr)
    assert finding_groups(report) == []
    root = report[0]
    (measurements,) = hd.sr.utils.find_content_items(root, name=IMAGING_MEASUREMENTS)
    assert "ContentSequence" not in measurements
    (evaluations,) = hd.sr.utils.find_content_items(root, name=QUALITATIVE_EVALUATIONS)
    (absent,) = evaluations.ContentSequence
    assert (absent.ValueType, absent.RelationshipType) == ("CODE", "CONTAINS")
    assert absent.ConceptNameCodeSequence[0].CodeValue == NODULE.value
    assert absent.ConceptCodeSequence[0].CodeValue == ABSENT.value
    (observer,) = report.get_observer_contexts(observer_type=DEVICE)
    assert observer.observer_identifying_attributes.model_name == "nodule-detector@1.2.0"
    empty = pydicom.dcmread(written.empty_sr)
    assert empty.StudyInstanceUID == case.volume.study_uid
    # The same series and instance as an SR with findings would have: it replaces it.
    full = pydicom.dcmread(written.sr)
    assert (empty.SeriesInstanceUID, empty.SOPInstanceUID) == (
        full.SeriesInstanceUID,
        full.SOPInstanceUID,
    )


# ---------------------------------------------------------------------------------- the SEG
def test_seg_segments_describe_the_findings_with_the_srs_tracking(
    case: Case, written: Written
) -> None:
    seg = hd.seg.segread(written.seg)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == case.volume.study_uid
    assert seg.SeriesNumber == 9002
    assert seg.number_of_segments == len(case.findings)
    sr_tracking = {
        g.tracking_identifier: g.tracking_uid
        for g in report_of(written.sr).get_volumetric_roi_measurement_groups()
    }
    for number, finding in enumerate(case.findings, 1):
        description = seg.get_segment_description(number)
        assert description.segment_label == f"Nodule {finding.id}"
        assert description.tracking_id == f"Nodule {finding.id}"
        assert description.tracking_uid == sr_tracking[f"Nodule {finding.id}"]
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert (algorithm[0].AlgorithmName, algorithm[0].AlgorithmVersion) == (
            "nodule-detector",
            "1.2.0",
        )
        assert description.segmented_property_category == MORPHOLOGICALLY_ABNORMAL
        assert description.segmented_property_type == NODULE
        assert description.anatomic_regions == [LUNG]
        # each segment in the colour the review app draws the finding in (Slicer, OHIF)
        shown = hd.color.CIELabColor.from_dicom_value(
            tuple(description.RecommendedDisplayCIELabValue)
        ).to_rgb()
        wanted = finding_colour(number - 1)
        assert all(abs(a - b) <= 2 for a, b in zip(shown, wanted, strict=True)), (shown, wanted)
    colours = {
        tuple(seg.get_segment_description(n).RecommendedDisplayCIELabValue)
        for n in range(1, seg.number_of_segments + 1)
    }
    assert len(colours) == seg.number_of_segments  # no two segments alike


def test_seg_frames_overlay_exactly_the_ground_truth_voxels(case: Case, written: Written) -> None:
    placed = placed_segments(written.seg, case.volume)
    for number, finding in enumerate(case.findings, 1):
        assert np.array_equal(placed[number - 1], case.labels == finding.id), finding.id
    # Only frames that hold their segment are written.
    slices_per_segment = [
        int(np.any(case.labels == f.id, axis=(1, 2)).sum()) for f in case.findings
    ]
    expected_frames = sum(slices_per_segment)
    seg = pydicom.dcmread(written.seg)
    assert int(seg.NumberOfFrames) == expected_frames


def test_overlapping_masks_keep_both_segments(case: Case, tmp_path: Path) -> None:
    first = case.findings[0]
    assert first.mask is not None
    wider = first.mask | np.roll(first.mask, 2, axis=2)
    overlapping = replace(first, id=3, mask=wider)
    path = tmp_path / "overlap.dcm"
    write_seg([first, overlapping], case.datasets, MODEL, path)
    placed = placed_segments(path, case.volume)
    assert np.array_equal(placed[0], first.mask)
    assert np.array_equal(placed[1], wider)
    assert dciodvfy_errors(path) == []


# ---------------------------------------------------------------- identity and character sets
def test_writing_twice_reuses_the_uids(case: Case, written: Written, tmp_path: Path) -> None:
    for path, write in ((written.sr, write_sr), (written.seg, write_seg)):
        again = write(case.findings, case.datasets, MODEL, tmp_path / path.name)
        first = pydicom.dcmread(path)
        assert again.SOPInstanceUID == first.SOPInstanceUID
        assert again.SeriesInstanceUID == first.SeriesInstanceUID
        # Another model version is another result.
        other = write(
            case.findings,
            case.datasets,
            MODEL.model_copy(update={"version": "1.3.0"}),
            tmp_path / f"other_{path.name}",
        )
        assert other.SOPInstanceUID != first.SOPInstanceUID
        assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert (
        pydicom.dcmread(written.sr).SeriesInstanceUID
        != pydicom.dcmread(written.seg).SeriesInstanceUID
    )


def test_uids_tell_model_name_and_version_apart() -> None:
    # Name and version must not run together: det1 2.0 is not det 12.0.
    a = MODEL.model_copy(update={"name": "det1", "version": "2.0"})
    b = MODEL.model_copy(update={"name": "det", "version": "12.0"})
    assert result_uid("1.2.3", a, "sr-instance") != result_uid("1.2.3", b, "sr-instance")
    assert result_uid("1.2.3", a, "sr-instance") == result_uid("1.2.3", a, "sr-instance")
    assert tracking_uid("1.2.3", a, 1) != tracking_uid("1.2.3", a, 11)


@pytest.mark.parametrize(
    ("which", "charset"), [("case", "ISO_IR 192"), ("gb18030_case", "GB18030")]
)
def test_chinese_patient_name_survives_unchanged(
    request: pytest.FixtureRequest, which: str, charset: str, tmp_path: Path
) -> None:
    source: Case = request.getfixturevalue(which)
    sr_path, seg_path = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
    write_sr(source.findings, source.datasets, MODEL, sr_path)
    write_seg(source.findings, source.datasets, MODEL, seg_path)
    original = source.datasets[0]
    assert original.SpecificCharacterSet == charset
    raw_name = pydicom.dcmread(source.phantom.files[0]).get_item("PatientName").value
    for path in (sr_path, seg_path):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == charset
        assert str(ds.PatientName) == CHINESE_NAME
        assert ds.AccessionNumber == original.AccessionNumber
        # The same bytes as the source (read afresh: get_item gives the undecoded value).
        assert pydicom.dcmread(path).get_item("PatientName").value == raw_name
        assert dciodvfy_errors(path) == []


# --------------------------------------------------------------------------- bad arguments
def test_seg_needs_findings(case: Case) -> None:
    with pytest.raises(ValueError, match="no findings"):
        build_seg([], case.datasets, MODEL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("reversed", "not in volume order"),
        ("two_series", "differ in SeriesInstanceUID"),
        ("foreign_key_slice", "is not an image of series"),
        ("repeated_id", "finding ids repeat"),
        ("no_pixel_spacing", "lacks PixelSpacing"),
        ("no_mask", "has no mask"),
        ("empty_mask", "mask is empty"),
        ("mask_shape", "mask shape"),
    ],
)
def test_sr_refuses_what_it_cannot_report(case: Case, change: str, message: str) -> None:
    datasets, findings = bad_input(case, change)
    with pytest.raises(ValueError, match=message):
        build_sr(findings, datasets, MODEL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_mask", "has no mask"),
        ("mask_shape", "mask shape"),
        ("mask_dtype", "mask must be bool"),
        ("empty_mask", "mask is empty"),
        ("reversed", "not in volume order"),
        ("foreign_key_slice", "is not an image of series"),
    ],
)
def test_seg_refuses_what_it_cannot_write(case: Case, change: str, message: str) -> None:
    datasets, findings = bad_input(case, change)
    with pytest.raises(ValueError, match=message):
        build_seg(findings, datasets, MODEL)


def bad_input(case: Case, change: str) -> tuple[list[Dataset], list[Finding]]:
    datasets, findings = list(case.datasets), list(case.findings)
    first = findings[0]
    assert first.mask is not None
    if change == "reversed":
        datasets.reverse()
    elif change == "two_series":
        other = copy.deepcopy(datasets[-1])  # the fixture's datasets stay as they are
        other.SeriesInstanceUID = pydicom.uid.generate_uid()
        datasets[-1] = other
    elif change == "no_pixel_spacing":
        other = copy.deepcopy(datasets[3])
        del other.PixelSpacing
        datasets[3] = other
    elif change == "foreign_key_slice":
        findings[0] = replace(first, key_sop_instance_uid=pydicom.uid.generate_uid())
    elif change == "repeated_id":
        findings[1] = replace(findings[1], id=first.id)
    elif change == "no_mask":
        findings[0] = replace(first, mask=None)
    elif change == "mask_shape":
        findings[0] = replace(first, mask=first.mask[1:])
    elif change == "mask_dtype":
        findings[0] = replace(first, mask=first.mask.astype(np.uint8))
    elif change == "empty_mask":
        findings[0] = replace(first, mask=np.zeros_like(first.mask))
    else:
        raise AssertionError(change)
    return datasets, findings
