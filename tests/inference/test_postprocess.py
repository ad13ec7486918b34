"""Probability map to findings: centres, sizes, order, key slices and masks on the series grid.

The probability maps are Gaussian blobs placed at known patient positions on the grid of a real
preprocessed phantom (anisotropic model voxels), so every measurement has a known answer.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference.postprocess import (
    PostprocessError,
    Region,
    findings_from_probability,
    findings_from_regions,
)
from inference.preprocess import Preprocessed, PreprocessSpec, preprocess
from inference.volume import Volume, load_series
from training.phantom import PhantomOptions, generate

SPEC = PreprocessSpec(spacing_mm=(2.0, 1.5, 1.5), hu_window=(-1000.0, 400.0))
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, Preprocessed]:
    out = tmp_path_factory.mktemp("phantom")
    generate(out, PhantomOptions(seed=3, slices=40, matrix=128, slice_thickness=2.5, workers=1))
    volume = load_series(sorted((out / "dicom").glob("*.dcm")))
    return volume, preprocess(volume, SPEC)


def patient_grid(pre: Preprocessed) -> np.ndarray:
    """Patient coordinates (z, y, x, 3) of every model voxel centre."""
    index = np.stack(np.indices(pre.array.shape), axis=-1).astype(np.float64)
    return pre.to_patient(index)


def blob(points: np.ndarray, centre: np.ndarray, peak: float, diameter: float) -> np.ndarray:
    """A Gaussian of height ``peak`` that crosses THRESHOLD at ``diameter`` / 2 from its centre."""
    radius = diameter / 2
    sigma = radius / math.sqrt(2 * math.log(peak / THRESHOLD))
    r2 = np.sum((points - centre) ** 2, axis=-1)
    return np.asarray(peak * np.exp(-r2 / (2 * sigma**2)), dtype=np.float32)


def nearest_slice(volume: Volume, point: np.ndarray) -> str:
    along = np.array([volume.to_patient([k, 0, 0]) @ volume.normal for k in range(len(volume.hu))])
    return volume.sop_uids[int(np.argmin(np.abs(along - point @ volume.normal)))]


def series_voxel(volume: Volume, point: np.ndarray) -> tuple[int, int, int]:
    k, r, c = np.rint(volume.to_index(point)).astype(int)
    return int(k), int(r), int(c)


def test_blobs_become_findings(scan: tuple[Volume, Preprocessed]) -> None:
    volume, pre = scan
    points = patient_grid(pre)
    middle = pre.to_patient(np.asarray(pre.array.shape, dtype=np.float64) / 2)
    # Off-grid centres (fractions of a voxel), different sizes and heights.
    big = middle + np.array([-40.3, 10.7, -12.9])
    small = middle + np.array([35.2, -20.4, 15.3])
    split = middle + np.array([5.1, 45.6, 20.2])
    blobs = [blob(points, big, 0.8, 14.0), blob(points, small, 0.95, 8.0)]
    probability = np.maximum(*blobs)
    third = blob(points, split, 0.7, 10.0)
    # Cut the third blob in two with a plane of zeros: two components whose centres lie about
    # 5 mm apart, one finding.
    k_cut = int(np.rint(np.linalg.solve(pre.affine[:3, :3], split - pre.affine[:3, 3]))[0])
    third[k_cut] = 0.0
    probability = np.maximum(probability, third)
    # A lone voxel above threshold: noise, below the minimum volume.
    probability[2, 3, 4] = 0.99

    findings = findings_from_probability(
        probability, pre, volume, THRESHOLD, min_volume_mm3=5.0, merge_distance_mm=8.0
    )

    assert [f.id for f in findings] == [1, 2, 3]
    first, second, third_finding = findings
    # Ordered by probability (each blob's highest sample): the taller small blob first.
    assert first.probability == pytest.approx(float(blobs[1].max()), abs=1e-6)
    assert second.probability == pytest.approx(float(blobs[0].max()), abs=1e-6)
    assert third_finding.probability < second.probability
    # The volume reported is the mask's on the series grid (the SEG segment's, exactly), close
    # to the component's on the model grid.
    voxel_mm3 = abs(float(np.linalg.det(pre.affine[:3, :3])))
    series_voxel_mm3 = float(np.prod(volume.spacing))
    for finding, model_voxels in ((first, blobs[1] >= THRESHOLD), (second, blobs[0] >= THRESHOLD)):
        assert finding.mask is not None
        assert finding.volume_mm3 == pytest.approx(finding.mask.sum() * series_voxel_mm3)
        assert finding.volume_mm3 == pytest.approx(model_voxels.sum() * voxel_mm3, rel=0.2)
    for finding, centre, diameter in (
        (first, small, 8.0),
        (second, big, 14.0),
        (third_finding, split, 10.0),
    ):
        assert np.linalg.norm(np.array(finding.center_mm) - centre) < 1.0
        assert finding.diameter_mm == pytest.approx(diameter, abs=0.5)
        sphere = math.pi / 6 * diameter**3
        assert finding.volume_mm3 == pytest.approx(sphere, rel=0.25)
        lo, hi = (np.array(c) for c in finding.bbox_mm)
        assert np.all(lo < centre) and np.all(centre < hi)
        assert np.all(hi - lo > diameter - 3.5) and np.all(hi - lo < diameter + 3.5)
        assert finding.mask is not None
        # The key slice shows the finding: the slice of its centre, or for the cut blob (whose
        # centre lies in the cut) the slice where its cross-section is largest.
        key = volume.sop_uids.index(finding.key_sop_instance_uid)
        assert finding.mask[key].any()
        if finding is third_finding:
            assert key == int(np.argmax(finding.mask.sum(axis=(1, 2))))
        else:
            assert finding.key_sop_instance_uid == nearest_slice(volume, centre)
        assert finding.mask.shape == volume.hu.shape and finding.mask.dtype == np.bool_
        # (The cut blob's centre lies in the cut: its mask is checked on both sides below.)
        assert finding.mask[series_voxel(volume, centre)] or finding is third_finding
        series_mm3 = finding.mask.sum() * float(np.prod(volume.spacing))
        assert series_mm3 == pytest.approx(finding.volume_mm3)
    # Each mask covers its own lesion only.
    assert not first.mask[series_voxel(volume, big)]  # type: ignore[index]
    assert not second.mask[series_voxel(volume, small)]  # type: ignore[index]
    # The cut blob: both halves are in the one finding's mask.
    assert third_finding.mask is not None
    cut_normal = pre.affine[:3, 0] / np.linalg.norm(pre.affine[:3, 0])
    for side in (-1, 1):
        assert third_finding.mask[series_voxel(volume, split + side * 3.0 * cut_normal)]


def test_without_merging_the_cut_blob_is_two_findings(
    scan: tuple[Volume, Preprocessed],
) -> None:
    volume, pre = scan
    points = patient_grid(pre)
    centre = pre.to_patient(np.asarray(pre.array.shape, dtype=np.float64) / 2)
    probability = blob(points, centre, 0.9, 12.0)
    k_cut = int(np.rint(np.linalg.solve(pre.affine[:3, :3], centre - pre.affine[:3, 3]))[0])
    probability[k_cut] = 0.0
    merged = findings_from_probability(probability, pre, volume, THRESHOLD, merge_distance_mm=10)
    apart = findings_from_probability(probability, pre, volume, THRESHOLD, merge_distance_mm=3)
    assert len(merged) == 1 and len(apart) == 2
    assert merged[0].volume_mm3 == pytest.approx(sum(f.volume_mm3 for f in apart), rel=0.02)


def test_nothing_above_threshold_gives_no_findings(scan: tuple[Volume, Preprocessed]) -> None:
    volume, pre = scan
    probability = np.full(pre.array.shape, 0.2, dtype=np.float32)
    assert findings_from_probability(probability, pre, volume, THRESHOLD) == []


def test_a_component_exactly_at_the_threshold_is_measured(
    scan: tuple[Volume, Preprocessed],
) -> None:
    """A plateau at exactly the threshold (float16 maps, saturated networks) has no isosurface
    at that level; it is still a finding, measured by the surface just below its maximum."""
    volume, pre = scan
    probability = np.zeros(pre.array.shape, dtype=np.float32)
    k, r, c = (np.asarray(pre.array.shape) // 2).tolist()
    probability[k - 1 : k + 2, r - 3 : r + 4, c - 3 : c + 4] = THRESHOLD
    [finding] = findings_from_probability(probability, pre, volume, THRESHOLD)
    spacing = np.linalg.norm(pre.affine[:3, :3], axis=0)
    assert 4 * spacing[1] < finding.diameter_mm < 10 * spacing[1]


def test_a_component_outside_the_body_is_dropped(scan: tuple[Volume, Preprocessed]) -> None:
    """The air around the patient (where a network normalising each patch sees only noise) and
    the table are not the patient: a blob there is no finding; inside the lungs it is one."""
    volume, pre = scan
    assert pre.body is not None
    points = patient_grid(pre)
    corner = pre.to_patient(np.array([pre.array.shape[0] // 2, 4.0, 4.0]))
    assert not pre.body[pre.array.shape[0] // 2, 4, 4]
    in_air = blob(points, corner, 0.9, 6.0)
    assert findings_from_probability(in_air, pre, volume, THRESHOLD) == []
    assert len(findings_from_probability(in_air, replace(pre, body=None), volume, THRESHOLD)) == 1


def test_flipped_series_gets_the_same_finding_and_its_own_mask(
    scan: tuple[Volume, Preprocessed],
) -> None:
    volume, _ = scan
    # The same scan stored bottom-up (rows run anterior): model space is identical, the series
    # grid is not, so the mask must follow the series' own row order.
    rows = volume.hu.shape[1]
    origin = volume.origin + volume.col_dir * volume.spacing[1] * (rows - 1)
    flipped = replace(
        volume, hu=volume.hu[:, ::-1, :].copy(), col_dir=-volume.col_dir, origin=origin
    )
    results = []
    for v in (volume, flipped):
        pre = preprocess(v, SPEC)
        points = patient_grid(pre)
        centre = pre.to_patient(np.array([20.0, 100.3, 70.7]))  # in a lung
        found = findings_from_probability(blob(points, centre, 0.9, 10.0), pre, v, THRESHOLD)
        assert len(found) == 1
        results.append(found[0])
    a, b = results
    assert a == b  # masks are not compared by ==; everything else is
    assert a.mask is not None and b.mask is not None
    assert np.array_equal(a.mask, b.mask[:, ::-1, :])


def test_map_of_the_wrong_shape_is_refused(scan: tuple[Volume, Preprocessed]) -> None:
    volume, pre = scan
    with pytest.raises(PostprocessError, match="pass the runner's output"):
        findings_from_probability(np.zeros((3, 3, 3), np.float32), pre, volume, THRESHOLD)


def test_a_component_smaller_than_the_series_voxels_still_gets_a_mask(tmp_path: Path) -> None:
    """A coarse series (64² over the chest: 5.3 mm pixels) under a finer model grid: tiny
    components cover no series voxel centre. Each finding still gets a non-empty mask (the voxel
    holding its centre), so the SEG can be written and the job does not fail."""
    from aidx.config import load_config
    from inference.pipeline import infer_files
    from models.registry import Registry
    from tests.standin_model import install
    from training.phantom import NoduleRequest, PhantomOptions, generate

    result = generate(
        tmp_path / "study",
        PhantomOptions(
            seed=101,
            slices=24,
            matrix=64,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    name = install(tmp_path / "models", tmp_path)
    model = Registry(tmp_path / "models").resolve(None, name)
    config = load_config(env={}, overrides={"inference.min_volume_mm3": 50})
    files = sorted(Path(result.dicom_dir).glob("*.dcm"))
    out = infer_files(files, tmp_path / "out", config, model)
    assert out.report.findings
    assert all(f.mask is not None and f.mask.any() for f in out.report.findings)
    assert out.seg_path is not None and out.seg_path.exists()


def test_a_calibrated_model_ranks_by_size_and_peak_and_drops_below_the_threshold(
    scan: tuple[Volume, Preprocessed],
) -> None:
    """With a calibration, components are cut at its segmentation threshold, each finding's
    probability is the calibrated one (formula below), and ``threshold`` filters on it: a large
    saturated blob outranks a small saturated one, which falls below the operating point."""
    from inference.postprocess import calibrated
    from models.registry import Calibration

    volume, pre = scan
    points = patient_grid(pre)
    middle = pre.to_patient(np.asarray(pre.array.shape, dtype=np.float64) / 2)
    large, small = middle + np.array([-30.0, 0.0, 0.0]), middle + np.array([30.0, 0.0, 0.0])
    probability = np.maximum(
        blob(points, large, 0.999999, 16.0), blob(points, small, 0.999999, 5.0)
    )
    calibration = Calibration(
        segmentation_threshold=THRESHOLD,
        intercept=-6.0,
        volume_coef=1.0,
        max_coef=0.1,
        fitted_on="test",
    )
    everything = findings_from_probability(probability, pre, volume, 0.001, calibration=calibration)
    assert len(everything) == 2
    first, second = everything
    assert np.linalg.norm(np.asarray(first.center_mm) - large) < 1.5
    assert first.probability > second.probability
    voxel_mm3 = abs(float(np.linalg.det(pre.affine[:3, :3])))
    for f, centre in zip(everything, (large, small), strict=True):
        near = np.linalg.norm(points - np.asarray(f.center_mm), axis=-1) <= 3.0
        peak = min(float(probability[near].max()), 1 - 1e-6)
        # calibrated on the component's volume on the model grid (what it was fitted on)
        own = np.linalg.norm(points - centre, axis=-1) <= 20.0
        model_mm3 = float(((probability >= THRESHOLD) & own).sum()) * voxel_mm3
        z = -6.0 + math.log1p(model_mm3) + 0.1 * math.log(peak / (1 - peak))
        assert f.probability == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-6)
        assert calibrated(calibration, model_mm3, peak) == pytest.approx(f.probability)
    cut = (first.probability + second.probability) / 2
    (kept,) = findings_from_probability(probability, pre, volume, cut, calibration=calibration)
    assert kept.center_mm == first.center_mm


def test_detections_become_findings_each_measured_on_its_own(
    scan: tuple[Volume, Preprocessed],
) -> None:
    volume, pre = scan
    points = patient_grid(pre)
    middle = pre.to_patient(np.asarray(pre.array.shape, dtype=np.float64) / 2)
    near = middle + np.array([12.0, 0.0, 0.0])
    # two overlapping spheres (10 and 6 mm): separate detections stay separate findings
    regions = []
    for centre, diameter, p in ((middle, 10.0, 0.6), (near, 6.0, 0.9)):
        inside = np.sum((points - centre) ** 2, axis=-1) <= (diameter / 2) ** 2
        scored_at = np.linalg.solve(pre.affine[:3, :3], centre - pre.affine[:3, 3])
        regions.append(Region(p, np.argwhere(inside), scored_at))

    findings = findings_from_regions(regions, pre, volume)

    assert [f.probability for f in findings] == pytest.approx([0.9, 0.6])
    small, large = findings
    assert np.allclose(small.center_mm, near, atol=1e-6)  # where the detector scored it
    assert large.diameter_mm == pytest.approx(10.0, abs=2.0)
    assert small.diameter_mm == pytest.approx(6.0, abs=2.0)
    # the SEG mask's volume (the series' 2.7 x 2.7 x 2.5 mm voxels, coarse for a 10 mm sphere)
    assert large.volume_mm3 == pytest.approx(large.mask.sum() * float(np.prod(volume.spacing)))
    assert large.volume_mm3 == pytest.approx(math.pi / 6 * 10.0**3, rel=0.35)
    assert large.mask.sum() > small.mask.sum() > 0
    assert small.key_sop_instance_uid == nearest_slice(volume, near)
    with pytest.raises(PostprocessError, match="no voxels"):
        findings_from_regions([Region(0.5, np.zeros((0, 3), np.intp))], pre, volume)
