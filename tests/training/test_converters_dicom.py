"""DICOM series + SEG to the canonical dataset, and the `aidx dataset` converters' commands.

The study is a phantom whose SEG is written by aidx's own SEG writer from the phantom's
ground-truth mask; the converted case must give back the ground truth: lesion centres within a
voxel of the phantom's nodules, and the label mask voxel for voxel.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from aidx.cli import EXIT_OK, EXIT_USAGE, main
from inference.findings import Finding
from inference.preprocess import to_lps
from inference.seg import write_seg
from inference.volume import Volume, load_series
from models.registry import ModelCard
from tests.conftest import REPO
from training.converters_dicom import dicom_seg_dataset
from training.dataset import Dataset, DatasetError, case_label, case_volume
from training.phantom import NoduleRequest, PhantomOptions, PhantomResult, generate

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-4711-SECRET"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CARD: dict[str, Any] = {
    "name": "nodule-detector",
    "version": "1.0.0",
    "date": "2026-11-28",
    "network": "test card",
    "description": "A card for the converter tests.",
    "input": {
        "tensor": {"name": "image", "shape": [1, 1, "depth", "height", "width"]},
        "spacing_mm": [2.0, 1.4, 1.4],
        "hu_window": [-1000.0, 400.0],
        "patch_size": [32, 64, 64],
    },
    "output": {
        "tensor": {"name": "probability", "shape": [1, 1, "depth", "height", "width"]},
        "operating_threshold": 0.5,
    },
    "training": {"data": "none", "synthetic": True, "command": "none"},
    "sha256": "0" * 64,
    "intended_use": "Tests only.",
    "limitations": ["Not a detector."],
}
COVERED = (1, 2)  # the SEG holds nodules 1 and 2 of 3


@dataclass(frozen=True)
class Study:
    root: Path  # the input folder: study a (series + SEG), study b (series only)
    phantom: PhantomResult
    other: PhantomResult  # a second series without a SEG
    volume: Volume
    labels: NDArray[np.uint8]  # ground truth on the volume grid (k, row, column)
    seg: Path


def truth_on_volume_grid(phantom: PhantomResult, volume: Volume) -> NDArray[np.uint8]:
    """The phantom's NIfTI nodule mask placed on the volume grid through both affines."""
    assert phantom.mask_path is not None
    image: Any = nib.load(phantom.mask_path)
    data = np.asarray(image.dataobj, dtype=np.uint8)
    ijk = np.argwhere(data > 0)
    ras = np.asarray(image.affine) @ np.column_stack([ijk, np.ones(len(ijk))]).T
    lps = np.asarray((LPS_TO_RAS @ ras)[:3].T, dtype=np.float64)
    index = volume.to_index(lps)
    assert np.abs(index - np.round(index)).max() < 1e-3, "mask voxels off the volume grid"
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    k, row, column = np.round(index).astype(int).T
    labels[k, row, column] = data[tuple(ijk.T)]
    return labels


def finding(nodule: dict[str, Any], labels: NDArray[np.uint8], volume: Volume) -> Finding:
    mask = labels == nodule["id"]
    corners = volume.to_patient(np.argwhere(mask).astype(np.float64))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return Finding(
        id=nodule["id"],
        probability=0.9,
        center_mm=(nodule["center_mm"][0], nodule["center_mm"][1], nodule["center_mm"][2]),
        diameter_mm=nodule["diameter_mm"],
        volume_mm3=nodule["volume_mm3"],
        bbox_mm=((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])),
        key_sop_instance_uid=nodule["key_slice_sop_instance_uid"],
        mask=mask,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("dicom_seg") / "in"
    phantom = generate(
        root / "a",
        PhantomOptions(
            seed=11,
            slices=32,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(
                NoduleRequest(12.0, "solid", "isolated", "smooth"),
                NoduleRequest(10.0, "solid", "isolated", "smooth"),
                NoduleRequest(8.0, "solid", "isolated", "smooth"),
            ),
            patient_name=PATIENT_NAME,
            patient_id=PATIENT_ID,
            write_mask=True,
            workers=1,
        ),
    )
    other = generate(root / "b", PhantomOptions(seed=12, slices=16, matrix=64, workers=1))
    volume = load_series(sorted(phantom.dicom_dir.glob("*.dcm")))
    headers = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in phantom.files)
    }
    labels = truth_on_volume_grid(phantom, volume)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    nodules = [n for n in phantom.ground_truth["nodules"] if n["id"] in COVERED]
    seg = root / "a" / "seg" / "seg.dcm"
    seg.parent.mkdir()
    write_seg(
        [finding(n, labels, volume) for n in nodules],
        [headers[uid] for uid in volume.sop_uids],
        ModelCard.model_validate(CARD),
        seg,
    )
    return Study(root, phantom, other, volume, labels, seg)


