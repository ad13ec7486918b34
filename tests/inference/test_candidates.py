"""The two-stage detector's candidate stage: blobs rank above vessels; the lungs are found."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.candidates import (
    CandidateError,
    CandidateSpec,
    blob_shape,
    bounding_box,
    find_candidates,
    local_peaks,
    lung_mask,
    probability_peaks,
    without_background,
)

WINDOW = (-1000.0, 400.0)


def windowed(hu: float) -> float:
    return (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def lung_with_a_nodule_and_a_vessel() -> tuple[np.ndarray, tuple[int, int, int]]:
    """64³ of parenchyma at 1 mm: a 6 mm solid nodule and a 3 mm vessel running along x."""
    z, y, x = np.mgrid[:64, :64, :64].astype(np.float32)
    volume = np.full((64, 64, 64), windowed(-850.0), dtype=np.float32)
    nodule = (20, 20, 40)
    volume[(z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2 <= 9.0] = windowed(40)
    volume[(z - 44) ** 2 + (y - 44) ** 2 <= 2.25] = windowed(40)
    return volume, nodule


def test_a_nodule_outranks_a_vessel_of_the_same_density() -> None:
    volume, nodule = lung_with_a_nodule_and_a_vessel()
    found = find_candidates(volume, np.ones(volume.shape, bool), 1.0, CandidateSpec())
    assert len(found) > 1
    first = found.index[0]
    assert np.linalg.norm(first - np.asarray(nodule)) <= 1.5, found.index[:3]
    assert found.shape[0] > 0.6
    on_vessel = np.abs(found.index[:, 0] - 44) + np.abs(found.index[:, 1] - 44) <= 3
    assert on_vessel.any() and found.shape[on_vessel].max() < 0.3
    assert np.all(np.diff(found.response) <= 0)  # strongest first
    assert 2.0 <= found.radius_mm[0] <= 5.0  # the scale estimates the 3 mm radius


def pleura_with_a_small_nodule(wall_x: int, nodule_x: float) -> np.ndarray:
    """48 x 48 x 64 at 1 mm: chest wall (soft tissue) where x < ``wall_x`` with a rib under the
    pleura, a 3 mm nodule on the pleura at (24, 24, ``nodule_x``), blurred as a scanner does."""
    z, y, x = np.mgrid[:48, :48, :64].astype(np.float32)
    hu = np.full((48, 48, 64), -850.0, dtype=np.float32)
    hu[:, :, :wall_x] = 40.0
    hu[(y - 24) ** 2 + (x - (wall_x - 5)) ** 2 <= 16] = 700.0
    hu[(z - 24) ** 2 + (y - 24) ** 2 + (x - nodule_x) ** 2 <= 2.25] = 40.0
    blurred = ndimage.gaussian_filter(hu, 0.8)
    return np.clip((blurred - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1).astype(np.float32)


def test_without_the_background_a_small_nodule_on_the_pleura_is_a_blob_of_its_own() -> None:
    """The wall and the rib beside a 3 mm nodule drown its blob (no candidate within its
    radius at some positions); with the wall's grey opening subtracted there is one at each."""
    missed = 0
    for wall_x, nodule_x in ((20, 19.0), (20, 21.0), (19, 20.0), (18, 19.0)):
        volume = pleura_with_a_small_nodule(wall_x, nodule_x)
        lungs = np.zeros(volume.shape, bool)
        lungs[:, :, wall_x - 4 :] = True  # the lungs' margin reaches 4 mm into the wall
        centre = np.array([24.0, 24.0, nodule_x])
        for background in (None, 13.0):
            spec = CandidateSpec(max_candidates=50, background_mm=background)
            found = find_candidates(volume, lungs, 1.0, spec)
            distance = np.linalg.norm(found.index - centre, axis=1)
            if background is None:
                missed += bool(distance.min() > 1.5)
            else:
                assert distance.min() <= 1.5, (wall_x, nodule_x, found.index[:5])
    assert missed >= 2  # what the setting is for


def test_the_background_is_the_grey_opening_of_a_wider_region() -> None:
    """A wall wider than the cube is gone, a ball narrower than it stays; the opening sees half
    a cube beyond the box, so the wall at the box's edge is wall too."""
    volume = np.full((30, 30, 40), 0.1, dtype=np.float32)
    volume[:, :, :15] = 0.7  # a wall 15 voxels thick
    z, y, x = np.mgrid[:30, :30, :40]
    volume[(z - 15) ** 2 + (y - 15) ** 2 + (x - 28) ** 2 <= 4] = 0.7  # a 4-5 voxel ball
    box = (slice(0, 30), slice(0, 30), slice(10, 40))  # only 5 voxels of the wall inside
    top = without_background(volume, box, 9.0)
    assert top.shape == (30, 30, 30)
    assert np.abs(top[:, :, :5]).max() < 1e-6  # the wall: its opening is itself
    assert top[15, 15, 18] == pytest.approx(0.6)  # the ball keeps its contrast
    assert np.abs(top[:, :, 10:14]).max() < 1e-6  # the lungs: flat


