"""DICOM series to volume: ordering, geometry, refusal of broken series, series selection;
single-frame series and multi-frame (Enhanced, Legacy Converted Enhanced) CT instances."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from inference.series import SeriesRules, select_series
from inference.volume import Volume, VolumeError, load_series, slice_sources
from tests.conftest import require_tool
from tests.enhanced_ct import (
    enhanced_ct,
    read_slices,
    reorder_frames,
    write_enhanced_ct,
    write_legacy_enhanced_ct,
)
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


# ------------------------------------------------------------------ multi-frame (Enhanced) CT
# A 40-slice phantom as one multi-frame instance: Legacy Converted Enhanced CT (highdicom's
# converter) and Enhanced CT Image Storage (tests.enhanced_ct's builder).
KNOWN_LEGACY_ERROR = "ReferencedSeriesSequence present but Instance does not reference Instances"


@pytest.fixture(scope="module")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("multiframe_study")
    generate(
        out / "study",
        PhantomOptions(
            seed=31,
            slices=40,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    dicom = out / "study" / "dicom"
    return {
        "dicom": dicom,
        "legacy": write_legacy_enhanced_ct(dicom, out / "legacy" / "lce.dcm"),
        "enhanced": write_enhanced_ct(dicom, out / "enhanced" / "ect.dcm"),
    }


@pytest.fixture(scope="module")
def single_frame_volume(multiframe: dict[str, Path]) -> Volume:
    return load_series(files_of(multiframe["dicom"].parent))


def frame_positions(path: Path) -> list[list[float]]:
    """Image Position (Patient) of each frame, in frame order."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [
        [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for item in ds.PerFrameFunctionalGroupsSequence
    ]


