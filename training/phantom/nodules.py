"""Lung nodules of the phantom: size, density, margin and location as radiologists classify them.

- Density: solid (soft tissue), ground-glass (hazy, about -600 HU, vessels stay visible through
  it) and part-solid (ground glass with a solid core).
- Margin: smooth (an ellipsoid), lobulated (a core with bulging lobes) and spiculated (a core with
  thin tapering strands radiating out).
- Location: isolated (in the parenchyma, clear of vessels thicker than 1 mm), juxtavascular
  (touching a vessel, the hard case for detectors and for segmentation) and juxtapleural (based
  on the pleura, merging with the chest wall, the mediastinum or the diaphragm).

Each nodule is a union of primitives (:class:`Ellipsoid`, :class:`Capsule`) whose level
function is the minimum of theirs. The reported diameter is the longest extent of the nodule body
(spicules excluded, as radiologists measure it) and the volume includes the spicules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from .anatomy import Anatomy
from .errors import PlacementError
from .geometry import (
    AnyArray,
    capsule_level,
    ellipsoid_level,
    fibonacci_sphere,
    random_unit_vectors,
    rotation_matrix,
)
from .vessels import Segments

Vec = NDArray[np.float64]
Density = Literal["solid", "part-solid", "ground-glass"]
Location = Literal["isolated", "juxtavascular", "juxtapleural"]
Margin = Literal["smooth", "lobulated", "spiculated"]
_T = TypeVar("_T")

DENSITIES: tuple[Density, ...] = ("solid", "part-solid", "ground-glass")
LOCATIONS: tuple[Location, ...] = ("isolated", "juxtavascular", "juxtapleural")
MARGINS: tuple[Margin, ...] = ("smooth", "lobulated", "spiculated")
SOLID_HU = (10.0, 60.0)
GROUND_GLASS_HU = (-700.0, -450.0)


@dataclass(frozen=True)
class Ellipsoid:
    center: Vec
    rotation: Vec
    axes: tuple[float, float, float]

    def level(self, x: AnyArray, y: AnyArray, z: AnyArray) -> NDArray[np.float32]:
        c = self.center
        return ellipsoid_level(x - c[0], y - c[1], z - c[2], self.rotation, self.axes)

    def bounds(self) -> tuple[Vec, Vec]:
        r = max(self.axes)
        return self.center - r, self.center + r


@dataclass(frozen=True)
class Capsule:
    start: Vec
    end: Vec
    r0: float
    r1: float

    def level(self, x: AnyArray, y: AnyArray, z: AnyArray) -> NDArray[np.float32]:
        s = self.start
        return capsule_level(x - s[0], y - s[1], z - s[2], self.end - s, self.r0, self.r1)

    def bounds(self) -> tuple[Vec, Vec]:
        r = max(self.r0, self.r1)
        return np.minimum(self.start, self.end) - r, np.maximum(self.start, self.end) + r


Primitive = Ellipsoid | Capsule


def shape_level(
    prims: tuple[Primitive, ...], x: AnyArray, y: AnyArray, z: AnyArray
) -> NDArray[np.float32]:
    """Level function of a union of primitives."""
    g = prims[0].level(x, y, z)
    for p in prims[1:]:
        g = np.minimum(g, p.level(x, y, z))
    return g


def shape_bounds(prims: tuple[Primitive, ...]) -> tuple[Vec, Vec]:
    los, his = zip(*(p.bounds() for p in prims), strict=True)
    return np.min(los, axis=0), np.max(his, axis=0)


@dataclass(frozen=True)
class Nodule:
    """One nodule: its ground truth and the primitives that draw it."""

    center: Vec
    diameter_mm: float
    volume_mm3: float
    density: Density
    location: Location
    margin: Margin
    outer: tuple[Primitive, ...] = field(repr=False)
    outer_hu: float
    core: tuple[Primitive, ...] = field(repr=False, default=())
    core_hu: float = 0.0

    def bounds(self) -> tuple[Vec, Vec]:
        return shape_bounds(self.outer)


@dataclass(frozen=True)
class NoduleRequest:
    """What to draw; None leaves the choice to the random generator."""

    diameter_mm: float | None = None
    density: Density | None = None
    location: Location | None = None
    margin: Margin | None = None


def sample_nodules(
    anatomy: Anatomy,
    vessels: Segments,
    rng: np.random.Generator,
    requests: list[NoduleRequest],
    z_limits: tuple[float, float],
    diameter_range: tuple[float, float] = (3.0, 30.0),
) -> list[Nodule]:
    """Place one nodule per request inside the lungs, within ``z_limits`` (mm), without overlap."""
    placed: list[Nodule] = []
    thick = vessels.select(np.maximum(vessels.r0, vessels.r1) >= 1.0)
    for req in requests:
        for _attempt in range(8):
            nodule = _one_nodule(anatomy, thick, rng, req, z_limits, diameter_range, placed)
            if nodule is not None:
                placed.append(nodule)
                break
        else:
            raise PlacementError(
                f"could not place a {req.diameter_mm or 'random-size'} mm "
                f"{req.location or ''} nodule in these lungs within the scanned range; "
                "use fewer or smaller nodules, more slices, or another seed"
            )
    return placed


def _one_nodule(
    anatomy: Anatomy,
    vessels: Segments,
    rng: np.random.Generator,
    req: NoduleRequest,
    z_limits: tuple[float, float],
    diameter_range: tuple[float, float],
    placed: list[Nodule],
) -> Nodule | None:
    lo_d, hi_d = diameter_range
    diameter = req.diameter_mm or float(np.exp(rng.uniform(np.log(lo_d), np.log(hi_d))))
    radius = diameter / 2.0
    if req.density:
        density: Density = req.density
    elif diameter >= 6.0:
        density = _choice(rng, DENSITIES, (0.68, 0.12, 0.20))
    else:  # a solid component needs room: part-solid nodules are rarely under 6 mm
        density = _choice(rng, ("solid", "ground-glass"), (0.75, 0.25))
    if req.margin:
        margin: Margin = req.margin
    elif diameter >= 8.0:
        margin = _choice(rng, MARGINS, (0.5, 0.3, 0.2))
    else:
        margin = _choice(rng, MARGINS[:2], (0.7, 0.3))
    location: Location = req.location if req.location else _choice(rng, LOCATIONS, (0.5, 0.3, 0.2))
    z_lo, z_hi = min(z_limits) + radius + 2.0, max(z_limits) - radius - 2.0
    if z_lo >= z_hi:
        return None
    center = _place(anatomy, vessels, rng, location, radius, (z_lo, z_hi), placed)
    if center is None:
        return None
    outer = _shape(center, radius, margin, rng)
    core: tuple[Primitive, ...] = ()
    core_hu = 0.0
    if density == "solid":
        outer_hu = float(rng.uniform(*SOLID_HU))
    else:
        outer_hu = float(rng.uniform(*GROUND_GLASS_HU))
        if density == "part-solid":
            frac = float(rng.uniform(0.35, 0.6))
            core = (Ellipsoid(center, rotation_matrix(rng), (radius * frac,) * 3),)
            core_hu = float(rng.uniform(*SOLID_HU))
    long_axis, volume = _measure(outer, rng)
    return Nodule(
        center=center,
        diameter_mm=long_axis,
        volume_mm3=volume,
        density=density,
        location=location,
        margin=margin,
        outer=outer,
        outer_hu=outer_hu,
        core=core,
        core_hu=core_hu,
    )


def _choice(rng: np.random.Generator, options: tuple[_T, ...], p: tuple[float, ...]) -> _T:
    weights = np.asarray(p, dtype=np.float64)
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


_PROBES = fibonacci_sphere(64)


def _inside(anatomy: Anatomy, center: Vec, radius: float) -> bool:
    """Is the whole sphere inside the lungs?"""
    return bool(anatomy.in_lung(center + radius * _PROBES).all())


def _clear_of(placed: list[Nodule], center: Vec, radius: float) -> bool:
    return all(
        np.linalg.norm(n.center - center) > radius + n.diameter_mm / 2.0 + 4.0 for n in placed
    )


def _place(
    anatomy: Anatomy,
    vessels: Segments,
    rng: np.random.Generator,
    location: str,
    radius: float,
    z_range: tuple[float, float],
    placed: list[Nodule],
) -> Vec | None:
    lo, hi = anatomy.lung_bounds()
    lo, hi = lo.copy(), hi.copy()
    lo[2], hi[2] = max(lo[2], z_range[0]), min(hi[2], z_range[1])
    if lo[2] >= hi[2]:
        return None
    for _ in range(400):
        if location == "juxtavascular":
            center = _near_vessel(vessels, rng, radius, lo, hi)
            if center is None or not _inside(anatomy, center, radius + 1.5):
                continue
        elif location == "juxtapleural":
            center = _near_pleura(anatomy, rng, radius, lo, hi)
            if center is None:
                continue
        else:
            center = rng.uniform(lo, hi)
            if not _inside(anatomy, center, radius + 3.0):
                continue
            if len(vessels) and vessels.distance(center).min() < radius + 1.0:
                continue
        if lo[2] <= center[2] <= hi[2] and _clear_of(placed, center, radius):
            return np.asarray(center)
    return None


def _near_vessel(
    vessels: Segments, rng: np.random.Generator, radius: float, lo: Vec, hi: Vec
) -> Vec | None:
    """A centre so that the nodule overlaps the wall of a 1–3.5 mm vessel."""
    r = np.maximum(vessels.r0, vessels.r1)
    mid = 0.5 * (vessels.start + vessels.end)
    ok = (r <= 3.5) & np.all((mid >= lo) & (mid <= hi), axis=1)
    if not ok.any():
        return None
    candidates = vessels.select(ok)
    point = candidates.points(rng, 1)[0]
    i = int(np.argmin(np.linalg.norm(candidates.start - point, axis=1)))
    axis = candidates.end[i] - candidates.start[i]
    perp = np.cross(axis, rng.standard_normal(3))
    perp /= np.linalg.norm(perp) + 1e-9
    r_v = float(candidates.r0[i])
    return np.asarray(point + perp * (radius + 0.5 * r_v))


def _near_pleura(
    anatomy: Anatomy, rng: np.random.Generator, radius: float, lo: Vec, hi: Vec
) -> Vec | None:
    """A centre just inside the pleura, so that the nodule abuts it."""
    start = rng.uniform(lo, hi)
    if not anatomy.in_lung(start[None, :], radius + 2.0)[0]:
        return None
    direction = random_unit_vectors(rng, 1)[0]
    t = np.arange(0.0, 250.0, 0.5)
    ray = start + t[:, None] * direction
    outside = np.nonzero(~anatomy.in_lung(ray))[0]
    if outside.size == 0:
        return None
    center = start + (t[outside[0]] - 0.75 * radius) * direction
    if not _inside(anatomy, center, 0.55 * radius):
        return None
    return np.asarray(center)


def _shape(
    center: Vec, radius: float, margin: str, rng: np.random.Generator
) -> tuple[Primitive, ...]:
    if margin == "smooth":
        q = rng.uniform(0.75, 1.0, size=2)
        return (Ellipsoid(center, rotation_matrix(rng), (radius, radius * q[0], radius * q[1])),)
    if margin == "lobulated":
        prims: list[Primitive] = [Ellipsoid(center, rotation_matrix(rng), (0.72 * radius,) * 3)]
        for d in random_unit_vectors(rng, int(rng.integers(3, 6))):
            rl = radius * float(rng.uniform(0.38, 0.5))
            prims.append(Ellipsoid(center + d * (radius - rl), np.eye(3), (rl, rl, rl)))
        return tuple(prims)
    q = rng.uniform(0.8, 1.0, size=2)
    body = Ellipsoid(center, rotation_matrix(rng), (radius, radius * q[0], radius * q[1]))
    spicules: list[Primitive] = []
    # Spicules: strands about 1-2 mm thick at the base, tapering to nothing.
    width = min(1.2, radius / 5.0)
    for d in random_unit_vectors(rng, int(rng.integers(8, 17))):
        length = radius * float(rng.uniform(0.4, 1.2))
        r0 = width * float(rng.uniform(0.8, 1.3))
        tip = center + d * (radius + length)
        spicules.append(Capsule(center + d * 0.7 * radius, tip, r0, 0.2))
    return (body, *spicules)


def _measure(prims: tuple[Primitive, ...], rng: np.random.Generator) -> tuple[float, float]:
    """Long axis of the body (spicules excluded) and volume of the whole (Monte Carlo, mm, mm³)."""
    lo, hi = shape_bounds(prims)
    pts = rng.uniform(lo, hi, size=(60_000, 3))
    inside = shape_level(prims, pts[:, 0], pts[:, 1], pts[:, 2]) < 0
    volume = float(inside.mean() * np.prod(hi - lo))
    body = tuple(p for p in prims if isinstance(p, Ellipsoid))
    blo, bhi = shape_bounds(body)
    bpts = rng.uniform(blo, bhi, size=(60_000, 3))
    binside = bpts[shape_level(body, bpts[:, 0], bpts[:, 1], bpts[:, 2]) < 0]
    directions = fibonacci_sphere(200)
    proj = binside @ directions.T
    long_axis = float((proj.max(axis=0) - proj.min(axis=0)).max())
    return long_axis, volume
