"""The canonical dataset format and its converters (phantoms, MSD, LUNA16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from numpy.typing import NDArray

from inference.preprocess import to_lps
from inference.volume import load_series
from tests.conftest import REPO
from training.converters import (
    luna16_dataset,
    main_phantoms,
    msd_dataset,
    phantom_dataset,
    read_metaimage,
)
from training.dataset import (
    COORDINATES,
    FORMAT,
    Case,
    Dataset,
    DatasetError,
    Lesion,
    case_label,
    case_volume,
    to_index,
    write_case,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_voxel(path: Path, center_lps: tuple[float, float, float]) -> tuple[int, int, int]:
    """The voxel of a written NIfTI file holding an LPS point, using only nibabel's affine."""
    image: Any = nib.load(path)
    ras = LPS_TO_RAS @ np.append(np.asarray(center_lps), 1.0)
    ijk = np.linalg.solve(np.asarray(image.affine), ras)[:3]
    i, j, k = (int(v) for v in np.round(ijk))
    return i, j, k


def nifti_data(path: Path) -> NDArray[Any]:
    image: Any = nib.load(path)
    return np.asarray(image.dataobj)


# ------------------------------------------------------------------------------ phantoms
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = tmp_path_factory.mktemp("phantoms")
    return phantom_dataset(
        out, cases=1, seed=5, slices=24, matrix=96, nodules=2, diameter_range=(10.0, 16.0)
    )


def test_phantom_dataset_is_canonical_and_loads(phantoms: Dataset) -> None:
    assert phantoms.root is not None
    raw = json.loads((phantoms.root / "dataset.json").read_text())
    assert raw["format"] == FORMAT
    assert raw["coordinates"] == COORDINATES
    loaded = Dataset.load(phantoms.root)
    assert loaded == phantoms
    (case,) = loaded.cases
    assert case.image == f"images/{case.id}.nii.gz"
    assert case.label == f"labels/{case.id}.nii.gz"
    assert len(case.lesions) == 2
    assert case.source["kind"] == "phantom"
    image: Any = nib.load(case.path(case.image))
    assert image.get_data_dtype() == np.int16
    assert int(image.header["sform_code"]) == 1
    # Canonical orientation: axes along L, P, S, so the RAS affine is diag(-sx, -sy, sz).
    diag = np.diag(np.asarray(image.affine)[:3, :3])
    assert diag[0] < 0 and diag[1] < 0 and diag[2] > 0


def test_phantom_lesions_land_on_their_label(phantoms: Dataset) -> None:
    (case,) = phantoms.cases
    assert case.label is not None
    label_path = case.path(case.label)
    labels = nifti_data(label_path)
    truth = json.loads(case.path(case.source["ground_truth"]).read_text())
    for n, lesion in enumerate(case.lesions, start=1):
        assert list(lesion.center_mm) == truth["nodules"][n - 1]["center_mm"]
        assert labels[nifti_voxel(label_path, lesion.center_mm)] == n
    # The same through case_label's (z, y, x) view.
    view = case_label(case)
    assert view is not None
    arr, affine = view
    for n, lesion in enumerate(case.lesions, start=1):
        z, y, x = (int(v) for v in np.round(to_index(affine, lesion.center_mm)))
        assert arr[z, y, x] == n


def test_case_volume_matches_inference_preprocessing(phantoms: Dataset) -> None:
    (case,) = phantoms.cases
    study = case.path(case.source["ground_truth"]).parent
    hu_ref, affine_ref = to_lps(load_series(sorted((study / "dicom").glob("*.dcm"))))
    hu, affine = case_volume(case)
    assert hu.shape == hu_ref.shape
    np.testing.assert_array_equal(hu, hu_ref)
    np.testing.assert_allclose(affine, affine_ref, atol=1e-4)


def test_main_phantoms_hook(tmp_path: Path) -> None:
    path = main_phantoms(tmp_path / "ds", cases=1, seed=9, slices=16, matrix=64)
    assert path == tmp_path / "ds" / "dataset.json"
    assert len(Dataset.load(path.parent).cases) == 1