def test_candidates_stay_inside_the_lungs_and_within_the_cap() -> None:
    volume, _ = lung_with_a_nodule_and_a_vessel()
    lungs = np.zeros(volume.shape, bool)
    lungs[:, 32:, :] = True  # the vessel's half only
    found = find_candidates(volume, lungs, 1.0, CandidateSpec(max_candidates=3))
    assert 1 <= len(found) <= 3
    assert np.all(found.index[:, 1] >= 31)


def test_roundness_is_one_for_a_sphere_and_zero_where_nothing_is_bright() -> None:
    r = np.arange(-8, 9, dtype=np.float64)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    sphere = np.exp(-(z**2 + y**2 + x**2) / 8.0).astype(np.float32)
    tube = np.exp(-(y**2 + x**2) / 8.0).astype(np.float32)
    centre = np.array([[8, 8, 8]])
    assert blob_shape(sphere, centre)[0] == pytest.approx(1.0, abs=0.02)
    assert blob_shape(tube, centre)[0] < 0.05
    assert blob_shape(-sphere, centre)[0] == 0.0
    assert blob_shape(sphere, np.array([[0, 8, 8]]))[0] == 0.0  # on the edge: not measured


def test_network_peaks_are_ranked_and_kept_apart() -> None:
    p = np.zeros((20, 20, 20), dtype=np.float32)
    p[5, 5, 5], p[5, 5, 6], p[15, 15, 15] = 0.3, 0.29, 0.6
    peaks = probability_peaks(p, (1.0, 1.0, 1.0), 0.01, 10, separation_mm=4.0)
    assert peaks.index.tolist() == [[15, 15, 15], [5, 5, 5]]
    assert peaks.response.tolist() == pytest.approx([0.6, 0.3])


def test_the_lungs_are_the_air_inside_the_body() -> None:
    _, y, x = np.mgrid[:48, :96, :96].astype(np.float32)
    hu = np.full((48, 96, 96), -1000.0, dtype=np.float32)  # outside air
    body = (y - 48) ** 2 / 44**2 + (x - 48) ** 2 / 44**2 <= 1
    hu[body] = 40.0
    for cx in (22, 74):
        hu[(y - 48) ** 2 / 30**2 + (x - cx) ** 2 / 12**2 <= 1] = -850.0
    array = (np.clip(hu, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    lungs = lung_mask(array, body, 1.0, CandidateSpec(), WINDOW)
    assert lungs[24, 48, 22] and lungs[24, 48, 74]
    assert not lungs[24, 2, 2]  # the air around the patient
    assert not lungs[24, 48, 48]  # the mediastinum between the lungs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigmas_mm": ()}, "sigmas_mm must be positive"),
        ({"sigmas_mm": (2.0, 1.0)}, "sigmas_mm must increase"),
        ({"max_candidates": 0}, "max_candidates must be 1 or more"),
        ({"background_mm": 0.0}, "background_mm must be positive"),
    ],
)
def test_bad_settings_name_the_setting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CandidateError, match=message):
        CandidateSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(9, 12, 7), (1, 5, 6), (2, 2, 2)])
def test_the_peaks_are_the_voxels_equal_to_scipys_3x3x3_maximum_filter(
    shape: tuple[int, int, int],
) -> None:
    """The peaks compared only where they can be (above the floor, in the mask) are exactly the
    whole-grid definition, edges and plateaus included, in the same (C) order."""
    from scipy import ndimage

    rng = np.random.default_rng(sum(shape))
    array = rng.random(shape, dtype=np.float32)
    array[0, 0, :2] = 0.9  # a plateau: equal neighbours are both maxima
    mask = rng.random(shape) < 0.8
    mask[0, 0, :2] = True
    expected = np.argwhere(
        (array == ndimage.maximum_filter(array, size=3, mode="nearest")) & (array > 0.3) & mask
    )
    found = local_peaks(array, mask, 0.3)
    assert len(found) > 0 and np.array_equal(found, expected)
    assert local_peaks(array, mask, 1.0).shape == (0, 3)


def test_the_box_of_a_mask_is_find_objects_box() -> None:
    from scipy import ndimage

    mask = np.zeros((7, 9, 11), dtype=bool)
    mask[2, 3, 4] = mask[5, 1, 9] = True
    assert bounding_box(mask) == ndimage.find_objects(mask.astype(np.uint8))[0]


def test_candidates_do_not_depend_on_the_blur_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference import candidates

    volume, _ = lung_with_a_nodule_and_a_vessel()
    lungs = np.ones(volume.shape, dtype=bool)
    spec = CandidateSpec(max_candidates=20)
    two = find_candidates(volume, lungs, 1.0, spec)
    monkeypatch.setattr(candidates, "BLUR_THREADS", 1)
    one = find_candidates(volume, lungs, 1.0, spec)
    assert np.array_equal(two.index, one.index) and np.array_equal(two.response, one.response)
