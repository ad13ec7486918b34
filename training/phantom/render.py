"""Renders slabs of the phantom volume: anatomy, vessel and airway trees, nodules, CT noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from . import anatomy as an
from .geometry import AnyArray, FloatArray, capsule_level, paint, ramp
from .nodules import Nodule, Primitive, shape_bounds, shape_level
from .slices import SliceRenderer
from .vessels import Segments, Trees

HU_BRONCHIAL_WALL = 20.0


@dataclass(frozen=True)
class Grid:
    """The scanned grid: pixel centres in patient mm (axial slices, rows along +y)."""

    x0: float  # x of column 0
    y0: float  # y of row 0
    spacing: float  # in-plane pixel spacing
    columns: int
    rows: int
    z: NDArray[np.float64]  # slice centres, one per slice, in writing order
    thickness: float

    @property
    def x(self) -> NDArray[np.float64]:
        return np.asarray(self.x0 + self.spacing * np.arange(self.columns), dtype=np.float64)

    @property
    def y(self) -> NDArray[np.float64]:
        return np.asarray(self.y0 + self.spacing * np.arange(self.rows), dtype=np.float64)

    def z_offsets(self) -> NDArray[np.float64]:
        """Sub-slice sample offsets that integrate over the slice thickness (partial volume)."""
        n = int(np.clip(np.ceil(self.thickness / self.spacing - 0.25), 1, 4))
        return ((np.arange(n) + 0.5) / n - 0.5) * self.thickness

    def pixel_index(self, point: AnyArray) -> tuple[int, int, int]:
        """(slice, row, column) of the voxel whose centre is nearest to ``point`` (mm)."""
        k = int(np.argmin(np.abs(self.z - point[2])))
        row = round((point[1] - self.y0) / self.spacing)
        col = round((point[0] - self.x0) / self.spacing)
        return k, row, col


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel: noise level and texture, and edge sharpness."""

    name: str
    noise_hu: float  # standard deviation of the noise in soft tissue
    edge_pixels: float  # width of an edge, in pixels
    smoothing: float  # 0 = white noise, 1 = strongly correlated (soft kernel texture)


