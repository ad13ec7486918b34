"""aidx's SR and SEG as the viewers' own loading code reads them: OHIF 3.13's SR and SEG
extensions and Cornerstone3D 5.14's adapters, run in Node by tests/viewers/node (its README says
what is real and what is stubbed). dcmqi (3D Slicer) is checked in tests/inference/test_infer_cli.

The results are written from a phantom's ground-truth nodules (two solid nodules, 12 and 8 mm),
so that each finding has a real nodule's outline.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference.results_common import finding_colour
from inference.seg import write_seg
from inference.sr import finding_groups, write_sr
from tests.conftest import IN_CI, REPO, require_tool
from tests.inference.results_case import MODEL, TWO_NODULES, Case, make_case

HARNESS = REPO / "tests" / "viewers" / "node"


@dataclass(frozen=True)
class Loaded:
    case: Case
    sr: dict[str, Any]  # the harness's JSON for the SR (and SEG)
    cornerstone: dict[str, Any]  # ... for the Cornerstone variant of the SR
    empty: dict[str, Any]  # ... for the SR of a series without findings
    sr_path: Path
    seg_path: Path


def load(images: Path, sr: Path, seg: Path | None = None) -> dict[str, Any]:
    node = require_tool("node", "nodejs")
    if not (HARNESS / "node_modules").is_dir():
        message = f"the viewer harness is not installed: npm ci --prefix {HARNESS} (make test)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    command = [node, str(HARNESS / "load_results.mjs"), "--images", str(images), "--sr", str(sr)]
    if seg is not None:
        command += ["--seg", str(seg)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    assert "error" not in result, result.get("error")
    return result


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    root = tmp_path_factory.mktemp("viewers")
    case = make_case(root / "phantom", TWO_NODULES)
    # As the pipeline reports it: the volume of the mask's voxels (the truth is analytic).
    voxel_mm3 = abs(float(np.linalg.det(case.volume.affine[:3, :3])))
    findings = [
        replace(f, volume_mm3=int(np.count_nonzero(f.mask)) * voxel_mm3) for f in case.findings
    ]
    case = replace(case, findings=findings)
    sr, seg = root / "sr.dcm", root / "seg.dcm"
    cornerstone, empty = root / "sr-cornerstone.dcm", root / "empty.dcm"
    write_sr(case.findings, case.datasets, MODEL, sr)
    write_seg(case.findings, case.datasets, MODEL, seg)
    write_sr(case.findings, case.datasets, MODEL, cornerstone, cornerstone=True)
    write_sr([], case.datasets, MODEL, empty)
    images = case.phantom.dicom_dir
    return Loaded(
        case,
        load(images, sr, seg),
        load(images, cornerstone),
        load(images, empty),
        sr,
        seg,
    )


def sr_values(path: Path) -> dict[str, dict[str, float]]:
    """Tracking UID -> {measurement meaning: value} of the SR, read with highdicom."""
    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return {
        str(g.tracking_uid): {m.name.meaning: float(m.value) for m in g.get_measurements()}
        for g in finding_groups(sr.content)
    }


def test_ohif_draws_each_finding_as_its_long_axis_on_its_key_slice(loaded: Loaded) -> None:
    ohif = loaded.sr["ohif_sr"]
    assert ohif["error"] is None, ohif["log"]
    assert ohif["displaySets"] == 1
    values = sr_values(loaded.sr_path)
    measurements = {m["TrackingUniqueIdentifier"]: m for m in ohif["measurements"]}
    assert set(measurements) == set(values)
    by_uid = {
        uid: f
        for f in loaded.case.findings
        for uid, v in values.items()
        if v["Volume"] == pytest.approx(f.volume_mm3)
    }
    for uid, m in measurements.items():
        finding = by_uid[uid]
        assert m["TrackingIdentifier"] == f"Nodule {finding.id}"
        # Attached to the CT and drawn: a 2-point line on the finding's key slice.
        assert m["loaded"] is True
        assert m["ReferencedSOPInstanceUID"] == finding.key_sop_instance_uid
        assert m["graphicType"] == "POLYLINE"
        assert len(m["points"]) == 2
        labels = {label["label"]: label["value"] for label in m["labels"]}
        mine = values[uid]
        assert labels["Long Axis"] == f"{mine['Long Axis']:.2f} mm"
        assert labels["Short Axis"] == f"{mine['Short Axis']:.2f} mm"
        assert labels["Volume"] == f"{mine['Volume']:.2f} mm3"
        # A percentage reads as one ("93.00 %"), where unit "1" read "0.93 1".
        assert labels["Probability"] == f"{100 * finding.probability:.2f} %"
        assert m["annotationLabel"] == labels["Long Axis"]
    # The standard SR is shown, not offered for editing: that is the Cornerstone variant's job.
    assert ohif["isRehydratable"] is False


def test_ohif_and_cornerstone_load_the_seg_with_the_srs_tracking_and_volumes(
    loaded: Loaded,
) -> None:
    values = sr_values(loaded.sr_path)
    seg = pydicom.dcmread(loaded.seg_path, stop_before_pixels=True)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    rows_mm, columns_mm = (float(v) for v in measures.PixelSpacing)
    voxel_mm3 = rows_mm * columns_mm * float(measures.SliceThickness)
    for name in ("ohif_seg", "cornerstone_seg"):
        result = loaded.sr[name]
        assert result["error"] is None, (name, result["log"][-5:])
        segments = result["segments"]
        assert [s["label"] for s in segments] == [f"Nodule {f.id}" for f in loaded.case.findings]
        for n, (segment, finding) in enumerate(zip(segments, loaded.case.findings, strict=True)):
            assert tuple(segment["color"]) == finding_colour(n), name
            uid = segment["trackingUID"]
            assert uid in values, name
            # The SR's Volume is exactly the segment's voxels, as each viewer counts them.
            assert segment["voxels"] * voxel_mm3 == pytest.approx(values[uid]["Volume"], rel=1e-9)
            assert values[uid]["Volume"] == pytest.approx(finding.volume_mm3)


def test_cornerstone_hydrates_the_cornerstone_variant_into_editable_bidirectional_tools(
    loaded: Loaded,
) -> None:
    values = sr_values(loaded.sr_path)  # the same measurements as the standard SR
    cornerstone = loaded.cornerstone["cornerstone_sr"]
    assert cornerstone["error"] is None, cornerstone["log"]
    tools = cornerstone["tools"]
    assert list(tools) == ["Bidirectional"]
    assert len(tools["Bidirectional"]) == len(loaded.case.findings)
    keys = {f.key_sop_instance_uid for f in loaded.case.findings}
    for tool in tools["Bidirectional"]:
        mine = values[tool["TrackingUniqueIdentifier"]]
        assert tool["referencedSOPInstanceUID"] in keys
        assert len(tool["points"]) == 4  # long axis ends, short axis ends
        (stats,) = tool["cachedStats"].values()
        assert stats["length"] == pytest.approx(mine["Long Axis"], abs=1e-3)  # JSON: 4 places
        assert stats["width"] == pytest.approx(mine["Short Axis"], abs=1e-3)
        assert tool["findingSites"] == ["SCT:39607008 Lung"]
    # OHIF offers it for editing and turns it into its own Bidirectional measurements.
    ohif = loaded.cornerstone["ohif_sr"]
    assert ohif["error"] is None, ohif["log"]
    assert all(m["loaded"] for m in ohif["measurements"])
    assert ohif["isRehydratable"] is True
    assert ohif["hydrate"]["error"] is None
    hydrated = ohif["hydrate"]["measurements"]
    assert [m["toolName"] for m in hydrated] == ["Bidirectional"] * len(loaded.case.findings)
    # The standard SR's groups match no Cornerstone tool (its tracking identifiers are plain).
    assert loaded.sr["cornerstone_sr"]["error"] is None
    assert loaded.sr["cornerstone_sr"]["tools"] == {}


def test_the_no_findings_report_opens_in_every_viewer(loaded: Loaded) -> None:
    ohif, cornerstone = loaded.empty["ohif_sr"], loaded.empty["cornerstone_sr"]
    assert ohif["error"] is None, ohif["log"]
    assert ohif["displaySets"] == 1
    assert ohif["measurements"] == []
    assert cornerstone["error"] is None, cornerstone["log"]
    assert cornerstone["tools"] == {}
    assert not [line for line in cornerstone["log"] if "Unable to generate" in line]
