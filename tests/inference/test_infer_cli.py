"""`aidx infer` end to end: a study folder in, findings.json, SR and SEG out, as a user runs it."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from inference.results_common import finding_colour
from inference.sr import finding_groups
from tests.conftest import IN_CI, require_tool
from tests.enhanced_ct import write_legacy_enhanced_ct
from tests.standin_model import card, soft_tissue_model
from training.phantom import NoduleRequest, PhantomOptions, generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("infer")
    generate(
        root / "study",
        PhantomOptions(
            seed=31,
            slices=40,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    model = soft_tissue_model(root / "model.onnx")
    card_path = root / "card.json"
    card_path.write_text(json.dumps(card(model)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env["AIDX_MODELS__DEFAULT"] = "soft-tissue"
    # The stand-in's large components only (a few findings, each of which costs SR, SEG and key
    # image time); the test that looks for the phantom's nodule sets NODULE_MIN_VOLUME_MM3.
    env["AIDX_INFERENCE__MIN_VOLUME_MM3"] = "3000"
    return {"root": root, "model": model, "card": card_path, "env": env}


# Small enough for the part of the 14 mm nodule that the stand-in flags.
NODULE_MIN_VOLUME_MM3 = "50"


def aidx(
    setup: dict[str, Any], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "aidx"), "--data-dir", str(setup["root"] / "d")]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={**setup["env"], **(env or {})},
        check=False,
    )


def test_infer_without_a_model_says_how_to_get_one(setup: dict[str, Any]) -> None:
    result = aidx(setup, "infer", str(setup["root"] / "study"), "--out", "/tmp/none")
    assert result.returncode == 1
    assert "aidx models register" in result.stderr


def test_infer_writes_findings_sr_and_seg(setup: dict[str, Any], tmp_path: Path) -> None:
    assert (
        aidx(
            setup, "models", "register", str(setup["model"]), "--card", str(setup["card"])
        ).returncode
        == 0
    )
    assert aidx(setup, "models", "promote", "soft-tissue@0.0.1").returncode == 0
    out = tmp_path / "out"
    result = aidx(
        setup,
        "infer",
        str(setup["root"] / "study" / "dicom"),
        "--out",
        str(out),
        "--key-images",
        "--kos",
        "--cornerstone-sr",
        env={"AIDX_INFERENCE__MIN_VOLUME_MM3": NODULE_MIN_VOLUME_MM3},
    )
    assert result.returncode == 0, result.stderr
    assert "on CPUExecutionProvider" in result.stdout
    findings = json.loads((out / "findings.json").read_text(encoding="utf-8"))
    truth = json.loads((setup["root"] / "study" / "ground_truth.json").read_text(encoding="utf-8"))
    assert findings["study_instance_uid"] == truth["study_instance_uid"]
    assert findings["series_instance_uid"] == truth["series_instance_uid"]
    assert findings["model"] == {"name": "soft-tissue", "version": "0.0.1"}
    assert findings["findings"], "soft tissue must be found"
    # The isolated nodule is one of the findings, near its true centre.
    centre = truth["nodules"][0]["center_mm"]
    nearest = min(
        findings["findings"],
        key=lambda f: sum((a - b) ** 2 for a, b in zip(f["center_mm"], centre, strict=True)),
    )
    assert sum((a - b) ** 2 for a, b in zip(nearest["center_mm"], centre, strict=True)) < 2.0**2
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.StudyInstanceUID == truth["study_instance_uid"]
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.number_of_segments == len(findings["findings"])
    # The volume reported is exactly that of the finding's SEG segment (as dcmqi and
    # cornerstone count it: its voxels times the voxel size).
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    numbers = [
        f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    voxels = sum(int(frame.sum()) for frame, n in zip(frames, numbers, strict=True) if n == 1)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
    voxel_mm3 = row_mm * col_mm * float(measures.SliceThickness)
    assert findings["findings"][0]["volume_mm3"] == pytest.approx(voxels * voxel_mm3, rel=1e-3)
    key_images = sorted((out / "key_images").glob("*.dcm"))
    assert len(key_images) == len(findings["findings"])
    first = pydicom.dcmread(key_images[0])
    assert first.SOPClassUID == SecondaryCaptureImageStorage
    assert first.BurnedInAnnotation == "YES"
    assert first.StudyInstanceUID == truth["study_instance_uid"]
    pixels = first.pixel_array
    assert ((pixels == (255, 40, 40)).all(axis=2)).any(), "the outline is burned in"
    # It names the slice it shows (a viewer can jump there) and the study it belongs to.
    (source,) = first.SourceImageSequence
    key_sop = findings["findings"][0]["key_sop_instance_uid"]
    assert source.ReferencedSOPInstanceUID == key_sop
    assert source.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    slice_file = next((setup["root"] / "study" / "dicom").glob("*.dcm"))
    described = pydicom.dcmread(slice_file, stop_before_pixels=True).StudyDescription
    assert described and first.StudyDescription == described
    assert "burned in" in first.DerivationDescription
    # The key slices flagged for the PACS: a KOS that references each finding's key slice.
    assert f"key object selection: {out / 'kos.dcm'}" in result.stdout
    kos = pydicom.dcmread(out / "kos.dcm")
    flagged = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    }
    assert flagged == {f["key_sop_instance_uid"] for f in findings["findings"]}
    # The SR variant OHIF/Cornerstone3D hydrate: the same report under its own UID, with the
    # Cornerstone tool's tag before each tracking identifier (tests/viewers load it).
    assert f"SR for Cornerstone3D/OHIF: {out / 'sr-cornerstone.dcm'}" in result.stdout
    variant = hd.sr.srread(out / "sr-cornerstone.dcm")
    assert variant.SOPInstanceUID != sr.SOPInstanceUID
    assert variant.SeriesInstanceUID == sr.SeriesInstanceUID
    assert isinstance(variant.content, hd.sr.MeasurementReport)
    assert [str(g.tracking_identifier) for g in finding_groups(variant.content)] == [
        f"Cornerstone3DTools@^0.1.0:Bidirectional:Nodule {f['id']}" for f in findings["findings"]
    ]
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    names = ("sr.dcm", "sr-cornerstone.dcm", "seg.dcm", "kos.dcm")
    for name in (*names, f"key_images/{key_images[0].name}"):
        report = subprocess.run(
            [dciodvfy, str(out / name)], capture_output=True, text=True, check=False
        )
        errors = [
            line
            for line in (report.stdout + report.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert not errors, errors


def test_a_study_without_ct_is_not_applicable(setup: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "note.txt").write_text("not DICOM", encoding="utf-8")
    aidx(setup, "models", "register", str(setup["model"]), "--card", str(setup["card"]))
    aidx(setup, "models", "promote", "soft-tissue@0.0.1")
    result = aidx(setup, "infer", str(empty), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "not applicable: the study has no readable DICOM images" in result.stderr


def _dcmqi(name: str) -> str:
    """A dcmqi program from this environment (the [dev] extra's pinned dcmqi wheel)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    message = f"{name} not found: pip install the [dev] extra (dcmqi==1.5.7)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _nrrd_voxels(path: Path) -> tuple[int, float]:
    """(non-zero voxels, voxel volume mm³) of a NRRD file as dcmqi writes it (gzip, little
    endian, axis-aligned space directions)."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields = dict(
        line.split(": ", 1) for line in head.decode("ascii").splitlines()[1:] if ": " in line
    )
    assert fields["encoding"] == "gzip" and fields["endian"] == "little", fields
    dtype = {"short": "<i2", "unsigned short": "<u2", "unsigned char": "u1"}[fields["type"]]
    data = np.frombuffer(gzip.decompress(body), dtype=dtype)
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])
    lengths = [float(np.linalg.norm([float(v) for v in vec.split(",")])) for vec in vectors]
    return int(np.count_nonzero(data)), float(np.prod(lengths))


def test_dcmqi_reads_the_sr_and_seg_as_slicer_does(setup: dict[str, Any], tmp_path: Path) -> None:
    """dcmqi (what 3D Slicer's QuantitativeReporting reads DICOM with) on aidx's results: each
    segment with its label, tracking UID and display colour, and exactly the volume the SR
    reports; the SR's measurements per finding, under the same tracking UIDs."""
    segimage2itkimage, tid1500reader = (_dcmqi(n) for n in ("segimage2itkimage", "tid1500reader"))
    aidx(setup, "models", "register", str(setup["model"]), "--card", str(setup["card"]))
    assert aidx(setup, "models", "promote", "soft-tissue@0.0.1").returncode == 0
    out = tmp_path / "out"
    result = aidx(setup, "infer", str(setup["root"] / "study" / "dicom"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    findings_file = json.loads((out / "findings.json").read_text(encoding="utf-8"))
    findings = findings_file["findings"]
    assert findings
    converted = subprocess.run(
        [
            segimage2itkimage,
            "--inputDICOM",
            str(out / "seg.dcm"),
            "--outputDirectory",
            str(tmp_path),
            "--prefix",
            "seg",
            "-t",
            "nrrd",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert converted.returncode == 0, converted.stdout + converted.stderr
    meta = json.loads((tmp_path / "seg-meta.json").read_text(encoding="utf-8"))
    segments = [s for group in meta["segmentAttributes"] for s in group]
    assert [s["SegmentLabel"] for s in segments] == [f"Nodule {f['id']}" for f in findings]
    for n, (segment, finding) in enumerate(zip(segments, findings, strict=True)):
        assert segment["recommendedDisplayRGBValue"] == list(finding_colour(n))
        voxels, voxel_mm3 = _nrrd_voxels(tmp_path / f"seg-{n + 1}.nrrd")
        assert voxels * voxel_mm3 == pytest.approx(finding["volume_mm3"], rel=1e-3)
    report = tmp_path / "sr.json"
    read = subprocess.run(
        [tid1500reader, "--inputDICOM", str(out / "sr.dcm"), "--outputMetadata", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert read.returncode == 0, read.stdout + read.stderr
    read_back = json.loads(report.read_text(encoding="utf-8"))
    seg_uid = str(pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True).SOPInstanceUID)
    # Slicer loads the SEG that the SR's evidence lists, and pairs segment i with group i.
    assert read_back["compositeContext"] == [seg_uid]
    groups = read_back["Measurements"]
    assert [g["TrackingUniqueIdentifier"] for g in groups] == [
        s["TrackingUniqueIdentifier"] for s in segments
    ]
    series_uid = findings_file["series_instance_uid"]
    for number, (group, finding) in enumerate(zip(groups, findings, strict=True), start=1):
        # TID 1411: each group names its segment, the SEG and the segmented series.
        assert group["ReferencedSegment"] == number
        assert group["segmentationSOPInstanceUID"] == seg_uid
        assert group["SourceSeriesForImageSegmentation"] == series_uid
        assert group["FindingSite"]["CodeMeaning"] == "Lung"
        values = {
            i["quantity"]["CodeMeaning"]: float(i["value"]) for i in group["measurementItems"]
        }
        assert values["Diameter"] == pytest.approx(finding["diameter_mm"], abs=0.01)
        assert 0 < values["Short Axis"] <= values["Long Axis"]
        assert values["Volume"] == pytest.approx(finding["volume_mm3"], abs=0.01)
        assert values["Probability"] == pytest.approx(100 * finding["probability"], abs=0.1)
        (maximum,) = [i for i in group["measurementItems"] if "derivationModifier" in i]
        assert maximum["derivationModifier"]["CodeMeaning"] == "Maximum"


def test_infer_on_an_enhanced_ct_finds_what_the_single_frame_series_gives(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """`aidx infer` on the study as one Legacy Converted Enhanced CT instance (highdicom's
    converter; Enhanced CT Image Storage goes through Orthanc in tests/pipeline): the same
    findings, keyed to the instance's frames, and results that dciodvfy passes."""
    aidx(setup, "models", "register", str(setup["model"]), "--card", str(setup["card"]))
    assert aidx(setup, "models", "promote", "soft-tissue@0.0.1").returncode == 0
    dicom = setup["root"] / "study" / "dicom"
    ct = write_legacy_enhanced_ct(dicom, tmp_path / "ct" / "ct.dcm")
    single, multi = tmp_path / "single", tmp_path / "multi"
    for source, out in ((dicom, single), (ct.parent, multi)):
        done = aidx(setup, "infer", str(source), "--out", str(out), "--kos", "--key-images")
        assert done.returncode == 0, done.stderr
    expected, found = (
        json.loads((out / "findings.json").read_text(encoding="utf-8"))["findings"]
        for out in (single, multi)
    )
    assert expected
    for f, e in zip(found, expected, strict=True):
        assert f["key_sop_instance_uid"] == str(pydicom.dcmread(ct).SOPInstanceUID)
        assert f["key_frame_number"] >= 1
        f.pop("key_sop_instance_uid"), f.pop("key_frame_number"), e.pop("key_sop_instance_uid")
        assert f == e
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    key_image = next((multi / "key_images").glob("*.dcm"))
    for path in (multi / "sr.dcm", multi / "seg.dcm", multi / "kos.dcm", key_image):
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [
            line
            for line in (report.stdout + report.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert not errors, (path.name, errors)
