"""Long and short axis of a finding on one image, as a radiologist draws them with a caliper.

The long axis is the longest segment between two points of the finding's outline on the image
(its in-plane maximum Feret diameter); the short axis is the longest segment perpendicular to it
that stays within the outline (the bidimensional measurement of RECIST and of Fleischner and
Lung-RADS nodule sizes). Both are measured on the SEG mask's cross-section, so the caliper a
viewer draws from the SR lies on the outline it shows from the SEG.

Points are in pixel index units, (row, column) of pixel centres, measured with the image's
pixel spacing; :func:`scoord` turns them into SCOORD Graphic Data (column, row with 0.0\\0.0 at
the top left corner of the top left pixel, PS3.3 C.18.6.1.1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import ConvexHull, QhullError
from skimage import measure

# skimage is untyped: its contour finder, as this module calls it.
_find_contours: Callable[..., list[NDArray[np.float64]]] = measure.find_contours


@dataclass(frozen=True)
class Axes:
    """Two segments, each ((row, column), (row, column)) in pixel index units, and their
    lengths in mm."""

    long: tuple[tuple[float, float], tuple[float, float]]
    short: tuple[tuple[float, float], tuple[float, float]]
    long_mm: float
    short_mm: float


def measure_axes(mask: NDArray[np.bool_], spacing: tuple[float, float]) -> Axes:
    """The long and short axes of the region ``mask`` (rows, columns) with ``spacing`` (mm
    between rows, mm between columns). ValueError when the mask is empty.

    The outline is the mask's 0.5 iso-contour (between pixel centres, so a one-pixel region is
    a diamond one pixel across, not a point). The long axis is searched on the outline's convex
    hull; the short axis is the longest chord of the outline perpendicular to the long axis.
    """
    if not mask.any():
        raise ValueError("the region is empty on this image: no axes to measure")
    padded = np.pad(mask.astype(np.float32), 1)
    contours = _find_contours(padded, 0.5)
    points = np.concatenate(contours) - 1.0  # back to the unpadded index
    scale = np.array(spacing, dtype=np.float64)
    mm = points * scale
    hull = mm
    with contextlib.suppress(QhullError):  # collinear sets: every point is on the hull
        hull = mm[ConvexHull(mm).vertices]
    d = ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    a, b = hull[i], hull[j]
    long_mm = float(math.sqrt(d[i, j]))
    u = (b - a) / long_mm
    v = np.array([-u[1], u[0]])
    short, short_mm = _short_axis(contours, scale, a, u, v, long_mm)
    return Axes(
        long=(_pixel(a, scale), _pixel(b, scale)),
        short=(_pixel(short[0], scale), _pixel(short[1], scale)),
        long_mm=long_mm,
        short_mm=short_mm,
    )


def _short_axis(
    contours: list[NDArray[np.float64]],
    scale: NDArray[np.float64],
    a: NDArray[np.float64],
    u: NDArray[np.float64],
    v: NDArray[np.float64],
    long_mm: float,
) -> tuple[tuple[NDArray[np.float64], NDArray[np.float64]], float]:
    """The longest chord perpendicular to the long axis (a + t·u): the outline's segments are
    cut by lines a + t·u + s·v at small steps of t; the chord at t runs between the lowest and
    highest crossing s."""
    # Each outline segment as its start and stop point (mm).
    starts = np.concatenate([(c[:-1] - 1.0) * scale for c in contours if len(c) > 1])
    stops = np.concatenate([(c[1:] - 1.0) * scale for c in contours if len(c) > 1])
    t0 = (starts - a) @ u
    t1 = (stops - a) @ u
    s0 = (starts - a) @ v
    s1 = (stops - a) @ v
    step = min(float(scale.min()) / 4.0, long_mm / 8.0)
    best = (a, a)
    best_mm = 0.0
    for t in np.arange(step / 2.0, long_mm, step):
        lo, hi = np.minimum(t0, t1), np.maximum(t0, t1)
        crossing = (lo <= t) & (t <= hi) & (hi > lo)
        if not crossing.any():
            continue
        f = (t - t0[crossing]) / (t1[crossing] - t0[crossing])
        s = s0[crossing] + f * (s1[crossing] - s0[crossing])
        width = float(s.max() - s.min())
        if width > best_mm:
            best_mm = width
            base = a + t * u
            best = (base + float(s.min()) * v, base + float(s.max()) * v)
    if best_mm == 0.0:  # a region one line thick: the short axis is its width across
        width = float(np.abs(v * scale).min())
        mid = a + u * long_mm / 2.0
        best = (mid - v * width / 2.0, mid + v * width / 2.0)
        best_mm = width
    return best, best_mm


def _pixel(point_mm: NDArray[np.float64], scale: NDArray[np.float64]) -> tuple[float, float]:
    row, column = (float(x) for x in point_mm / scale)
    return row, column


def scoord(segment: tuple[tuple[float, float], tuple[float, float]]) -> NDArray[np.float64]:
    """SCOORD Graphic Data (2, 2) of a segment: (column, row) per point, with pixel (r, c)'s
    centre at (c + 0.5, r + 0.5)."""
    return np.array([[c + 0.5, r + 0.5] for r, c in segment], dtype=np.float64)
