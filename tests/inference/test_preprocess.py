"""The shared preprocessing: reorientation to LPS, resampling, HU window, exact affine."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from inference.preprocess import (
    PreprocessError,
    PreprocessSpec,
    body_mask,
    preprocess,
    to_lps,
)
from inference.volume import Volume, load_series
from training.phantom import NoduleRequest, PhantomOptions, generate

SPEC = PreprocessSpec(spacing_mm=(2.0, 1.0, 1.0), hu_window=(-1000.0, 400.0))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, np.ndarray]:
    out = tmp_path_factory.mktemp("preprocess")
    generate(
        out,
        PhantomOptions(
            seed=12,
            slices=24,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(16.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    truth = json.loads((out / "ground_truth.json").read_text(encoding="utf-8"))
    volume = load_series(sorted((out / "dicom").glob("*.dcm")))
    return volume, np.array(truth["nodules"][0]["center_mm"])


def flipped_rows(volume: Volume) -> Volume:
    """The same scan stored bottom-up (rows run anterior), as some scanners write it."""
    rows = volume.hu.shape[1]
    origin = volume.origin + volume.col_dir * volume.spacing[1] * (rows - 1)
    return replace(volume, hu=volume.hu[:, ::-1, :].copy(), col_dir=-volume.col_dir, origin=origin)


def value_at(pre_array: np.ndarray, affine: np.ndarray, point: np.ndarray) -> float:
    index = np.linalg.solve(affine[:3, :3], point - affine[:3, 3])
    k, r, c = np.round(index).astype(int)
    return float(pre_array[k, r, c])


def test_lps_volume_is_unchanged(phantom: tuple[Volume, np.ndarray]) -> None:
    volume, _ = phantom
    hu, affine = to_lps(volume)
    assert np.array_equal(hu, volume.hu)
    assert np.allclose(affine, volume.affine)


def test_flipped_storage_gives_the_same_model_input(phantom: tuple[Volume, np.ndarray]) -> None:
    volume, _ = phantom
    a = preprocess(volume, SPEC)
    b = preprocess(flipped_rows(volume), SPEC)
    assert np.allclose(a.array, b.array, atol=1e-6)
    assert np.allclose(a.affine, b.affine)


def test_resampled_affine_points_at_the_nodule(phantom: tuple[Volume, np.ndarray]) -> None:
    volume, centre = phantom
    pre = preprocess(volume, SPEC)
    spacing = np.linalg.norm(pre.affine[:3, :3], axis=0)
    assert np.allclose(spacing, SPEC.spacing_mm, rtol=0.02)
    assert pre.array.dtype == np.float32
    assert pre.array.min() >= 0.0 and pre.array.max() <= 1.0
    # Solid nodule tissue (~ +40 HU) windowed to about 0.74; aerated lung (~ -850 HU) to ~0.1.
    assert value_at(pre.array, pre.affine, centre) > 0.6
    assert np.allclose(pre.to_patient(np.zeros(3)), volume.origin)


def test_body_mask_holds_the_lungs_and_nodule_but_not_the_air(
    phantom: tuple[Volume, np.ndarray],
) -> None:
    volume, centre = phantom
    pre = preprocess(volume, SPEC)
    assert pre.body is not None and pre.body.shape == pre.array.shape
    assert value_at(pre.body, pre.affine, centre) == 1.0  # an isolated nodule, inside a lung
    lung = (pre.array < 0.2) & pre.body  # aerated lung is in the body, as holes of its ring
    assert lung.sum() > 0.1 * pre.body.sum()
    assert not pre.body[:, :3, :3].any()  # air in the corners of the field of view
    flipped = preprocess(flipped_rows(volume), SPEC).body
    assert flipped is not None and np.array_equal(flipped, pre.body)


def test_without_the_body_the_model_input_is_the_same(phantom: tuple[Volume, np.ndarray]) -> None:
    volume, _ = phantom
    with_body = preprocess(volume, SPEC)
    without = preprocess(volume, SPEC, body=False)
    assert without.body is None and with_body.body is not None
    assert np.array_equal(without.array, with_body.array)
    assert np.array_equal(without.affine, with_body.affine)


def test_oblique_series_is_refused(phantom: tuple[Volume, np.ndarray]) -> None:
    volume, _ = phantom
    angle = np.radians(20)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    col = np.array([-np.sin(angle), np.cos(angle), 0.0])
    with pytest.raises(PreprocessError, match="oblique"):
        preprocess(replace(volume, row_dir=row, col_dir=col), SPEC)


@pytest.mark.parametrize(
    ("spacing", "window", "message"),
    [((0.0, 1.0, 1.0), (-1000.0, 400.0), "spacing"), ((1.0, 1.0, 1.0), (400.0, -1000.0), "window")],
)
def test_invalid_specs(
    spacing: tuple[float, float, float], window: tuple[float, float], message: str
) -> None:
    with pytest.raises(PreprocessError, match=message):
        PreprocessSpec(spacing, window)


def test_preprocessing_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import inference.preprocess, sys; assert 'torch' not in sys.modules; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_body_mask_keeps_the_lung_of_a_chest_cut_by_the_field_of_view() -> None:
    """A small field of view cuts through the chest wall: the lung reaches the image edge. The
    edge closes the body's ring there, so the lung still counts as inside the body."""
    rows, cols = np.mgrid[0:96, 0:96]
    body = ((rows - 48) / 40.0) ** 2 + ((cols - 20) / 60.0) ** 2 <= 1.0  # cut at the left edge
    lung = ((rows - 48) / 25.0) ** 2 + ((cols - 10) / 30.0) ** 2 <= 1.0  # reaches the edge
    hu = np.full((3, 96, 96), -1000.0, dtype=np.float32)  # air around the patient
    hu[:, body] = 40.0
    hu[:, lung] = -850.0
    mask = body_mask(hu)
    assert mask[:, 48, 0].all() and mask[:, 48, 20].all()  # lung at the cut edge and inside
    assert not mask[:, 48, 90].any() and not mask[:, 2, 2].any()  # the air around stays out
    assert mask[1].sum() == pytest.approx(body.sum(), rel=0.02)
