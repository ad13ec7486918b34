"""DICOM series to volume: ordering, geometry, refusal of broken series, series selection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from inference.series import SeriesRules, select_series
from inference.volume import VolumeError, load_series
from training.phantom import NoduleRequest, PhantomOptions, generate


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("volume_study")
    generate(
        out,
        PhantomOptions(
            seed=8,
            slices=24,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    return out


def files_of(study: Path) -> list[Path]:
    return sorted((study / "dicom").glob("*.dcm"))


def copy_series(study: Path, tmp_path: Path) -> list[Path]:
    out = tmp_path / "copy"
    shutil.copytree(study / "dicom", out)
    return sorted(out.glob("*.dcm"))


def test_volume_is_ordered_along_the_normal_whatever_the_file_order(study: Path) -> None:
    files = files_of(study)
    volume = load_series(list(reversed(files)))
    again = load_series(files[::2] + files[1::2])
    assert np.array_equal(volume.hu, again.hu)
    assert volume.hu.shape == (24, 128, 128)
    # Instance 1 is the most superior slice; the volume starts at the most inferior one.
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert volume.origin[2] == pytest.approx(min(z))
    assert volume.sop_uids[0] == str(pydicom.dcmread(files[-1]).SOPInstanceUID)
    assert volume.spacing[0] == pytest.approx(2.5)


def test_hu_values_apply_the_rescale(study: Path) -> None:
    files = files_of(study)
    volume = load_series(files)
    ds = pydicom.dcmread(files[-1])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(volume.hu[0], expected.astype(np.float32))


def test_patient_coordinates_round_trip_and_find_the_nodule(study: Path) -> None:
    volume = load_series(files_of(study))
    truth = json.loads((study / "ground_truth.json").read_text(encoding="utf-8"))
    centre = np.array(truth["nodules"][0]["center_mm"])
    index = volume.to_index(centre)
    assert np.allclose(volume.to_patient(index), centre)
    k, r, c = np.round(index).astype(int)
    assert volume.hu[k, r, c] > -200  # solid nodule tissue at its centre, not lung


def test_missing_slice_is_refused_with_the_neighbours(study: Path) -> None:
    files = files_of(study)
    with pytest.raises(VolumeError, match=r"a missing slice: 5\.00 mm"):
        load_series(files[:10] + files[11:])


def test_gantry_tilt_is_refused(study: Path, tmp_path: Path) -> None:
    files = copy_series(study, tmp_path)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.4 * i, z]  # origins slide along y: a tilted gantry
        ds.save_as(path)
    with pytest.raises(VolumeError, match="gantry tilt"):
        load_series(files)


def test_duplicate_positions_are_refused(study: Path, tmp_path: Path) -> None:
    files = copy_series(study, tmp_path)
    ds = pydicom.dcmread(files[5])
    ds.ImagePositionPatient = pydicom.dcmread(files[6]).ImagePositionPatient
    ds.save_as(files[5])
    with pytest.raises(VolumeError, match="share a position"):
        load_series(files)


def test_compressed_series_decodes_to_the_same_volume(study: Path, tmp_path: Path) -> None:
    files = copy_series(study, tmp_path)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(path)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(load_series(files).hu, load_series(files_of(study)).hu)


def test_corrupt_pixel_block_names_the_file(study: Path, tmp_path: Path) -> None:
    files = copy_series(study, tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(files[3])
    data = bytearray(files[3].read_bytes())
    data[-400:-200] = b"\xff" * 200  # damage the RLE segments
    files[3].write_bytes(bytes(data))
    with pytest.raises(VolumeError, match=files[3].name):
        load_series(files)


def test_single_slice_is_refused(study: Path) -> None:
    with pytest.raises(VolumeError, match="at least 2 slices"):
        load_series(files_of(study)[:1])


def test_series_selection_picks_the_ct_and_explains_the_others(study: Path, tmp_path: Path) -> None:
    files = files_of(study)
    localizer = tmp_path / "scout.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "SCOUT"
    ds.save_as(localizer)
    selection = select_series([*files, localizer], SeriesRules(min_slices=20))
    assert selection.chosen is not None
    assert len(selection.chosen.files) == 24
    scout = next(c for c in selection.rejected if c.description == "SCOUT")
    assert any("LOCALIZER" in r for r in scout.reasons)
    assert any("fewer than 20" in r for r in scout.reasons)


def test_study_without_eligible_series_gets_a_reason(study: Path) -> None:
    selection = select_series(files_of(study), SeriesRules(modalities=("MR",), min_slices=50))
    assert selection.chosen is None
    reason = selection.reason()
    assert reason.startswith("no eligible series: series ")
    assert "modality CT is not MR" in reason and "24 slices, fewer than 50" in reason