@pytest.fixture(scope="module")
def converted(study: Study, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return dicom_seg_dataset(study.root, tmp_path_factory.mktemp("converted") / "ds")


def copy_series(study: Study, to: Path) -> Path:
    shutil.copytree(study.phantom.dicom_dir, to / "ct")
    return to


# ---------------------------------------------------------------------------- conversion
def test_seg_becomes_a_case_with_the_phantoms_lesions(study: Study, converted: Dataset) -> None:
    (case,) = converted.cases  # study b has no SEG
    assert case.source == {
        "kind": "dicom-seg",
        "study_instance_uid": study.phantom.ground_truth["study_instance_uid"],
        "series_instance_uid": study.volume.series_uid,
        "seg_sop_instance_uid": str(pydicom.dcmread(study.seg).SOPInstanceUID),
        "segments": [1, 2],
    }
    truth = {n["id"]: n for n in study.phantom.ground_truth["nodules"]}
    assert len(case.lesions) == len(COVERED)
    for lesion in case.lesions:
        # Each lesion is one covered nodule, its centre within a voxel along every axis.
        distance = {
            i: np.abs(
                study.volume.to_index(lesion.center_mm)
                - study.volume.to_index(truth[i]["center_mm"])
            ).max()
            for i in COVERED
        }
        nearest = min(distance, key=lambda i: distance[i])
        assert distance[nearest] <= 1.0, (lesion, truth[nearest])
        # Equivalent-sphere diameter of the voxelised sphere: close to the true diameter.
        assert abs(lesion.diameter_mm - truth[nearest]["diameter_mm"]) <= max(study.volume.spacing)
    nearest_ids = {
        min(
            COVERED,
            key=lambda i: float(
                np.linalg.norm(np.subtract(lesion.center_mm, truth[i]["center_mm"]))
            ),
        )
        for lesion in case.lesions
    }
    assert nearest_ids == set(COVERED)


def test_label_mask_is_the_segs_nodules_voxel_for_voxel(study: Study, converted: Dataset) -> None:
    (case,) = converted.cases
    loaded = case_label(case)
    assert loaded is not None
    label, affine = loaded
    # Every labelled voxel, by position, against the ground truth of the covered nodules.
    points = np.argwhere(label > 0).astype(np.float64)
    lps = points @ affine[:3, :3].T + affine[:3, 3]
    k, row, column = np.round(study.volume.to_index(lps)).astype(int).T
    assert set(np.unique(study.labels[k, row, column])) <= set(COVERED)
    assert len(points) == int(np.isin(study.labels, COVERED).sum())
    # Label value i marks lesions[i-1], at its centre.
    for n, lesion in enumerate(case.lesions, start=1):
        z, y, x = np.round(np.linalg.solve(affine, [*lesion.center_mm, 1.0])[:3]).astype(int)
        assert label[z, y, x] == n


def test_image_is_the_series_as_inference_reads_it(study: Study, converted: Dataset) -> None:
    (case,) = converted.cases
    hu_ref, affine_ref = to_lps(study.volume)
    hu, affine = case_volume(case)
    np.testing.assert_array_equal(hu, hu_ref)
    np.testing.assert_allclose(affine, affine_ref, atol=1e-4)


def test_dataset_round_trips_and_is_pseudonymous(converted: Dataset) -> None:
    assert converted.root is not None
    loaded = Dataset.load(converted.root)
    assert loaded == converted
    (case,) = loaded.cases
    assert case.id.startswith("ct-") and len(case.id) == 15
    text = (converted.root / "dataset.json").read_text(encoding="utf-8")
    for secret in (PATIENT_NAME, PATIENT_ID, "DOE", "a/", "seg.dcm"):
        assert secret not in text


def test_series_without_seg_is_skipped_with_its_uid_only(
    study: Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="aidx.dataset"):
        dataset = dicom_seg_dataset(study.root, tmp_path / "ds")
    assert len(dataset.cases) == 1
    other = study.other.ground_truth["series_instance_uid"]
    assert any(other in r.getMessage() and "no SEG" in r.getMessage() for r in caplog.records)
    for secret in (PATIENT_NAME, PATIENT_ID, "PHANTOM^CHEST"):
        assert secret not in caplog.text


# --------------------------------------------------------------------------------- errors
def test_seg_without_its_series_names_the_series(study: Study, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(study.seg, tmp_path / "in" / "seg.dcm")
    with pytest.raises(DatasetError, match=study.volume.series_uid) as error:
        dicom_seg_dataset(tmp_path / "in", tmp_path / "ds")
    assert "seg.dcm" in str(error.value)
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_seg_off_the_series_grid_is_refused(study: Study, tmp_path: Path) -> None:
    root = copy_series(study, tmp_path / "in")
    ds = pydicom.dcmread(study.seg)
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    x, y, z = (float(v) for v in position.ImagePositionPatient)
    position.ImagePositionPatient = [x + 0.5 * study.volume.spacing[2], y, z]
    ds.save_as(root / "seg.dcm")
    with pytest.raises(DatasetError, match="not on the series' grid"):
        dicom_seg_dataset(root, tmp_path / "ds")


def test_seg_frame_on_an_image_outside_the_series_names_the_image(
    study: Study, tmp_path: Path
) -> None:
    root = copy_series(study, tmp_path / "in")
    ds = pydicom.dcmread(study.seg)
    source = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    stranger = pydicom.uid.generate_uid()
    source.SourceImageSequence[0].ReferencedSOPInstanceUID = stranger
    ds.save_as(root / "seg.dcm")
    with pytest.raises(DatasetError, match=f"frame 1 is derived from image {stranger}"):
        dicom_seg_dataset(root, tmp_path / "ds")


def test_only_no_seg_at_all_is_an_error(study: Study, tmp_path: Path) -> None:
    shutil.copytree(study.other.dicom_dir, tmp_path / "in")
    with pytest.raises(DatasetError, match="no DICOM SEG"):
        dicom_seg_dataset(tmp_path / "in", tmp_path / "ds")


# ------------------------------------------------------------------------- segment choice
def test_anatomy_segments_are_left_out_unless_asked(study: Study, tmp_path: Path) -> None:
    root = copy_series(study, tmp_path / "in")
    ds = pydicom.dcmread(study.seg)
    lung = ds.SegmentSequence[1]
    lung.SegmentLabel = "Right lung"
    category = lung.SegmentedPropertyCategoryCodeSequence[0]
    category.CodeValue, category.CodeMeaning = "123037004", "Anatomical Structure"
    kind = lung.SegmentedPropertyTypeCodeSequence[0]
    kind.CodeValue, kind.CodeMeaning = "39607008", "Lung"
    ds.save_as(root / "seg.dcm")
    (case,) = dicom_seg_dataset(root, tmp_path / "lesions").cases
    assert case.source["segments"] == [1]
    assert len(case.lesions) == 1
    (case,) = dicom_seg_dataset(root, tmp_path / "all", all_segments=True).cases
    assert case.source["segments"] == [1, 2]
    assert len(case.lesions) == 2


def test_two_segs_of_one_series_give_two_cases(study: Study, tmp_path: Path) -> None:
    root = copy_series(study, tmp_path / "in")
    shutil.copy(study.seg, root / "seg1.dcm")
    ds = pydicom.dcmread(study.seg)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(root / "seg2.dcm")
    shutil.copy(study.seg, root / "copy-of-seg1.dcm")  # the same SEG twice is one SEG
    dataset = dicom_seg_dataset(root, tmp_path / "ds")
    ids = [case.id for case in dataset.cases]
    assert len(set(ids)) == 2
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 1  # the same series part


def test_converter_does_not_load_torch() -> None:
    code = (
        "import sys\nimport training.converters_dicom\n"
        "assert not [m for m in ('torch', 'monai') if m in sys.modules]\nprint('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------------------- commands
def test_cli_dicom_seg(study: Study, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    code = main(
        ["--data-dir", str(tmp_path / "data"), "dataset", "dicom-seg", str(study.root), str(out)]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    assert "wrote 1 cases (1 with label masks, 2 lesions)" in capsys.readouterr().out
    assert len(Dataset.load(out).cases) == 1


def test_cli_dicom_seg_error(
    study: Study, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(study.seg, tmp_path / "in" / "seg.dcm")
    code = main(
        [
            "--data-dir",
            str(tmp_path / "data"),
            "dataset",
            "dicom-seg",
            str(tmp_path / "in"),
            str(tmp_path / "ds"),
        ]
    )
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("aidx dataset dicom-seg: ")
    assert study.volume.series_uid in err
    assert "Traceback" not in err


def write_nifti(path: Path, data: NDArray[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 2.0, 1.0])), path)  # type: ignore[no-untyped-call]


def test_cli_msd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "Task06_Lung"
    image = np.full((16, 16, 8), -800, dtype=np.int16)
    label = np.zeros((16, 16, 8), dtype=np.uint8)
    label[4:7, 4:7, 2:4] = 1
    label[10:13, 10:13, 5:7] = 1
    write_nifti(task / "imagesTr" / "lung_001.nii.gz", image)
    write_nifti(task / "labelsTr" / "lung_001.nii.gz", label)
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Lung",
                "training": [
                    {"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}
                ],
            }
        ),
        encoding="utf-8",
    )
    data = ["--data-dir", str(tmp_path / "data")]
    assert main([*data, "dataset", "msd", str(task), str(tmp_path / "ds")]) == EXIT_OK
    assert "wrote 1 cases (1 with label masks, 2 lesions)" in capsys.readouterr().out
    (case,) = Dataset.load(tmp_path / "ds").cases
    assert case.id == "lung_001" and case.source["kind"] == "msd"
    assert (
        main([*data, "dataset", "msd", str(tmp_path / "none"), str(tmp_path / "x")]) == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert err.startswith("aidx dataset msd: ") and "dataset.json not found" in err


def test_cli_luna16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    luna = tmp_path / "luna" / "subset0"
    luna.mkdir(parents=True)
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100"
    (luna / f"{uid}.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_SHORT\n"
        "ElementSpacing = 1 1 2\nOffset = -4 -4 0\nTransformMatrix = 1 0 0 0 1 0 0 0 1\n"
        f"ElementDataFile = {uid}.raw\n",
        encoding="latin-1",
    )
    (luna / f"{uid}.raw").write_bytes(np.full(8 * 8 * 4, -900, dtype="<i2").tobytes())
    csv = tmp_path / "annotations.csv"
    csv.write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},0,0,2,5.5\n")
    data = ["--data-dir", str(tmp_path / "data")]
    out = tmp_path / "ds"
    code = main(
        [*data, "dataset", "luna16", str(tmp_path / "luna"), str(out), "--annotations", str(csv)]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    assert "wrote 1 cases (0 with label masks, 1 lesions)" in capsys.readouterr().out
    (case,) = Dataset.load(out).cases
    assert case.id == uid and case.lesions[0].diameter_mm == 5.5
    missing = tmp_path / "missing.csv"
    code = main(
        [
            *data,
            "dataset",
            "luna16",
            str(tmp_path / "luna"),
            str(out),
            "--annotations",
            str(missing),
        ]
    )
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("aidx dataset luna16: ") and "missing.csv" in err
