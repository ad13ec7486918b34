"""The caliper axes of a region on one image (inference.axes), against shapes of known size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.axes import measure_axes, scoord


def ellipse(rows: float, columns: float, angle_deg: float, size: int = 96) -> np.ndarray:
    """A filled ellipse with semi-axes ``rows`` and ``columns`` (pixels) turned by ``angle``."""
    y, x = np.mgrid[:size, :size] - size / 2 + 0.5
    a = math.radians(angle_deg)
    u = x * math.cos(a) + y * math.sin(a)
    v = -x * math.sin(a) + y * math.cos(a)
    return (u / columns) ** 2 + (v / rows) ** 2 <= 1.0


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_an_ellipse_measures_its_two_diameters_perpendicular_at_any_angle(angle: float) -> None:
    axes = measure_axes(ellipse(8.0, 20.0, angle), (0.7, 0.7))
    # Within about a pixel of the true diameters (the outline runs between pixel centres).
    assert axes.long_mm == pytest.approx(2 * 20 * 0.7, abs=1.0)
    assert axes.short_mm == pytest.approx(2 * 8 * 0.7, abs=1.0)
    (a, b), (c, d) = (np.array(p) for p in axes.long), (np.array(p) for p in axes.short)
    long_dir, short_dir = (b - a) / np.linalg.norm(b - a), (d - c) / np.linalg.norm(d - c)
    assert abs(float(long_dir @ short_dir)) < 1e-9
    assert np.linalg.norm((b - a) * 0.7) == pytest.approx(axes.long_mm)
    assert np.linalg.norm((d - c) * 0.7) == pytest.approx(axes.short_mm)


def test_anisotropic_pixels_are_measured_in_mm() -> None:
    # A disc 20 pixels across in rows of 0.5 mm and 1.0 mm columns: 10 mm tall, 20 mm wide.
    y, x = np.mgrid[:64, :64] - 31.5
    region = (x / 10.0) ** 2 + (y / 10.0) ** 2 <= 1.0
    axes = measure_axes(region, (0.5, 1.0))
    assert axes.long_mm == pytest.approx(20.0, abs=1.0)
    assert axes.short_mm == pytest.approx(10.0, abs=0.6)
    (r0, c0), (r1, c1) = axes.long
    assert abs(r1 - r0) * 0.5 < 0.2 * abs(c1 - c0) * 1.0  # the long axis runs along the rows


def test_a_single_pixel_has_axes_of_about_one_pixel() -> None:
    region = np.zeros((5, 5), dtype=bool)
    region[2, 2] = True
    axes = measure_axes(region, (0.8, 0.8))
    assert 0.5 <= axes.short_mm <= axes.long_mm <= 0.8 * math.sqrt(2)


def test_an_empty_region_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        measure_axes(np.zeros((4, 4), dtype=bool), (1.0, 1.0))


def test_scoord_puts_pixel_centres_at_half_pixels() -> None:
    assert scoord(((10.0, 20.0), (11.0, 22.5))).tolist() == [[20.5, 10.5], [23.0, 11.5]]