KERNELS = {
    "STANDARD": Kernel("STANDARD", noise_hu=14.0, edge_pixels=1.3, smoothing=1.0),
    "LUNG": Kernel("LUNG", noise_hu=38.0, edge_pixels=0.8, smoothing=0.45),
}


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any slab; small enough to send to worker processes."""

    anatomy: an.Anatomy
    trees: Trees
    nodules: tuple[Nodule, ...]
    grid: Grid
    kernel: Kernel
    seed: int


def render_slab(
    scene: Scene, k0: int, k1: int, with_labels: bool = False
) -> tuple[FloatArray, NDArray[np.uint8] | None]:
    """HU values (k1-k0, rows, columns) of slices k0..k1-1, noise included, and nodule labels."""
    grid = scene.grid
    edge = scene.kernel.edge_pixels * grid.spacing
    renderer = SliceRenderer(scene.anatomy, grid.x, grid.y, edge)
    hu = np.empty((k1 - k0, grid.rows, grid.columns), dtype=np.float32)
    for i, k in enumerate(range(k0, k1)):
        hu[i] = renderer.render(float(grid.z[k]))[0]
    painter = _SlabPainter(grid, k0, k1, edge)
    labels = np.zeros(hu.shape, dtype=np.uint8) if with_labels else None

    outer = [painter.shape_fraction(n.outer) for n in scene.nodules]
    # Ground glass first, so that vessels and airways stay visible through it.
    for n, shape in zip(scene.nodules, outer, strict=True):
        if n.density != "solid" and shape is not None:
            paint(hu[shape[0]], shape[1], n.outer_hu)
    painter.paint_tubes(hu, scene.trees.vessels, an.HU_BLOOD)
    painter.paint_tubes(hu, scene.trees.airway_wall, HU_BRONCHIAL_WALL)
    painter.paint_tubes(hu, scene.trees.airway_lumen, an.HU_AIR)
    for index, (n, shape) in enumerate(zip(scene.nodules, outer, strict=True), start=1):
        if shape is None:
            continue
        box, fraction = shape
        if n.density == "solid":
            paint(hu[box], fraction, n.outer_hu)
        core = painter.shape_fraction(n.core) if n.core else None
        if core is not None:
            paint(hu[core[0]], core[1], n.core_hu)
        if labels is not None:
            labels[box][fraction >= 0.5] = index
    for i, k in enumerate(range(k0, k1)):
        add_noise(hu[i], scene.kernel, np.random.default_rng([scene.seed, 7919, k]))
    return hu, labels


def add_noise(img: FloatArray, kernel: Kernel, rng: np.random.Generator) -> None:
    """Add CT noise in place: Gaussian, spatially correlated by a small smoothing filter."""
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    if kernel.smoothing > 0:
        # Separable [1 2 1]/4 filter along rows and columns gives the blotchy texture of soft
        # kernels; mixing with white noise keeps some high frequencies for sharp kernels.
        smooth = noise * 0.5
        smooth[1:, :] += noise[:-1, :] * 0.25
        smooth[:-1, :] += noise[1:, :] * 0.25
        out = smooth * 0.5
        out[:, 1:] += smooth[:, :-1] * 0.25
        out[:, :-1] += smooth[:, 1:] * 0.25
        out *= np.float32(1.0 / 0.375)  # back to unit variance
        w = kernel.smoothing
        noise = out * np.float32(w) + noise * np.float32(np.sqrt(max(0.0, 1.0 - w * w)))
    img += noise * np.float32(kernel.noise_hu)


class _SlabPainter:
    """Paints 3D objects into a slab, each only inside its own bounding box."""

    def __init__(self, grid: Grid, k0: int, k1: int, edge: float) -> None:
        self.grid = grid
        self.k0, self.k1 = k0, k1
        self.edge = edge
        self.offsets = grid.z_offsets()
        self.z = grid.z[k0:k1]
        self.half = grid.thickness / 2.0

    def _box(self, lo: AnyArray, hi: AnyArray) -> tuple[slice, slice, slice] | None:
        g = self.grid
        pad = self.edge
        c0 = max(int(np.floor((lo[0] - pad - g.x0) / g.spacing)), 0)
        c1 = min(int(np.ceil((hi[0] + pad - g.x0) / g.spacing)) + 1, g.columns)
        r0 = max(int(np.floor((lo[1] - pad - g.y0) / g.spacing)), 0)
        r1 = min(int(np.ceil((hi[1] + pad - g.y0) / g.spacing)) + 1, g.rows)
        ks = np.nonzero((self.z + self.half >= lo[2]) & (self.z - self.half <= hi[2]))[0]
        if c0 >= c1 or r0 >= r1 or ks.size == 0:
            return None
        return slice(int(ks[0]), int(ks[-1]) + 1), slice(r0, r1), slice(c0, c1)

    def _coords(self, box: tuple[slice, slice, slice]) -> tuple[FloatArray, FloatArray, FloatArray]:
        g = self.grid
        ks, rs, cs = box
        x = (g.x0 + g.spacing * np.arange(cs.start, cs.stop)).astype(np.float32)[None, None, :]
        y = (g.y0 + g.spacing * np.arange(rs.start, rs.stop)).astype(np.float32)[None, :, None]
        z = (self.z[ks][:, None] + self.offsets[None, :]).astype(np.float32).reshape(-1, 1, 1)
        return x, y, z

    def _fraction(self, level: FloatArray, nslices: int) -> FloatArray:
        f = ramp(level, self.edge)
        shape = (nslices, len(self.offsets), *f.shape[1:])
        return np.asarray(f.reshape(shape).mean(axis=1), dtype=np.float32)

    def shape_fraction(
        self, prims: tuple[Primitive, ...]
    ) -> tuple[tuple[slice, slice, slice], FloatArray] | None:
        """Box of the slab that a union of primitives touches, and its fraction there."""
        lo, hi = shape_bounds(prims)
        box = self._box(lo, hi)
        if box is None:
            return None
        x, y, z = self._coords(box)
        return box, self._fraction(shape_level(prims, x, y, z), box[0].stop - box[0].start)

    def paint_tubes(self, hu: FloatArray, segments: Segments, value: float) -> None:
        """Paint the union of tapered segments (max of their fractions) with one HU value."""
        if len(segments) == 0:
            return
        r = np.maximum(segments.r0, segments.r1)[:, None]
        lo = np.minimum(segments.start, segments.end) - r
        hi = np.maximum(segments.start, segments.end) + r
        z_lo = float(self.z.min()) - self.half
        z_hi = float(self.z.max()) + self.half
        live = np.nonzero((hi[:, 2] >= z_lo) & (lo[:, 2] <= z_hi) & (r[:, 0] > 0.05))[0]
        if live.size == 0:
            return
        frac = np.zeros(hu.shape, dtype=np.float32)
        for i in live:
            box = self._box(lo[i], hi[i])
            if box is None:
                continue
            x, y, z = self._coords(box)
            s = segments.start[i]
            level = capsule_level(
                x - np.float32(s[0]),
                y - np.float32(s[1]),
                z - np.float32(s[2]),
                segments.end[i] - s,
                float(segments.r0[i]),
                float(segments.r1[i]),
            )
            f = self._fraction(level, box[0].stop - box[0].start)
            np.maximum(frac[box], f, out=frac[box])
        paint(hu, frac, value)