def dciodvfy_errors(path: Path) -> list[str]:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    result = subprocess.run(
        [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_multiframe_instance_gives_the_single_frame_volume(
    multiframe: dict[str, Path], single_frame_volume: Volume, kind: str
) -> None:
    path = multiframe[kind]
    ref = single_frame_volume
    volume = load_series([path])
    assert np.array_equal(volume.hu, ref.hu)
    assert np.array_equal(volume.origin, ref.origin)
    for name in ("row_dir", "col_dir", "normal"):
        assert np.array_equal(getattr(volume, name), getattr(ref, name)), name
    assert volume.spacing == ref.spacing
    assert (volume.study_uid, volume.frame_of_reference_uid) == (
        ref.study_uid,
        ref.frame_of_reference_uid,
    )
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert volume.sop_uids == (uid,) * 40
    assert volume.files == (path,) * 40
    # frames[k] is the frame whose position is slice k's: the single-frame slice k's position.
    assert sorted(f for f in volume.frames if f is not None) == list(range(1, 41))
    positions = frame_positions(path)
    ref_positions = [
        [float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient]
        for f in ref.files
    ]
    assert [positions[f - 1] for f in volume.frames if f is not None] == ref_positions
    assert volume.instance_numbers == volume.frames
    assert ref.frames == (None,) * 40


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_multiframe_test_data_is_valid_dicom(multiframe: dict[str, Path], kind: str) -> None:
    errors = dciodvfy_errors(multiframe[kind])
    # highdicom's legacy converter references its sources in Conversion Source Attributes
    # Sequence, which dciodvfy does not count as references for Referenced Series Sequence.
    assert [e for e in errors if KNOWN_LEGACY_ERROR not in e] == []


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_frames_shuffled_in_the_file_come_out_in_volume_order(
    multiframe: dict[str, Path], single_frame_volume: Volume, kind: str, tmp_path: Path
) -> None:
    in_order = load_series([multiframe[kind]])
    order = [int(i) for i in np.random.default_rng(5).permutation(40)]
    shuffled = tmp_path / "shuffled.dcm"
    reorder_frames(pydicom.dcmread(multiframe[kind]), order).save_as(shuffled)
    volume = load_series([shuffled])
    assert np.array_equal(volume.hu, single_frame_volume.hu)
    assert np.array_equal(volume.origin, single_frame_volume.origin)
    # New frame f holds old frame order[f - 1] + 1.
    new_frame = {old + 1: new for new, old in enumerate(order, start=1)}
    assert volume.frames == tuple(new_frame[f] for f in in_order.frames if f is not None)


def test_a_series_of_several_multiframe_instances_is_one_volume(
    multiframe: dict[str, Path], single_frame_volume: Volume, tmp_path: Path
) -> None:
    files = files_of(multiframe["dicom"].parent)  # Instance Number order: superior first
    series_uid = generate_uid()
    upper = write_enhanced_ct(files[:15], tmp_path / "upper.dcm", series_uid=series_uid)
    lower = write_enhanced_ct(files[15:], tmp_path / "lower.dcm", series_uid=series_uid)
    volume = load_series([upper, lower])
    assert np.array_equal(volume.hu, single_frame_volume.hu)
    assert volume.files == (lower,) * 25 + (upper,) * 15
    assert volume.frames == (*range(25, 0, -1), *range(15, 0, -1))
    upper_uid = str(pydicom.dcmread(upper, stop_before_pixels=True).SOPInstanceUID)
    assert volume.sop_uids[25:] == (upper_uid,) * 15
    selection = select_series([upper, lower], SeriesRules(min_slices=20))
    assert selection.chosen is not None and selection.chosen.slice_count == 40


def test_per_frame_rescale_is_applied_frame_by_frame(
    multiframe: dict[str, Path], single_frame_volume: Volume, tmp_path: Path
) -> None:
    slices = read_slices(multiframe["dicom"])
    # Slice 7 stored 100 higher with an intercept 100 lower: the same HU, another rescale.
    ds = slices[7]
    pixels = ds.pixel_array
    assert int(pixels.max()) + 100 < 2 ** int(ds.BitsStored)
    ds.PixelData = (pixels + 100).astype(pixels.dtype).tobytes()
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 100
    instance = enhanced_ct(slices)
    assert "PixelValueTransformationSequence" not in instance.SharedFunctionalGroupsSequence[0]
    path = tmp_path / "rescale.dcm"
    instance.save_as(path, enforce_file_format=True)
    assert np.array_equal(load_series([path]).hu, single_frame_volume.hu)


def test_compressed_multiframe_decodes_to_the_same_volume(
    multiframe: dict[str, Path], single_frame_volume: Volume, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(multiframe["enhanced"])
    ds.compress(RLELossless, generate_instance_uid=False)
    path = tmp_path / "rle.dcm"
    ds.save_as(path)
    assert np.array_equal(load_series([path]).hu, single_frame_volume.hu)


def test_corrupt_frame_names_the_file_and_frame(
    multiframe: dict[str, Path], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(multiframe["enhanced"])
    ds.compress(RLELossless, generate_instance_uid=False)
    path = tmp_path / "damaged.dcm"
    ds.save_as(path)
    data = bytearray(path.read_bytes())
    data[-400:-200] = b"\xff" * 200  # damage the last frame's RLE segments
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match=r"pixel data of damaged\.dcm frame 40 cannot be decoded"):
        load_series([path])


def edited(source: Path, tmp_path: Path, edit: Callable[[Dataset], object]) -> tuple[Path, str]:
    """A copy of ``source`` changed by ``edit``, and its SOP Instance UID."""
    ds = pydicom.dcmread(source)
    edit(ds)
    path = tmp_path / f"edited_{source.name}"
    ds.save_as(path)
    return path, re.escape(str(ds.SOPInstanceUID))


def test_frame_without_a_position_is_refused_naming_uid_and_frame(
    multiframe: dict[str, Path], tmp_path: Path
) -> None:
    def drop(ds: Dataset) -> None:
        del ds.PerFrameFunctionalGroupsSequence[6].PlanePositionSequence

    path, uid = edited(multiframe["legacy"], tmp_path, drop)
    with pytest.raises(VolumeError, match=rf"{uid} frame 7 has no Image Position \(Patient\)"):
        load_series([path])


def test_irregular_frame_spacing_is_refused_naming_uid_and_frames(
    multiframe: dict[str, Path], tmp_path: Path
) -> None:
    def shift(ds: Dataset) -> None:
        position = ds.PerFrameFunctionalGroupsSequence[19].PlanePositionSequence[0]
        x, y, z = (float(v) for v in position.ImagePositionPatient)
        position.ImagePositionPatient = [x, y, z + 1.0]

    path, uid = edited(multiframe["enhanced"], tmp_path, shift)
    with pytest.raises(
        VolumeError,
        # Frame 20 moved 1 mm up, towards frame 19: 3.5 mm from frame 21 below it.
        match=rf"irregular spacing: 3\.50 mm between slices {uid} frame 21 and {uid} frame 20,",
    ):
        load_series([path])


def test_missing_frame_is_refused(multiframe: dict[str, Path], tmp_path: Path) -> None:
    files = files_of(multiframe["dicom"].parent)
    path = write_enhanced_ct(files[:10] + files[11:], tmp_path / "gap.dcm")
    uid = re.escape(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    # Frames 10 and 11 were slices 10 and 12 (frame 11 is the lower one).
    with pytest.raises(
        VolumeError,
        match=rf"a missing slice: 5\.00 mm between slices {uid} frame 11 and {uid} frame 10,",
    ):
        load_series([path])


def test_duplicate_frame_positions_are_refused(multiframe: dict[str, Path], tmp_path: Path) -> None:
    def duplicate(ds: Dataset) -> None:
        items = ds.PerFrameFunctionalGroupsSequence
        items[5].PlanePositionSequence = deepcopy(items[6].PlanePositionSequence)

    path, uid = edited(multiframe["enhanced"], tmp_path, duplicate)
    with pytest.raises(VolumeError, match=rf"slices {uid} frame [67] and {uid} frame [67] share"):
        load_series([path])


def test_a_series_mixing_single_frame_and_multiframe_images_is_refused(
    multiframe: dict[str, Path], tmp_path: Path
) -> None:
    series_uid = str(pydicom.dcmread(multiframe["dicom"] / "CT000001.dcm").SeriesInstanceUID)
    path = write_enhanced_ct(multiframe["dicom"], tmp_path / "ect.dcm", series_uid=series_uid)
    files = [*files_of(multiframe["dicom"].parent), path]
    with pytest.raises(VolumeError, match="mixes 40 single-frame images with 1 multi-frame"):
        load_series(files)
    selection = select_series(files, SeriesRules(min_slices=20))
    assert selection.chosen is None
    assert "40 single-frame images mixed with 1 multi-frame instances" in selection.reason()


def test_slice_sources_give_each_slice_its_instance_header_and_frame(
    multiframe: dict[str, Path],
) -> None:
    volume = load_series([multiframe["enhanced"]])
    sources = slice_sources(volume)
    assert [s.frame for s in sources] == list(volume.frames)
    assert all(s.header is sources[0].header for s in sources)  # one header read, shared
    assert "PixelData" not in sources[0].header
    assert sources[0].sop_instance_uid == volume.sop_uids[0]
    assert sources[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"
    single = slice_sources(load_series(files_of(multiframe["dicom"].parent)[:3]))
    assert [s.frame for s in single] == [None] * 3


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_series_selection_counts_frames(multiframe: dict[str, Path], kind: str) -> None:
    selection = select_series([multiframe[kind]], SeriesRules(min_slices=20))
    assert selection.chosen is not None, selection.reason()
    assert selection.chosen.slice_count == 40
    assert selection.chosen.files == [multiframe[kind]]
    header = selection.chosen.headers[0]
    assert "PerFrameFunctionalGroupsSequence" in header and "PixelData" not in header
    # The functional groups' Slice Thickness (2.5 mm) and orientation are read.
    thin = select_series([multiframe[kind]], SeriesRules(min_slices=20, max_slice_thickness_mm=2))
    assert thin.chosen is None and "slice thickness 2.5 mm > 2 mm" in thin.reason()
    assert "Image Orientation" not in thin.reason()


def test_series_selection_refuses_a_short_multiframe_instance(
    multiframe: dict[str, Path], tmp_path: Path
) -> None:
    files = files_of(multiframe["dicom"].parent)[:10]
    for path in (
        write_legacy_enhanced_ct(files, tmp_path / "lce.dcm"),
        write_enhanced_ct(files, tmp_path / "ect.dcm"),
    ):
        selection = select_series([path], SeriesRules(min_slices=20))
        assert selection.chosen is None
        assert "10 slices, fewer than 20" in selection.reason()
        assert "Image Orientation" not in selection.reason()


def test_series_selection_reads_the_frame_type(multiframe: dict[str, Path], tmp_path: Path) -> None:
    def localizer(ds: Dataset) -> None:
        frame_type = ds.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0]
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]

    path, _ = edited(multiframe["enhanced"], tmp_path, localizer)
    selection = select_series([path], SeriesRules(min_slices=20))
    assert selection.chosen is None and "image type LOCALIZER" in selection.reason()


def test_a_decoder_warning_refuses_the_slice_and_leaves_other_threads_warnings_alone(
    study: Path, tmp_path: Path
) -> None:
    """pydicom warns of excess padding after the pixels: the slice is refused (damaged data).
    A warning of another thread meanwhile (the review app's Gradio, in pandas) stays a warning:
    the decode no longer sets the process's filters to "error", which made it an exception
    there (seen as a traceback in the review app's log)."""
    import threading
    import warnings

    from inference import volume

    copies = copy_series(study, tmp_path)
    ds = pydicom.dcmread(copies[1])
    ds.PixelData = ds.PixelData + b"\x00" * 6  # excess padding after the pixels: pydicom warns
    ds.save_as(copies[1])
    with pytest.raises(VolumeError, match=rf"pixel data of {copies[1].name} cannot be decoded"):
        load_series(copies)

    raised: list[BaseException] = []
    inside, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        inside.wait(10)
        try:
            warnings.warn("a pandas deprecation in another thread", FutureWarning, stacklevel=1)
        except BaseException as exc:  # noqa: BLE001 - what the old filters made of it
            raised.append(exc)
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    # Passed on when the block ends, not swallowed, and not this decode's.
    with pytest.warns(FutureWarning, match="another thread"), volume._decoder_warnings() as check:
        inside.set()
        assert done.wait(10)
        check()
    thread.join()
    assert raised == []
