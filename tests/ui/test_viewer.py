"""The review app's slice renderer on a real result: a phantom study run through the inference
pipeline (stand-in ONNX model), its findings.json and SEG read back by the viewer."""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from scipy import ndimage

from aidx.config import load_config
from inference.findings import Finding
from inference.pipeline import InferenceResult, infer_files
from inference.volume import Volume, load_series
from models.registry import Registry
from tests.enhanced_ct import write_legacy_enhanced_ct
from tests.standin_model import install
from training.phantom import NoduleRequest, PhantomOptions, generate
from ui.viewer import BOX_MARGIN, WINDOW_PRESETS, StudyView, display_order, window_gray

LUNG = WINDOW_PRESETS["lung"]


@dataclass(frozen=True)
class Study:
    root: Path  # holds study/dicom (the CT series) and out/ (findings.json, SR, SEG)
    files: list[Path]
    result: InferenceResult  # findings with their masks
    nodule: Finding  # the finding at the phantom's nodule
    nodule_center_mm: tuple[float, float, float]  # ground truth


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("viewer")
    phantom = generate(
        root / "study",
        PhantomOptions(
            seed=5,
            slices=30,
            matrix=96,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    models = root / "models"
    model = Registry(models).resolve(None, install(models, root))
    config = load_config(env={}, overrides={"inference.min_volume_mm3": 50})
    files = sorted(phantom.dicom_dir.glob("*.dcm"))
    result = infer_files(files, root / "out", config, model)
    truth = np.array(phantom.ground_truth["nodules"][0]["center_mm"])
    nodule = min(
        result.report.findings, key=lambda f: float(np.linalg.norm(np.array(f.center_mm) - truth))
    )
    assert np.linalg.norm(np.array(nodule.center_mm) - truth) < 5.0, "the nodule was not found"
    assert result.seg_path is not None
    x, y, z = (float(v) for v in truth)
    return Study(root, files, result, nodule, (x, y, z))


@pytest.fixture(scope="module")
def view(study: Study) -> StudyView:
    out = study.root / "out"
    return StudyView.open(study.root / "study" / "dicom", out / "findings.json", out / "seg.dcm")


def coloured(rgb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels that are not grey."""
    return np.asarray((rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2]))


def uniform_volume(hu: float) -> Volume:
    return Volume(
        hu=np.full((2, 8, 8), hu, dtype=np.float32),
        origin=np.zeros(3),
        row_dir=np.array([1.0, 0, 0]),
        col_dir=np.array([0, 1.0, 0]),
        normal=np.array([0, 0, 1.0]),
        spacing=(1.0, 1.0, 1.0),
        sop_uids=("1.2.3.1", "1.2.3.2"),
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        frame_of_reference_uid="1.2.3.5",
    )


# ---------------------------------------------------------------------------------- windowing
@pytest.mark.parametrize(
    ("preset", "low", "mid", "high"),
    [
        ("lung", -1350.0, -600.0, 150.0),
        ("mediastinum", -125.0, 50.0, 225.0),
        ("bone", -500.0, 500.0, 1500.0),
    ],
)
def test_window_presets_map_their_range_onto_black_to_white(
    preset: str, low: float, mid: float, high: float
) -> None:
    window, level = WINDOW_PRESETS[preset]
    hu = np.array([low - 500, low, mid, high, high + 500], dtype=np.float32)
    assert window_gray(hu, window, level).tolist() == [0, 0, 128, 255, 255]


def test_minus_600_hu_is_mid_grey_in_the_lung_window_of_a_rendered_slice() -> None:
    picture = StudyView(uniform_volume(-600.0)).render(0, *LUNG)
    assert picture.shape == (8, 8, 3)
    assert np.all(picture == 128)


def test_manual_window_level_is_linear_and_a_bad_window_is_refused() -> None:
    hu = np.array([-101.0, 0.0, 100.0, 300.0], dtype=np.float32)
    assert window_gray(hu, 201.0, 0.0).tolist() == [0, 128, 255, 255]
    assert window_gray(hu, 1.0, 50.0).tolist() == [0, 0, 255, 255]  # a threshold
    view = StudyView(uniform_volume(0.0))
    for window, level in ((0.0, 40.0), (math.nan, 40.0), (400.0, math.inf)):
        with pytest.raises(ValueError, match="window must be a number >= 1"):
            view.render(0, window, level)


# ---------------------------------------------------------------------------------- overlays
def test_key_slice_is_the_findings_key_sop_instance(view: StudyView, study: Study) -> None:
    for finding in view.findings:
        k = view.finding_slice(finding.id)
        assert view.volume.sop_uids[k] == finding.key_sop_instance_uid
    centre_k, _, _ = view.patient_to_pixel(study.nodule.center_mm)
    assert view.finding_slice(study.nodule.id) == round(centre_k)


def test_key_slice_shows_the_selected_findings_contour_and_box_in_its_colour(
    view: StudyView, study: Study
) -> None:
    nodule = study.nodule
    k = view.finding_slice(nodule.id)
    picture = view.render(k, *LUNG, selected_finding=nodule.id)
    colour = np.array(view.colour(nodule.id))
    assert len(set(view.colour(nodule.id))) > 1  # not a grey

    # The contour (from the SEG): the 2-pixel ring just outside the mask, all in the colour.
    mask = nodule.mask
    assert mask is not None and mask[k].any()
    grown = ndimage.binary_dilation(mask[k], np.ones((3, 3), bool), iterations=2)
    ring = grown & ~mask[k]
    assert np.all(picture[ring] == colour)
    # The lesion itself stays visible: its pixels are grey.
    assert not coloured(picture)[mask[k]].any()

    # The box: bbox_mm mapped through the series affine, BOX_MARGIN pixels outside it.
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=float) * (
        np.array(nodule.bbox_mm[1]) - np.array(nodule.bbox_mm[0])
    ) + np.array(nodule.bbox_mm[0])
    index = view.volume.to_index(corners)
    r_lo, c_lo = np.floor(index.min(axis=0)[1:] + 0.5).astype(int) - BOX_MARGIN
    r_hi, c_hi = np.ceil(index.max(axis=0)[1:] - 0.5).astype(int) + BOX_MARGIN
    _, r, c = view.patient_to_pixel(nodule.center_mm)
    assert r_lo < r < r_hi and c_lo < c < c_hi
    for row, col in ((r_lo, round(c)), (r_hi, round(c)), (round(r), c_lo), (round(r), c_hi)):
        assert np.all(picture[row, col] == colour), (row, col)
    # Nothing in the finding's colour (its own) beyond the box, but the id label above it.
    assert all(
        view.colour(f.id) != view.colour(nodule.id) for f in view.findings if f.id != nodule.id
    )
    near = np.all(picture[r_lo - 3 : r_hi + 4, c_lo - 3 : c_hi + 4] == colour, axis=-1)
    outside = near.copy()
    outside[3:-3, 3:-3] = False  # the box and what it holds
    outside[:3] = False  # the label plate sits on the box's top edge
    assert not outside.any()


def test_contours_from_the_seg_match_the_findings_masks(view: StudyView, study: Study) -> None:
    from_masks = StudyView(view.volume, study.result.report.findings)
    for k in range(view.slice_count):
        for selected in (None, study.nodule.id):
            assert np.array_equal(
                view.render(k, *LUNG, selected_finding=selected),
                from_masks.render(k, *LUNG, selected_finding=selected),
            ), k


def test_a_box_is_drawn_on_the_slices_its_bbox_spans_only(view: StudyView, study: Study) -> None:
    alone = StudyView(view.volume, [replace(study.nodule, mask=None)])  # the box alone
    _, _, z0 = study.nodule.bbox_mm[0]
    _, _, z1 = study.nodule.bbox_mm[1]
    for k in range(view.slice_count):
        z = float(view.volume.to_patient((k, 0, 0))[2])
        drawn = coloured(alone.render(k, *LUNG)).any()
        assert drawn == (z0 <= z <= z1), (k, z, z0, z1)


def test_without_overlays_the_slice_is_pure_grey(view: StudyView, study: Study) -> None:
    k = view.finding_slice(study.nodule.id)
    for window, level in WINDOW_PRESETS.values():
        picture = view.render(k, window, level, overlays=False, selected_finding=study.nodule.id)
        assert not coloured(picture).any()
        assert np.array_equal(picture[..., 0], window_gray(view.volume.hu[k], window, level))
    assert coloured(view.render(k, *LUNG)).any()


def test_png_is_the_rendered_picture(view: StudyView, study: Study) -> None:
    k = view.finding_slice(study.nodule.id)
    png = view.render_png(k, *LUNG, selected_finding=study.nodule.id)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(decoded, view.render(k, *LUNG, selected_finding=study.nodule.id))


# ---------------------------------------------------------------------------------- geometry
def test_pixel_to_patient_follows_the_dicom_image_plane(view: StudyView, study: Study) -> None:
    """PS3.3 C.7.6.2.1.1: position = IPP + column * ΔX * row direction + row * ΔY * column
    direction, from the key slice's own header; and it inverts patient_to_pixel."""
    k = view.finding_slice(study.nodule.id)
    _, r, c = view.patient_to_pixel(study.nodule.center_mm)
    header = dcmread(view.volume.files[k], stop_before_pixels=True)
    ipp = np.array([float(v) for v in header.ImagePositionPatient])
    iop = np.array([float(v) for v in header.ImageOrientationPatient])
    d_row, d_col = (float(v) for v in header.PixelSpacing)
    expected = ipp + c * d_col * iop[:3] + r * d_row * iop[3:]
    point = np.array(view.pixel_to_patient(k, r, c))
    np.testing.assert_allclose(point, expected, atol=1e-6)
    # In the slice plane the centre maps back to itself; across it, onto the key slice.
    np.testing.assert_allclose(point[:2], study.nodule.center_mm[:2], atol=1e-6)
    assert abs(point[2] - study.nodule.center_mm[2]) <= view.volume.spacing[0] / 2
    back = np.array(view.patient_to_pixel(point))
    np.testing.assert_allclose(back, np.array([k, r, c]), atol=1e-9)
    assert np.linalg.norm(point - np.array(study.nodule_center_mm)) < 5.0
    with pytest.raises(ValueError, match="outside the 96x96 image"):
        view.pixel_to_patient(k, 96.0, 10.0)


def test_thumbnails_have_the_asked_size_and_show_the_contour(view: StudyView, study: Study) -> None:
    for size in (96, 40):
        thumb = view.thumbnail(study.nodule.id, size=size)
        assert thumb.shape == (size, size, 3) and thumb.dtype == np.uint8
        assert coloured(thumb).any()
    with pytest.raises(ValueError, match=r"thumbnail size must be 8\.\.1024"):
        view.thumbnail(study.nodule.id, size=4)


def test_bad_slice_index_or_finding_id_says_what_is_valid(view: StudyView) -> None:
    for bad in (-1, view.slice_count):
        with pytest.raises(ValueError, match=r"slice index .* is outside 0\.\.29 .*30 slices"):
            view.render(bad, *LUNG)
    with pytest.raises(ValueError, match="slice index must be an integer"):
        view.render(2.5, *LUNG)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no finding 999 in this study \(findings: 1, 2"):
        view.render(0, *LUNG, selected_finding=999)
    with pytest.raises(ValueError, match="no finding 999"):
        view.finding_slice(999)


# ---------------------------------------------------------------------------------- opening
def test_a_folder_with_results_beside_the_series_opens_the_findings_series(
    study: Study,
) -> None:
    """The folder holds the CT series, the SR, the SEG and JSON files: the series the findings
    name is picked."""
    out = study.root / "out"
    view = StudyView.open(study.root, out / "findings.json", out / "seg.dcm")
    assert view.slice_count == 30
    assert view.volume.series_uid == study.result.report.series_instance_uid
    assert [f.id for f in view.findings] == [f.id for f in study.result.report.findings]


def test_a_seg_naming_findings_the_json_lacks_is_refused(study: Study, tmp_path: Path) -> None:
    data = json.loads((study.root / "out" / "findings.json").read_text(encoding="utf-8"))
    data["findings"] = [f for f in data["findings"] if f["id"] != study.nodule.id]
    partial = tmp_path / "findings.json"
    partial.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"names finding {study.nodule.id}, which the findings"):
        StudyView.open(study.files, partial, study.root / "out" / "seg.dcm")


def test_findings_of_another_series_are_refused(study: Study, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(study.root / "study" / "dicom", other)
    for path in other.glob("*.dcm"):
        ds = dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.save_as(path)
    with pytest.raises(ValueError, match=r"none of the 30 files in .* belongs to series"):
        StudyView.open(other, study.root / "out" / "findings.json")
    with pytest.raises(ValueError, match=r"is for series .*, the images are series"):
        StudyView.open(sorted(other.glob("*.dcm")), study.root / "out" / "findings.json")


def test_a_view_without_findings_shows_the_images(study: Study) -> None:
    view = StudyView.open(study.files)
    assert view.findings == ()
    assert view.volume.sop_uids == load_series(study.files).sop_uids
    assert not coloured(view.render(10, *LUNG)).any()


def test_a_seg_alone_draws_its_segments_under_their_tracking_ids(
    view: StudyView, study: Study
) -> None:
    seg_only = StudyView.open(study.files, seg_path=study.root / "out" / "seg.dcm")
    assert seg_only.findings == ()
    k = view.finding_slice(study.nodule.id)
    picture = seg_only.render(k, *LUNG, selected_finding=study.nodule.id)
    mask = study.nodule.mask
    assert mask is not None
    ring = ndimage.binary_dilation(mask[k], np.ones((3, 3), bool), iterations=2) & ~mask[k]
    assert np.all(picture[ring] == np.array(seg_only.colour(study.nodule.id)))
    assert study.nodule.id in seg_only.findings_on_slice(k)


# ---------------------------------------------------------------------------- image numbering
def test_the_viewer_numbers_and_orders_images_as_the_pacs_does(view: StudyView) -> None:
    # The phantom numbers its images from the head down, as a CT scanner does; the volume runs
    # from the feet up (along the slice normal). Scrolling follows the Instance Numbers.
    numbers = [int(dcmread(f, stop_before_pixels=True).InstanceNumber) for f in view.volume.files]
    assert list(view.volume.instance_numbers) == numbers
    assert numbers == sorted(numbers, reverse=True)
    shown = [view.instance_number(view.slice_at(p)) for p in range(view.slice_count)]
    assert shown == sorted(numbers)
    assert [view.display_position(view.slice_at(p)) for p in range(view.slice_count)] == list(
        range(view.slice_count)
    )
    top = view.slice_at(0)
    assert view.slice_location(top) == pytest.approx(
        float(dcmread(view.volume.files[top], stop_before_pixels=True).ImagePositionPatient[2])
    )
    assert view.slice_location(view.slice_at(1)) < view.slice_location(top)  # head first
    assert view.slice_at(-5) == view.slice_at(0)  # positions clamp to the series
    assert view.slice_at(10_000) == view.slice_at(view.slice_count - 1)


def test_without_usable_instance_numbers_axial_images_go_from_the_head_down() -> None:
    base = uniform_volume(0.0)  # two slices, the normal along +z: k = 1 is nearer the head
    assert display_order(base) == (1, 0)
    assert display_order(replace(base, instance_numbers=(None, 4))) == (1, 0)
    assert display_order(replace(base, instance_numbers=(7, 7))) == (1, 0)  # not distinct
    assert display_order(replace(base, instance_numbers=(1, 2))) == (0, 1)  # the PACS's order
    assert display_order(replace(base, instance_numbers=(2, 1))) == (1, 0)
    three = replace(
        base,
        hu=np.zeros((3, 8, 8), np.float32),
        sop_uids=("1.1", "1.2", "1.3"),
        instance_numbers=(1, 3, 2),  # not steady along the series: hang by geometry
    )
    assert display_order(three) == (2, 1, 0)
    feet_up = replace(base, normal=np.array([0, 0, -1.0]), row_dir=np.array([-1.0, 0, 0]))
    assert display_order(feet_up) == (0, 1)
    # Sagittal from the patient's right (-x in LPS), coronal from the front (-y).
    for normal, order in (((1.0, 0, 0), (0, 1)), ((-1.0, 0, 0), (1, 0)), ((0, 1.0, 0), (0, 1))):
        assert display_order(replace(base, normal=np.array(normal))) == order
    view = StudyView(replace(base, instance_numbers=()))
    assert view.instance_number(0) is None


def test_an_enhanced_ct_opens_with_its_findings_and_seg_on_the_same_slices(
    study: Study, view: StudyView, tmp_path: Path
) -> None:
    """The study as one Legacy Converted Enhanced CT instance: the viewer shows the same
    images, jumps to the same key slice (a frame) and draws the SEG's contours (whose frames
    reference the instance's frames) where the single-frame study has them."""
    ct = write_legacy_enhanced_ct(study.files, tmp_path / "ct" / "ct.dcm")
    models = study.root / "models"
    model = Registry(models).resolve(None, install(models, study.root))
    config = load_config(env={}, overrides={"inference.min_volume_mm3": 50})
    result = infer_files([ct], tmp_path / "out", config, model)
    assert result.seg_path is not None
    frames = StudyView.open(ct.parent, result.findings_path, result.seg_path)
    assert np.array_equal(frames.volume.hu, view.volume.hu)
    assert sorted(frames.volume.frames) == list(range(1, len(study.files) + 1))  # type: ignore[type-var]
    assert [f.key_frame for f in frames.findings] == [
        frames.volume.frames[view.finding_slice(f.id)] for f in view.findings
    ]
    for f in view.findings:
        k = view.finding_slice(f.id)
        assert frames.finding_slice(f.id) == k
        assert np.array_equal(frames.render(k, *LUNG), view.render(k, *LUNG))
