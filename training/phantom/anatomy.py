"""Analytic chest anatomy of the synthetic CT phantom.

All coordinates are DICOM patient coordinates (LPS, millimetres): +x towards the patient's left,
+y posterior, +z superior. Each structure is a level function (see :mod:`geometry`), so the same
description answers "is this point in the lung?" for lesion placement and renders an axial slice
with partial-volume edges.

What is modelled, outside in: CT table; skin, subcutaneous fat and chest-wall muscle (thicker
posteriorly: paraspinal muscles); twelve pairs of oblique ribs with cortex, marrow and anterior
costal cartilage; sternum; thoracic spine with vertebral bodies, discs, canal and posterior
elements; mediastinal fat with heart, aorta (ascending, arch, descending), arch branches, superior
vena cava, pulmonary trunk and oesophagus; two lungs with apices, diaphragmatic domes (right higher)
and a gravity-dependent density gradient; upper abdomen under the domes (liver, gastric air).
Airways and the pulmonary vessel trees are built in :mod:`vessels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .geometry import AnyArray, FloatArray, capsule_level, ellipse_level, ellipsoid_level

# Tissue attenuation in Hounsfield units (non-contrast CT).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SKIN = 30.0
HU_MUSCLE = 45.0
HU_BLOOD = 40.0
HU_LIVER = 58.0
HU_SOFT = 35.0
HU_CORTICAL = 900.0
HU_CANCELLOUS = 280.0
HU_CARTILAGE = 120.0
HU_DISC = 85.0
HU_CSF = 12.0
HU_TABLE = 250.0
HU_LUNG_ANTERIOR = -880.0
HU_LUNG_DEPENDENT = -800.0

VERTEBRA_PITCH_MM = 27.0
APEX_CURVATURE = 0.0055  # 1/mm: how fast the lung apex widens downwards
DISC_MM = 5.0


@dataclass(frozen=True)
class Tube:
    """A straight tapered tube (vessel, airway, oesophagus) from ``start`` to ``end`` (mm)."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    r_start: float
    r_end: float

    def level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        axis = np.subtract(self.end, self.start)
        return capsule_level(
            x - self.start[0], y - self.start[1], z - self.start[2], axis, self.r_start, self.r_end
        )

    def slice_box(self, z: float, margin: float) -> tuple[float, float, float, float] | None:
        """In-plane box (x0, x1, y0, y1) of the tube's cut by the plane ``z``, grown by margin."""
        r = max(self.r_start, self.r_end) + margin
        z0, z1 = self.start[2], self.end[2]
        if abs(z1 - z0) < 1e-6:
            if abs(z - z0) > r:
                return None
            t0, t1 = 0.0, 1.0
        else:
            ta, tb = (z - r - z0) / (z1 - z0), (z + r - z0) / (z1 - z0)
            t0, t1 = max(min(ta, tb), 0.0), min(max(ta, tb), 1.0)
            if t0 > t1:
                return None
        xs = [self.start[0] + t * (self.end[0] - self.start[0]) for t in (t0, t1)]
        ys = [self.start[1] + t * (self.end[1] - self.start[1]) for t in (t0, t1)]
        return min(xs) - r, max(xs) + r, min(ys) - r, max(ys) + r

    def z_range(self) -> tuple[float, float]:
        r = max(self.r_start, self.r_end)
        return min(self.start[2], self.end[2]) - r, max(self.start[2], self.end[2]) + r


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, sampled by :meth:`sample`; all lengths in mm."""

    body_a: float  # lateral semi-axis of the body outline
    body_b_ant: float  # anterior semi-axis
    body_b_post: float  # posterior semi-axis (flattened on the table)
    skin: float
    fat: float
    muscle_lat: float
    muscle_ant: float
    muscle_post: float
    rib_band: float  # radial thickness of the rib layer
    rib_height: float  # cranio-caudal half-height of a rib
    rib_drop: tuple[float, ...]  # how far each rib descends from its head to its anterior end
    rib_z0: tuple[float, ...]  # z of each rib head
    rib_reach: tuple[float, ...]  # anterior extent of each rib's bone, fraction of the half-turn
    z_apex: float
    lung_height: float
    col_x: float  # mediastinal column centre and half-width
    col_half_width: float
    spine_radius: float
    heart_center: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_rotation: NDArray[np.float64] = field(repr=False)
    dome_height_right: float = 65.0
    dome_height_left: float = 50.0
    tubes: tuple[Tube, ...] = ()  # great vessels and oesophagus, rendered as soft tissue
    table_gap: float = 3.0

    # ----------------------------------------------------------------------------------- setup
    @classmethod
    def sample(cls, rng: np.random.Generator, z_apex: float = 0.0) -> Anatomy:
        """Draw a plausible adult chest."""
        body_a = float(rng.uniform(140.0, 178.0))
        body_b_ant = float(rng.uniform(0.62, 0.74) * body_a)
        body_b_post = 0.93 * body_b_ant
        lung_height = float(rng.uniform(235.0, 290.0))
        n_ribs = 12
        rib_z_top = z_apex + rng.uniform(5.0, 15.0)
        pitch = lung_height * 0.86 / (n_ribs - 1)
        rib_z0 = tuple(float(rib_z_top - i * pitch) for i in range(n_ribs))
        rib_drop = tuple(float(rng.uniform(35.0, 50.0) + 2.5 * i) for i in range(n_ribs))
        reach = [0.70] * 7 + [0.62, 0.55, 0.50, 0.42, 0.34]
        rib_reach = tuple(float(v + rng.uniform(-0.03, 0.03)) for v in reach)

        spine_radius = float(rng.uniform(15.5, 19.0))
        z_heart = z_apex - 0.70 * lung_height
        heart_axes = (
            float(rng.uniform(52.0, 60.0)),
            float(rng.uniform(39.0, 46.0)),
            float(rng.uniform(45.0, 54.0)),
        )
        yaw = float(np.deg2rad(rng.uniform(-40.0, -25.0)))
        rot = np.array(
            [[np.cos(yaw), np.sin(yaw), 0.0], [-np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]]
        )
        heart_center = (
            float(rng.uniform(15.0, 25.0)),
            float(-0.12 * body_b_ant),
            float(z_heart),
        )
        anatomy = cls(
            body_a=body_a,
            body_b_ant=body_b_ant,
            body_b_post=body_b_post,
            skin=float(rng.uniform(1.5, 2.5)),
            fat=float(rng.uniform(6.0, 22.0)),
            muscle_lat=float(rng.uniform(7.0, 11.0)),
            muscle_ant=float(rng.uniform(10.0, 16.0)),
            muscle_post=float(rng.uniform(30.0, 42.0)),
            rib_band=float(rng.uniform(6.0, 8.0)),
            rib_height=float(rng.uniform(5.0, 6.5)),
            rib_drop=rib_drop,
            rib_z0=rib_z0,
            rib_reach=rib_reach,
            z_apex=z_apex,
            lung_height=lung_height,
            col_x=float(rng.uniform(-2.0, 6.0)),
            col_half_width=float(rng.uniform(9.0, 13.0)),
            spine_radius=spine_radius,
            heart_center=heart_center,
            heart_axes=heart_axes,
            heart_rotation=rot,
            dome_height_right=float(rng.uniform(55.0, 75.0)),
            dome_height_left=0.0,
        )
        dome_left = anatomy.dome_height_right - float(rng.uniform(10.0, 25.0))
        return anatomy._with(dome_height_left=dome_left, tubes=anatomy._great_vessels(rng))

    def _with(self, **changes: object) -> Anatomy:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(changes)
        return Anatomy(**values)

    # ----------------------------------------------------------------------------- landmarks
    def u(self, z: AnyArray | float) -> AnyArray | float:
        """Normalised height: 0 at the lung apex, 1 at the lowest lung base."""
        return (self.z_apex - z) / self.lung_height

    def z_at(self, u: float) -> float:
        return self.z_apex - u * self.lung_height

    @property
    def wall_post(self) -> float:
        return self.skin + self.fat + self.muscle_post + self.rib_band + 1.0

    def body_scale(self, z: AnyArray | float) -> AnyArray | float:
        """Body outline scale: narrower at the thoracic inlet, full from the upper chest down."""
        u = self.u(z)
        t = np.clip((np.asarray(u) + 0.3) / 0.5, 0.0, 1.0)
        return 0.80 + 0.20 * t * t * (3.0 - 2.0 * t)

    @property
    def spine_center_y(self) -> float:
        return self.body_b_post - self.wall_post - 0.8 * self.spine_radius

    @property
    def trachea_y(self) -> float:
        return self.spine_center_y - self.spine_radius - 20.0

    @property
    def z_base(self) -> float:
        return self.z_apex - self.lung_height

    def hilum(self, side: int) -> tuple[float, float, float]:
        """Where the main bronchus and pulmonary artery enter a lung (side -1 right, +1 left)."""
        x = side * (self.col_half_width + 28.0) + self.col_x
        return (x, self.trachea_y + 12.0, self.z_at(0.42))

    def carina(self) -> tuple[float, float, float]:
        return (self.col_x, self.trachea_y, self.z_at(0.33))

    def pulmonary_bifurcation(self) -> tuple[float, float, float]:
        """Where the pulmonary trunk divides into the right and left pulmonary arteries."""
        return (self.col_x + 8.0, self.trachea_y - 8.0, self.z_at(0.40))

    def left_atrium(self) -> tuple[float, float, float]:
        """Where the pulmonary veins drain (the posterior, upper part of the heart)."""
        c = self.heart_center
        return (c[0] - 8.0, c[1] + 0.55 * self.heart_axes[1], c[2] + 18.0)

    def _great_vessels(self, rng: np.random.Generator) -> tuple[Tube, ...]:
        hz = self.heart_center[2]
        ha = self.heart_axes[2]
        ys = self.spine_center_y
        rs = self.spine_radius
        z_arch = self.z_at(0.22)
        jitter = rng.uniform(-3.0, 3.0, size=3)
        asc_top = (-8.0 + jitter[0], -0.25 * self.body_b_ant, z_arch)
        arch_back = (20.0 + jitter[1], ys - rs - 10.0, z_arch - 3.0)
        desc_top = (22.0 + jitter[2], ys - rs * 0.4, z_arch - 15.0)
        desc_bottom = (8.0, ys - rs - 6.0, self.z_base - 120.0)
        heart_top = (self.heart_center[0] - 30.0, self.heart_center[1] - 10.0, hz + 0.55 * ha)
        top = self.z_apex + 200.0
        pa_root = (self.heart_center[0] - 5.0, self.heart_center[1] - 15.0, hz + 0.6 * ha)
        pa_bif = self.pulmonary_bifurcation()
        return (
            Tube(heart_top, asc_top, 14.0, 13.0),  # ascending aorta
            Tube(asc_top, arch_back, 12.5, 12.0),  # arch
            Tube(arch_back, desc_top, 12.0, 11.5),  # arch to descending
            Tube(desc_top, desc_bottom, 11.5, 10.5),  # descending aorta
            Tube(asc_top, (-12.0, asc_top[1] + 10.0, top), 6.5, 6.0),  # brachiocephalic
            Tube((4.0, asc_top[1] + 20.0, z_arch), (10.0, asc_top[1] + 22.0, top), 4.5, 4.5),
            Tube((12.0, ys - rs - 20.0, z_arch), (22.0, ys - rs - 18.0, top), 5.0, 5.0),
            Tube((-30.0, -0.15 * self.body_b_ant, top), (-28.0, -5.0, hz + 0.3 * ha), 9.5, 10.0),
            Tube(pa_root, pa_bif, 13.0, 12.0),  # pulmonary trunk
            Tube(
                (self.col_x + 6.0, ys - rs - 6.0, top),
                (self.col_x + 4.0, ys - rs - 6.0, self.z_base - 60.0),
                7.0,
                7.0,
            ),  # oesophagus
        )

    # ------------------------------------------------------------------------ level functions
    def _body_geometry(
        self, x: AnyArray, y: AnyArray, z: AnyArray | float
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        return self.body_geometry_scaled(x, y, self.body_scale(z))

    def body_geometry_scaled(
        self, x: AnyArray, y: AnyArray, scale: AnyArray | float
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Body level and the outward direction components (cos to +x, cos to +y)."""
        # The thoracic inlet narrows mostly from the sides; the spine keeps the back in place.
        b = np.where(y > 0, self.body_b_post, self.body_b_ant) * (0.7 + 0.3 * scale)
        g = ellipse_level(x, y, self.body_a * scale, b)  # type: ignore[arg-type]
        r = np.sqrt(x * x + y * y) + 1e-6
        return g, np.asarray(x / r, dtype=np.float32), np.asarray(y / r, dtype=np.float32)

    def wall(self, cx: AnyArray, cy: AnyArray) -> tuple[FloatArray, ...]:
        """Fat, muscle and total wall thickness towards the direction (cx, cy)."""
        post = np.maximum(cy, 0.0) ** 2
        ant = np.maximum(-cy, 0.0) ** 2
        fat = self.fat * (1.0 + 0.35 * cx * cx)
        muscle = (
            self.muscle_lat
            + (self.muscle_post - self.muscle_lat) * post
            + (self.muscle_ant - self.muscle_lat) * ant
        )
        total = self.skin + fat + muscle + self.rib_band + 1.0
        return (
            np.asarray(fat, dtype=np.float32),
            np.asarray(muscle, dtype=np.float32),
            np.asarray(total, dtype=np.float32),
        )

    def dome_z(self, x: AnyArray, y: AnyArray) -> FloatArray:
        """Height of the diaphragm under (x, y): two domes, the right one higher."""
        right = np.clip(1.0 - ((x + 65.0) / 95.0) ** 2 - ((y + 5.0) / 85.0) ** 2, 0.0, None)
        left = np.clip(1.0 - ((x - 70.0) / 90.0) ** 2 - ((y + 5.0) / 80.0) ** 2, 0.0, None)
        peak = np.maximum(self.dome_height_right * right, self.dome_height_left * left)
        return np.asarray(self.z_base + peak, dtype=np.float32)

    def _dome_level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        """Positive below the diaphragm (abdomen), negative above it."""
        return np.asarray(self.dome_z(x, y) - z, dtype=np.float32)

    def apex_z(self, x: AnyArray, y: AnyArray) -> FloatArray:
        """Top of the lung above (x, y): paraboloid apices, one per lung."""
        ax = np.abs(x - self.col_x) - (self.col_half_width + 45.0)
        rr = ax * ax + (y - 0.15 * self.body_b_post) ** 2
        return np.asarray(self.z_apex - APEX_CURVATURE * rr, dtype=np.float32)

    def _apex_level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        """Positive above the lung apices."""
        return np.asarray(z - self.apex_z(x, y), dtype=np.float32)

    def spine_level(self, x: AnyArray, y: AnyArray) -> FloatArray:
        return np.asarray(
            np.sqrt(x * x + (y - self.spine_center_y) ** 2) - self.spine_radius, dtype=np.float32
        )

    def heart_box(self, z: float) -> tuple[float, float, float, float] | None:
        """In-plane box (x0, x1, y0, y1) of the heart at ``z``, or None where it is absent."""
        if abs(z - self.heart_center[2]) > max(self.heart_axes) + 1.0:
            return None
        r = max(self.heart_axes) + 1.0
        cx, cy, _ = self.heart_center
        return cx - r, cx + r, cy - r, cy + r

    def _heart_level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        c = self.heart_center
        return ellipsoid_level(x - c[0], y - c[1], z - c[2], self.heart_rotation, self.heart_axes)

    def _heart_present(self, z: float) -> bool:
        return abs(z - self.heart_center[2]) < max(self.heart_axes) + 12.0

    def mediastinum_level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        """Mediastinum (and paravertebral tissue) that the lungs wrap around."""
        g = np.abs(x - self.col_x) - self.col_half_width
        scalar_z = np.ndim(z) == 0
        if not scalar_z or self._heart_present(float(z)):
            g = np.minimum(g, self._heart_level(x, y, z) - 8.0)
        for tube in self.tubes:
            lo, hi = tube.z_range()
            if scalar_z and not lo - 6.0 <= float(z) <= hi + 6.0:
                continue
            g = np.minimum(g, tube.level(x, y, z) - 5.0)
        return np.asarray(np.minimum(g, self.spine_level(x, y) - 4.0), dtype=np.float32)

    def cavity_level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        g_body, cx, cy = self._body_geometry(x, y, z)
        _, _, total = self.wall(cx, cy)
        return np.asarray(g_body + total, dtype=np.float32)

    def lung_level(self, x: AnyArray, y: AnyArray, z: AnyArray | float) -> FloatArray:
        """Negative inside either lung (≈ signed distance to the pleura, mm)."""
        g = self.cavity_level(x, y, z)
        g = np.maximum(g, -self.mediastinum_level(x, y, z))
        g = np.maximum(g, self._dome_level(x, y, z))
        g = np.maximum(g, self._apex_level(x, y, z))
        return np.asarray(g, dtype=np.float32)

    def in_lung(self, points: AnyArray, margin: float = 0.0) -> NDArray[np.bool_]:
        """True for points (N, 3) at least ``margin`` mm inside a lung."""
        p = np.asarray(points, dtype=np.float64)
        return np.asarray(self.lung_level(p[:, 0], p[:, 1], p[:, 2]) < -margin)

    def lung_bounds(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """A box (mm) that contains both lungs."""
        lo = np.array([-self.body_a, -self.body_b_ant, self.z_base - 1.0])
        hi = np.array([self.body_a, self.body_b_post, self.z_apex + 1.0])
        return lo, hi
