"""The synthetic chest CT: valid DICOM, truthful ground truth, realistic tissue, reproducible."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from skimage import filters, measure

from tests.conftest import require_tool
from training.phantom import (
    GROUND_TRUTH_FORMAT,
    NoduleRequest,
    PhantomError,
    PhantomOptions,
    PhantomResult,
    PlacementError,
    generate,
    make_plan,
)

REQUESTS = (
    NoduleRequest(12.0, "solid", "isolated", "smooth"),
    NoduleRequest(14.0, "ground-glass", "isolated", "lobulated"),
    NoduleRequest(16.0, "part-solid", "juxtavascular", "smooth"),
    NoduleRequest(10.0, "solid", "juxtapleural", "smooth"),
    NoduleRequest(18.0, "solid", "juxtavascular", "spiculated"),
    NoduleRequest(4.0, "solid", "isolated", "smooth"),
)
OPTIONS = PhantomOptions(
    seed=11, slices=120, slice_thickness=2.5, nodule_requests=REQUESTS, write_mask=True
)


class Volume:
    """The written series read back with pydicom only (independent of the generator's code)."""

    def __init__(self, result: PhantomResult) -> None:
        files = sorted(result.dicom_dir.glob("*.dcm"))
        self.datasets = [pydicom.dcmread(f) for f in files]
        self.datasets.sort(key=lambda d: int(d.InstanceNumber))
        first = self.datasets[0]
        self.spacing = float(first.PixelSpacing[0])
        self.origin = np.array([float(v) for v in first.ImagePositionPatient])
        self.z = np.array([float(d.ImagePositionPatient[2]) for d in self.datasets])
        self.hu = np.stack(
            [
                d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                for d in self.datasets
            ]
        )

    def index(self, point: NDArray[np.floating] | list[float]) -> tuple[int, int, int]:
        p = np.asarray(point, dtype=np.float64)
        k = int(np.argmin(np.abs(self.z - p[2])))
        row = round((p[1] - self.origin[1]) / self.spacing)
        col = round((p[0] - self.origin[0]) / self.spacing)
        return k, row, col

    def patch(self, point: NDArray[np.floating] | list[float], half: int = 1) -> NDArray[Any]:
        k, r, c = self.index(point)
        return self.hu[k, r - half : r + half + 1, c - half : c + half + 1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomResult:
    return generate(tmp_path_factory.mktemp("phantom"), OPTIONS)


@pytest.fixture(scope="module")
def volume(phantom: PhantomResult) -> Volume:
    return Volume(phantom)


# ----------------------------------------------------------------------------------- DICOM
def test_series_reads_back_as_a_consistent_ct_series(
    phantom: PhantomResult, volume: Volume
) -> None:
    truth = phantom.ground_truth
    assert len(volume.datasets) == OPTIONS.slices
    sop_uids = {d.SOPInstanceUID for d in volume.datasets}
    assert len(sop_uids) == OPTIONS.slices
    for i, ds in enumerate(volume.datasets, start=1):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT"
        assert ds.InstanceNumber == i
        assert ds.StudyInstanceUID == truth["study_instance_uid"]
        assert ds.SeriesInstanceUID == truth["series_instance_uid"]
        assert ds.FrameOfReferenceUID == truth["frame_of_reference_uid"]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert float(ds.SliceThickness) == 2.5
        assert ds.RescaleType == "HU"
    # Contiguous slices, head first, equally spaced along the slice normal.
    assert np.allclose(np.diff(volume.z), -2.5, atol=1e-3)
    assert 0.6 <= volume.spacing <= 0.9


def test_pixels_use_the_declared_12_bit_range(volume: Volume) -> None:
    for ds in volume.datasets[::17]:
        stored = ds.pixel_array
        assert stored.dtype == np.uint16
        assert int(stored.max()) <= 4095
        assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (12, 11, 0)


def test_dciodvfy_finds_no_errors(phantom: PhantomResult) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    files = sorted(phantom.dicom_dir.glob("*.dcm"))
    for path in (files[0], files[len(files) // 2], files[-1]):
        result = subprocess.run(
            [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        report = result.stdout + result.stderr
        assert "CTImage" in report, report
        assert "Error" not in report, report


# ---------------------------------------------------------------------------- ground truth
def test_ground_truth_lists_the_requested_nodules(phantom: PhantomResult) -> None:
    truth = json.loads(phantom.ground_truth_path.read_text(encoding="utf-8"))
    assert truth["format"] == GROUND_TRUTH_FORMAT
    assert truth["synthetic"] is True
    assert truth["seed"] == 11
    nodules = truth["nodules"]
    assert [n["id"] for n in nodules] == list(range(1, len(REQUESTS) + 1))
    for n, req in zip(nodules, REQUESTS, strict=True):
        assert (n["type"], n["location"], n["margin"]) == (req.density, req.location, req.margin)
        assert req.diameter_mm is not None
        # Long axis of the body as measured: the requested size within a few percent.
        assert n["diameter_mm"] == pytest.approx(req.diameter_mm, rel=0.12)
        sphere = np.pi / 6 * req.diameter_mm**3
        assert 0.3 * sphere < n["volume_mm3"] < 1.6 * sphere
        assert len(n["center_mm"]) == 3


def test_every_centre_lies_inside_its_nodule_with_the_right_density(
    phantom: PhantomResult, volume: Volume
) -> None:
    mask = _mask_in_dicom_order(phantom)
    for n in phantom.ground_truth["nodules"]:
        k, r, c = volume.index(n["center_mm"])
        assert mask[k, r, c] == n["id"], f"nodule {n['id']}: centre not in its label"
        assert volume.datasets[k].SOPInstanceUID == n["key_slice_sop_instance_uid"]
        centre_hu = float(np.mean(volume.patch(n["center_mm"])))
        inside = volume.hu[mask == n["id"]]
        if n["type"] == "solid":
            assert -100 < centre_hu < 120, n
            assert -100 < np.median(inside) < 120, n
        elif n["type"] == "ground-glass":
            assert -800 < centre_hu < -300, n
            assert -800 < np.median(inside) < -300, n
        else:  # part-solid: a solid core in ground glass
            assert -100 < centre_hu < 120, n
            assert np.percentile(inside, 20) < -300 < -100 < np.percentile(inside, 95), n


def test_mask_affine_puts_each_label_at_its_ground_truth_centre(phantom: PhantomResult) -> None:
    assert phantom.mask_path is not None
    image = nib.load(phantom.mask_path)
    labels = np.asarray(image.dataobj)
    for n in phantom.ground_truth["nodules"]:
        if n["margin"] != "smooth":
            continue  # lobes shift the centroid away from the nominal centre
        ijk = np.argwhere(labels == n["id"]).mean(axis=0)
        ras = image.affine @ np.append(ijk, 1.0)
        lps = np.array([-ras[0], -ras[1], ras[2]])
        assert np.linalg.norm(lps - np.array(n["center_mm"])) < 0.15 * n["diameter_mm"] + 1.0


def _mask_in_dicom_order(phantom: PhantomResult) -> NDArray[np.uint8]:
    assert phantom.mask_path is not None
    data = np.asarray(nib.load(phantom.mask_path).dataobj)
    return np.ascontiguousarray(
        data.transpose(2, 1, 0)
    )  # (column, row, slice) -> (slice, row, col)


# ---------------------------------------------------------------------------------- anatomy
def test_tissue_hu_ranges(phantom: PhantomResult, volume: Volume) -> None:
    plan = make_plan(replace(OPTIONS, write_mask=False))
    a = plan.scene.anatomy
    vessels = plan.scene.trees.vessels
    rng = np.random.default_rng(0)
    # Mid chest slices where the body has its full width.
    z_mid = [z for z in volume.z if 0.35 < a.u(z) < 0.55]
    assert z_mid, "the scan must cover the mid chest"

    # Lung parenchyma away from vessels, airways and nodules.
    lo, hi = a.lung_bounds()
    lung_values = []
    nodule_centres = np.array([n["center_mm"] for n in phantom.ground_truth["nodules"]])
    while len(lung_values) < 60:
        p = rng.uniform(lo, hi)
        p[2] = rng.choice(z_mid)
        if not a.in_lung(p[None, :], margin=6.0)[0]:
            continue
        if vessels.distance(p).min() < 4.0 or np.linalg.norm(nodule_centres - p, axis=1).min() < 25:
            continue
        lung_values.append(float(np.median(volume.patch(p, half=2))))
    assert -900 < np.median(lung_values) < -760

    z = z_mid[len(z_mid) // 2]
    fat_x = a.body_a - a.skin - 0.5 * a.fat * 1.35
    muscle_x = a.body_a - a.skin - a.fat * 1.35 - 0.5 * a.muscle_lat
    checks = {
        "subcutaneous fat": ([fat_x, 0.0, z], -140, -60),
        "chest wall muscle": ([muscle_x, 0.0, z], 15, 80),
        "outside air": ([0.0, -a.body_b_ant - 20.0, z], -1024, -960),
    }
    for name, (point, low, high) in checks.items():
        value = float(np.median(volume.patch(point, half=2)))
        assert low < value < high, f"{name}: {value:.0f} HU"

    # Vertebral body: cancellous bone inside a dense cortex (a slice through a vertebra).
    spine = [0.0, a.spine_center_y, z]
    vertebra = [v for v in volume.z if 0.3 < a.u(v) < 0.7]
    spine_values = [float(np.median(volume.patch([0.0, a.spine_center_y, v], 2))) for v in vertebra]
    assert 180 < np.median(spine_values) < 420  # most slices pass through a vertebral body
    k, r, c = volume.index(spine)
    ring = volume.hu[k, r - 30 : r + 30, c - 30 : c + 30]
    assert ring.max() > 600  # cortical bone


def test_vessel_cross_sections_look_like_small_nodules(
    phantom: PhantomResult, volume: Volume
) -> None:
    """The main false-positive source of real detectors must be there: round vessel sections."""
    plan = make_plan(replace(OPTIONS, write_mask=False))
    a = plan.scene.anatomy
    grid_x = volume.origin[0] + volume.spacing * np.arange(512)
    grid_y = volume.origin[1] + volume.spacing * np.arange(512)
    round_sections = []
    for u in (0.4, 0.55, 0.7):
        k = int(np.argmin(np.abs(volume.z - a.z_at(u))))
        lung = a.lung_level(grid_x[None, :], grid_y[:, None], float(volume.z[k])) < -3.0
        smoothed = filters.gaussian(volume.hu[k], sigma=1.0, preserve_range=True)
        blobs = measure.label(lung & (smoothed > -650))
        round_sections += [
            region
            for region in measure.regionprops(blobs)
            if 3.0 < region.area * volume.spacing**2 < 60.0 and region.eccentricity < 0.8
        ]
    assert len(round_sections) >= 20, len(round_sections)
    trees = plan.scene.trees
    radii = np.maximum(trees.vessels.r0, trees.vessels.r1)
    assert len(trees.vessels) > 3000
    assert radii.min() < 0.6 and radii.max() > 7.0
    assert len(trees.airway_wall) > 50


# --------------------------------------------------------------------------- reproducibility
SMALL = PhantomOptions(seed=3, slices=16, matrix=128, nodules=2, workers=1)


def _pixels(result: PhantomResult) -> list[bytes]:
    return [pydicom.dcmread(f).PixelData for f in sorted(result.dicom_dir.glob("*.dcm"))]


def test_same_seed_gives_the_same_pixels_and_uids(tmp_path: Path) -> None:
    one = generate(tmp_path / "one", SMALL)
    two = generate(tmp_path / "two", replace(SMALL, workers=2))  # parallelism changes nothing
    assert _pixels(one) == _pixels(two)
    assert one.ground_truth == two.ground_truth
    other = generate(tmp_path / "other", replace(SMALL, seed=4))
    assert _pixels(other) != _pixels(one)
    assert other.ground_truth["study_instance_uid"] != one.ground_truth["study_instance_uid"]


def test_no_nodules(tmp_path: Path) -> None:
    result = generate(tmp_path, replace(SMALL, nodules=0, write_mask=True))
    assert result.ground_truth["nodules"] == []
    assert result.mask_path is not None
    assert not np.asarray(nib.load(result.mask_path).dataobj).any()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_geometry_stays_in_clinical_ranges(seed: int) -> None:
    plan = make_plan(PhantomOptions(seed=seed, slices=300, nodules=0))
    grid = plan.scene.grid
    assert 0.6 <= grid.spacing <= 0.9
    assert 0.625 <= grid.thickness <= 2.5
    # The field of view holds the whole body.
    a = plan.scene.anatomy
    assert grid.x0 < -a.body_a and grid.x0 + 511 * grid.spacing > a.body_a


def test_smaller_matrix_keeps_a_clinical_field_of_view() -> None:
    full = make_plan(PhantomOptions(seed=9, nodules=0))
    small = make_plan(PhantomOptions(seed=9, nodules=0, matrix=256))
    assert small.scene.grid.spacing == pytest.approx(2 * full.scene.grid.spacing, rel=1e-4)


# ------------------------------------------------------------------------- patient identity
@pytest.mark.parametrize(("charset", "expected"), [(None, "ISO_IR 192"), ("GB18030", "GB18030")])
def test_chinese_patient_name_survives(tmp_path: Path, charset: str | None, expected: str) -> None:
    options = replace(
        SMALL,
        slices=8,
        nodules=0,
        patient_name="王^小明",
        patient_id="京A-0001",
        accession_number="ACC-北京-1",
        charset=charset,
    )
    result = generate(tmp_path, options)
    path = sorted(result.dicom_dir.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == expected
    assert str(ds.PatientName) == "王^小明"
    assert ds.PatientID == "京A-0001"
    assert ds.AccessionNumber == "ACC-北京-1"
    raw = path.read_bytes()
    assert "王".encode("gb18030" if expected == "GB18030" else "utf-8") in raw
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    assert "Error" not in report.stdout + report.stderr


def test_latin_name_keeps_latin_1(tmp_path: Path) -> None:
    result = generate(tmp_path, replace(SMALL, slices=8, patient_name="Müller^Jürgen"))
    ds = pydicom.dcmread(sorted(result.dicom_dir.glob("*.dcm"))[0])
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == "Müller^Jürgen"


# ------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slices": 2}, "slices must be 8..2000"),
        ({"matrix": 4096}, "matrix must be 64..1024"),
        ({"kernel": "BONE"}, "kernel must be one of"),
        ({"diameter_range": (1.0, 40.0)}, "3..30 mm"),
        ({"patient_birth_date": "1960-01-01"}, "YYYYMMDD"),
        ({"patient_name": "王^小明", "charset": "ISO_IR 100"}, "cannot be written in ISO_IR 100"),
    ],
)
def test_bad_options_are_clear_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(PhantomError, match=message):
        make_plan(replace(SMALL, **change))


def test_impossible_placement_says_what_to_do() -> None:
    crowded = replace(SMALL, slices=8, nodules=None, nodule_requests=(NoduleRequest(30.0),) * 12)
    with pytest.raises(PlacementError, match="fewer or smaller nodules"):
        make_plan(crowded)
