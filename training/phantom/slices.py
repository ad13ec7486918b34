"""Renders the phantom's anatomy slice by slice, fast.

Most of the chest wall does not change from one slice to the next (the body outline only narrows
towards the thoracic inlet), so the wall is computed once per body scale and reused; small
structures (heart, great vessels, spine, sternum) are evaluated only inside their own boxes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from . import anatomy as an
from .geometry import AnyArray, FloatArray, ellipsoid_level, paint, ramp

_FAR = np.float32(1e4)
Box = tuple[float, float, float, float]
_LevelFn = Callable[[FloatArray, FloatArray], FloatArray]


@dataclass
class _Wall:
    """Everything about one body scale that does not depend on z."""

    base: FloatArray  # table, skin, fat, muscle and cavity fat, cropped
    g_cav: FloatArray  # cavity level, cropped
    depth: FloatArray  # depth below the outer rib surface, cropped
    band: tuple[NDArray[np.intp], NDArray[np.intp]]  # pixels of the rib layer
    band_alpha: FloatArray  # angle from posterior (0) to anterior (1) of those pixels
    band_radial: FloatArray  # radial level of the rib layer at those pixels


class SliceRenderer:
    """Axial slices of one :class:`~.anatomy.Anatomy` on one pixel grid."""

    def __init__(self, anatomy: an.Anatomy, x: AnyArray, y: AnyArray, edge: float) -> None:
        """``x`` (nx,) and ``y`` (ny,) are pixel-centre coordinates in patient mm."""
        self.anatomy = anatomy
        self.edge = edge
        self.shape = (y.size, x.size)
        a = anatomy
        # Crop to the body and the table: everything else is air.
        margin = 4.0 * edge + 2.0
        self.sx = _index_range(x, -a.body_a - margin, a.body_a + margin)
        self.sy = _index_range(y, -a.body_b_ant - margin, a.body_b_post + a.table_gap + 8.0)
        self.x = np.asarray(x[self.sx], dtype=np.float32)[None, :]
        self.y = np.asarray(y[self.sy], dtype=np.float32)[:, None]
        self.dome_z = a.dome_z(self.x, self.y)
        self.apex_z = a.apex_z(self.x, self.y)
        self.column = np.asarray(np.abs(self.x - a.col_x) - a.col_half_width, dtype=np.float32)
        self.spine = a.spine_level(self.x, self.y) - np.float32(4.0)
        depth = np.clip((self.y + a.body_b_ant) / (a.body_b_ant + a.body_b_post), 0.0, 1.0).astype(
            np.float32
        )
        self.lung_hu = np.asarray(
            an.HU_LUNG_ANTERIOR + (an.HU_LUNG_DEPENDENT - an.HU_LUNG_ANTERIOR) * depth**1.5,
            dtype=np.float32,
        )
        self._walls: OrderedDict[float, _Wall] = OrderedDict()

    # ------------------------------------------------------------------------------- public
    def render(self, z: float) -> tuple[FloatArray, FloatArray]:
        """HU image of the slice at ``z`` and its lung fraction, both full size."""
        a, edge = self.anatomy, self.edge
        x = self.x
        wall = self._wall(round(float(a.body_scale(z)), 3))
        img = wall.base.copy()
        self._paint_ribs(img, wall, z)
        self._paint_sternum(img, wall, z)

        u = float(a.u(z))
        apex_level = np.float32(z) - self.apex_z
        if u < 0.05:  # thoracic inlet and neck: muscles and glands rather than fat
            paint(img, ramp(np.maximum(wall.g_cav, -apex_level), 4.0), an.HU_SOFT)
        dome_level = self.dome_z - np.float32(z)
        if u > 0.6:
            abdomen = ramp(np.maximum(wall.g_cav, -dome_level), edge)
            liver = np.where(x < 25.0, an.HU_LIVER, an.HU_SOFT + 5.0).astype(np.float32)
            paint(img, abdomen, liver)
            self._paint_gastric_air(img, z, abdomen)
        self._paint_spine(img, z)

        soft = self._soft_tissue_level(z)  # heart and great vessels
        paint(img, ramp(soft, edge), an.HU_BLOOD)
        mediastinum = np.minimum(np.minimum(self.column, self.spine), soft - np.float32(5.0))
        g_lung = np.maximum(wall.g_cav, -mediastinum)
        np.maximum(g_lung, dome_level, out=g_lung)
        np.maximum(g_lung, apex_level, out=g_lung)
        lung = ramp(g_lung, edge)
        paint(img, lung, self.lung_hu)

        full = np.full(self.shape, an.HU_AIR, dtype=np.float32)
        full_lung = np.zeros(self.shape, dtype=np.float32)
        full[self.sy, self.sx] = img
        full_lung[self.sy, self.sx] = lung
        return full, full_lung

    # ------------------------------------------------------------------------------ helpers
    def _box(self, box: Box) -> tuple[slice, slice] | None:
        sx = _index_range(self.x[0], box[0], box[1])
        sy = _index_range(self.y[:, 0], box[2], box[3])
        if sx.stop <= sx.start or sy.stop <= sy.start:
            return None
        return sy, sx

    def _boxed(self, box: Box | None, out: FloatArray, fn: _LevelFn) -> None:
        """``out = min(out, fn(x, y))`` evaluated only inside ``box``."""
        if box is None:
            return
        idx = self._box(box)
        if idx is None:
            return
        sy, sx = idx
        np.minimum(out[sy, sx], fn(self.x[:, sx], self.y[sy, :]), out=out[sy, sx])

    def _wall(self, scale: float) -> _Wall:
        cached = self._walls.get(scale)
        if cached is not None:
            self._walls.move_to_end(scale)
            return cached
        a, edge, x, y = self.anatomy, self.edge, self.x, self.y
        base = np.full((y.shape[0], x.shape[1]), an.HU_AIR, dtype=np.float32)
        curve = a.body_b_post + a.table_gap - 0.0009 * x * x
        table = np.maximum(np.abs(y - curve - 3.0) - 3.0, np.abs(x) - 230.0)
        paint(base, ramp(table, edge), an.HU_TABLE)
        g_body, cx, cy = a.body_geometry_scaled(x, y, scale)
        fat, muscle, total = a.wall(cx, cy)
        paint(base, ramp(g_body, edge), an.HU_SKIN)
        paint(base, ramp(g_body + a.skin, edge), an.HU_FAT)
        paint(base, ramp(g_body + a.skin + fat, edge), an.HU_MUSCLE)
        g_cav = g_body + total
        depth = -g_body - (a.skin + fat + muscle)
        band = np.nonzero((depth > -2.0) & (depth < a.rib_band + 2.0))
        d = depth[band]
        wall = _Wall(
            base=base,
            g_cav=g_cav,
            depth=depth,
            band=(band[0], band[1]),
            band_alpha=np.asarray(np.arctan2(np.abs(cx[band]), cy[band]) / np.pi, np.float32),
            band_radial=np.abs(d - 0.5 * a.rib_band) - np.float32(0.5 * a.rib_band),
        )
        paint(base, ramp(g_cav, edge), an.HU_FAT)  # after the rib layer is known: cavity fat
        self._walls[scale] = wall
        if len(self._walls) > 4:
            self._walls.popitem(last=False)
        return wall

    def _paint_ribs(self, img: FloatArray, wall: _Wall, z: float) -> None:
        a = self.anatomy
        alpha, radial = wall.band_alpha, wall.band_radial
        if alpha.size == 0:
            return
        g_bone = np.full(alpha.shape, _FAR, dtype=np.float32)
        g_cart = np.full(alpha.shape, _FAR, dtype=np.float32)
        phi = np.clip((alpha - 0.1) / 0.82, 0.0, 1.0)
        for z0, drop, reach in zip(a.rib_z0, a.rib_drop, a.rib_reach, strict=True):
            if not z0 - drop - 15.0 < z < z0 + 15.0:
                continue
            z_rib = z0 - drop * phi**1.3 + 4.0 * np.sin(np.pi * phi)
            g = np.maximum(np.abs(z - z_rib) - a.rib_height, radial)
            g = np.maximum(g, 0.1 - alpha)
            np.minimum(g_bone, np.maximum(g, (phi - reach) * 160.0), out=g_bone)
            cart = np.maximum(g, (reach - phi) * 160.0)
            np.minimum(g_cart, np.maximum(cart, (alpha - 0.9) * 200.0), out=g_cart)
        if not np.any(g_bone < self.edge) and not np.any(g_cart < self.edge):
            return
        sub = img[wall.band]
        paint(sub, ramp(g_cart, self.edge), an.HU_CARTILAGE)
        paint(sub, ramp(g_bone, self.edge), an.HU_CORTICAL)
        paint(sub, ramp(g_bone + 1.3, self.edge), an.HU_CANCELLOUS)
        img[wall.band] = sub

    def _paint_sternum(self, img: FloatArray, wall: _Wall, z: float) -> None:
        a = self.anatomy
        u = float(a.u(z))
        if not 0.05 < u < 0.75:
            return
        idx = self._box((a.col_x * 0.5 - 20.0, a.col_x * 0.5 + 20.0, -a.body_b_ant, 0.0))
        if idx is None:
            return
        sy, sx = idx
        half_width = 14.0 if u < 0.2 else 11.0
        depth = wall.depth[sy, sx]
        g = np.maximum(
            np.abs(self.x[:, sx] - a.col_x * 0.5) - half_width, np.abs(depth - 5.0) - 5.0
        )
        sub = img[sy, sx]
        paint(sub, ramp(g, self.edge), an.HU_CORTICAL)
        paint(sub, ramp(g + 1.5, self.edge), an.HU_CANCELLOUS)

    def _paint_spine(self, img: FloatArray, z: float) -> None:
        a, edge = self.anatomy, self.edge
        ys, rs = a.spine_center_y, a.spine_radius
        canal_y = ys + rs + 8.0
        idx = self._box((-36.0, 36.0, ys - rs - 3.0, canal_y + 44.0))
        if idx is None:
            return
        sy, sx = idx
        x, y = self.x[:, sx], self.y[sy, :]
        sub = img[sy, sx]
        phase = (a.rib_z0[0] + 8.0 - z) % an.VERTEBRA_PITCH_MM
        in_disc = phase < an.DISC_MM
        body = self.spine[sy, sx] + np.float32(4.0)
        if in_disc:
            paint(sub, ramp(body, edge), an.HU_DISC)
        else:
            paint(sub, ramp(body, edge), an.HU_CORTICAL)
            paint(sub, ramp(body + 1.5, edge), an.HU_CANCELLOUS)
        canal = np.sqrt(x * x + (y - canal_y) ** 2) - 7.5
        if not in_disc or phase > 2.0:
            ring = np.maximum(canal - 4.0, -canal)
            spinous = np.maximum(np.abs(x) - 3.5, np.abs(y - (canal_y + 24.0)) - 16.0)
            transverse = np.maximum(
                np.abs(np.abs(x) - 20.0) - 12.0, np.abs(y - canal_y + 2.0) - 4.0
            )
            posterior = np.minimum(np.minimum(ring, spinous), transverse)
            paint(sub, ramp(posterior, edge), an.HU_CORTICAL)
            paint(sub, ramp(posterior + 1.2, edge), an.HU_CANCELLOUS)
        paint(sub, ramp(canal, edge), an.HU_CSF + 15.0)
        paint(sub, ramp(canal + 2.5, edge), an.HU_CSF)

    def _soft_tissue_level(self, z: float) -> FloatArray:
        a = self.anatomy
        out = np.full((self.y.shape[0], self.x.shape[1]), _FAR, dtype=np.float32)
        zz = float(z)
        c = a.heart_center

        def heart(x: FloatArray, y: FloatArray) -> FloatArray:
            return ellipsoid_level(x - c[0], y - c[1], zz - c[2], a.heart_rotation, a.heart_axes)

        self._boxed(a.heart_box(z), out, heart)
        for tube in a.tubes:

            def level(x: FloatArray, y: FloatArray, t: an.Tube = tube) -> FloatArray:
                return t.level(x, y, zz)

            self._boxed(tube.slice_box(z, 6.0 + self.edge), out, level)
        return out

    def _paint_gastric_air(self, img: FloatArray, z: float, abdomen: FloatArray) -> None:
        a = self.anatomy
        c = (75.0, -15.0, a.z_base + a.dome_height_left - 28.0)
        if abs(z - c[2]) > 18.0:
            return
        g = ellipsoid_level(
            self.x - c[0], self.y - c[1], float(z - c[2]), np.eye(3), (34.0, 30.0, 18.0)
        )
        paint(img, ramp(g, self.edge) * abdomen, an.HU_AIR)


def _index_range(coords: AnyArray, lo: float, hi: float) -> slice:
    """Indices of the increasing 1D ``coords`` that lie in [lo, hi]."""
    c = np.asarray(coords).ravel()
    return slice(int(np.searchsorted(c, lo)), int(np.searchsorted(c, hi, side="right")))