# ------------------------------------------------------------------------------- MSD
def write_msd(task: Path) -> tuple[NDArray[np.float64], list[tuple[float, float, float]]]:
    """A tiny decathlon task: one case, two blobs, an affine that is flipped and permuted."""
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    shape = (12, 20, 16)
    # Array axes: 0 -> patient S (1.5 mm), 1 -> R (0.7 mm), 2 -> A (0.9 mm), in RAS terms.
    ras = np.array(
        [
            [0.0, 0.7, 0.0, -10.0],
            [0.0, 0.0, 0.9, 20.0],
            [1.5, 0.0, 0.0, -300.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 400, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:7, 4:7] = 1  # 3 x 4 x 3 box, centroid (3, 4.5, 5)
    label[8:10, 14:16, 10:12] = 1  # 2 x 2 x 2 box, centroid (8.5, 14.5, 10.5)
    centres = []
    for c in ((3.0, 4.5, 5.0), (8.5, 14.5, 10.5)):
        lps = LPS_TO_RAS @ ras @ np.array([*c, 1.0])
        centres.append((float(lps[0]), float(lps[1]), float(lps[2])))
    nib.save(nib.Nifti1Image(image, ras), task / "imagesTr" / "lung_001.nii.gz")  # type: ignore[no-untyped-call]
    nib.save(nib.Nifti1Image(label, ras), task / "labelsTr" / "lung_001.nii.gz")  # type: ignore[no-untyped-call]
    meta = {
        "name": "Lung",
        "training": [
            {"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}
        ],
        "test": [],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return ras, centres


def test_msd_converter(tmp_path: Path) -> None:
    ras, centres = write_msd(tmp_path / "Task06_Lung")
    ds = msd_dataset(tmp_path / "Task06_Lung", tmp_path / "out")
    (case,) = Dataset.load(tmp_path / "out").cases
    assert case.id == "lung_001"
    assert case.source["kind"] == "msd"
    assert len(case.lesions) == 2 == len(ds.cases[0].lesions)
    got = sorted(case.lesions, key=lambda les: les.center_mm[2])
    want = sorted(centres, key=lambda c: c[2])
    for lesion, centre in zip(got, want, strict=True):
        np.testing.assert_allclose(lesion.center_mm, centre, atol=1e-3)
    volumes = sorted(les.diameter_mm**3 * np.pi / 6 for les in case.lesions)
    voxel = 0.7 * 0.9 * 1.5
    np.testing.assert_allclose(volumes, [8 * voxel, 36 * voxel], rtol=1e-3)
    assert case.label is not None
    labels = nifti_data(case.path(case.label))
    for n, lesion in enumerate(case.lesions, start=1):
        # The centroids of these boxes fall on a voxel or between two; either is inside.
        assert labels[nifti_voxel(case.path(case.label), lesion.center_mm)] == n
    # The image survives the reorientation: same values at the same patient position.
    original = nifti_data(tmp_path / "Task06_Lung" / "imagesTr" / "lung_001.nii.gz")
    hu, affine = case_volume(case)
    assert hu.shape == (12, 16, 20)
    for index in ((0, 0, 0), (11, 19, 15), (5, 7, 9)):
        lps = LPS_TO_RAS @ ras @ np.array([*index, 1.0])
        z, y, x = (int(v) for v in np.round(to_index(affine, lps[:3])))
        assert hu[z, y, x] == original[index]


# ---------------------------------------------------------------------------- LUNA16
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100000000000000000000000000001"


def write_mhd(
    folder: Path,
    name: str,
    data: NDArray[Any],
    spacing: tuple[float, float, float],
    offset: tuple[float, float, float],
    transform: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    msb: bool = False,
    local: bool = False,
) -> Path:
    """data is indexed [k, j, i] as MetaImage stores it (i fastest)."""
    element = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.float32): "MET_FLOAT"}[data.dtype]
    raw = data.astype(data.dtype.newbyteorder(">" if msb else "<")).tobytes()
    header = "\n".join(
        [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            f"BinaryDataByteOrderMSB = {msb}",
            "CompressedData = False",
            "TransformMatrix = " + " ".join(str(v) for v in transform),
            "Offset = " + " ".join(str(v) for v in offset),
            "CenterOfRotation = 0 0 0",
            "AnatomicalOrientation = RAI",
            "ElementSpacing = " + " ".join(str(v) for v in spacing),
            "DimSize = " + " ".join(str(v) for v in data.shape[::-1]),
            f"ElementType = {element}",
            f"ElementDataFile = {'LOCAL' if local else name + '.raw'}",
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    if local:
        path = folder / f"{name}.mha"
        path.write_bytes(header.encode() + b"\n" + raw)
    else:
        path = folder / f"{name}.mhd"
        path.write_text(header + "\n")
        (folder / f"{name}.raw").write_bytes(raw)
    return path


def test_luna16_converter(tmp_path: Path) -> None:
    data = np.full((10, 14, 16), -900, np.int16)  # [k, j, i]
    i, j, k = 5, 6, 4
    data[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = 60
    data[k, j, i] = 500
    spacing, offset = (0.7, 0.8, 2.5), (-150.5, -170.25, -310.0)
    write_mhd(tmp_path / "luna" / "subset0", UID, data, spacing, offset)
    write_mhd(tmp_path / "luna" / "subset1", "1.2.3.negative", data, spacing, offset)
    centre = (offset[0] + i * spacing[0], offset[1] + j * spacing[1], offset[2] + k * spacing[2])
    csv_path = tmp_path / "annotations.csv"
    csv_path.write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + f"{UID},{centre[0]},{centre[1]},"
        f"{centre[2]},4.2\n"
    )
    luna16_dataset(tmp_path / "luna", csv_path, tmp_path / "out")
    ds = Dataset.load(tmp_path / "out")
    cases = {c.id: c for c in ds.cases}
    assert set(cases) == {UID, "1.2.3.negative"}
    assert cases["1.2.3.negative"].lesions == []
    case = cases[UID]
    assert case.label is None
    assert case.lesions == [Lesion(centre, 4.2)]
    image_path = case.path(case.image)
    assert nifti_data(image_path)[nifti_voxel(image_path, centre)] == 500
    hu, affine = case_volume(case)
    z, y, x = (int(v) for v in np.round(to_index(affine, centre)))
    assert hu[z, y, x] == 500


def test_metaimage_reader_byte_order_local_data_and_direction(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # [k, j, i]
    transform = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # axis i runs towards right, j anterior
    path = write_mhd(
        tmp_path, "x", data, (0.5, 0.6, 2.0), (10.0, 20.0, 30.0), transform, msb=True, local=True
    )
    image = read_metaimage(path)
    np.testing.assert_array_equal(image.array, data)
    # Voxel (k, j, i) = (3, 2, 1) lies at offset + D @ (spacing * [i, j, k]).
    expected = np.array([10.0 - 0.5 * 1, 20.0 - 0.6 * 2, 30.0 + 2.0 * 3])
    np.testing.assert_allclose(image.affine @ np.array([3, 2, 1, 1.0]), [*expected, 1.0])
    with pytest.raises(DatasetError, match="ElementType"):
        bad = tmp_path / "bad.mhd"
        bad.write_text(path.read_bytes()[:400].decode("latin-1").replace("MET_FLOAT", "MET_X"))
        read_metaimage(bad)


# ------------------------------------------------------------------------ validation
def test_validation_names_case_and_field(tmp_path: Path) -> None:
    hu = np.zeros((4, 5, 6), np.int16)
    case = write_case(tmp_path, "c1", hu, np.diag([2.0, 1.0, 1.0, 1.0]))
    Dataset("d", cases=[case]).write(tmp_path)
    raw = json.loads((tmp_path / "dataset.json").read_text())

    def broken(edit: dict[str, Any]) -> str:
        bad = json.loads(json.dumps(raw))
        bad["cases"][0].update(edit)
        (tmp_path / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(DatasetError) as info:
            Dataset.load(tmp_path)
        return str(info.value)

    assert "case 'c1'" in broken({"image": "elsewhere.nii.gz"})
    assert "'image'" in broken({"image": "elsewhere.nii.gz"})
    assert "lesions[0]" in broken({"lesions": [{"center_mm": [1, 2], "diameter_mm": 3}]})
    assert "lesions[0].diameter_mm" in broken(
        {"lesions": [{"center_mm": [1, 2, 3], "diameter_mm": -1}]}
    )
    assert "'label'" in broken({"label": "labels/c1.nii.gz"})  # file missing
    assert "'source'" in broken({"source": []})
    bad_case = Case("c 2", "images/c 2.nii.gz", None)
    with pytest.raises(DatasetError, match="case 'c 2': field 'id'"):
        bad_case.validate()
    with pytest.raises(DatasetError, match="oblique"):
        rot = np.eye(4)
        rot[:2, :2] = [[0.8, -0.6], [0.6, 0.8]]
        write_case(tmp_path, "c3", hu, rot)


def test_training_dataset_modules_do_not_import_torch() -> None:
    code = (
        "import sys, training.dataset, training.converters; "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
