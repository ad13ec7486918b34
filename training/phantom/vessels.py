"""Pulmonary arteries, veins and airways of the phantom as trees of tapered segments.

Each tree is grown by recursive territory splitting (the constrained constructive approach used
for synthetic vascular trees): a branch owns a set of points sampled inside the lung, grows towards
their centroid, then splits them in two along their principal axis; the children's radii follow
Murray's law (r³ = r₁³ + r₂³) with the split fraction. Arteries and veins get independent trees so
that they interleave; the airways run beside the arteries (bronchovascular bundles) down to the
segmental and subsegmental level. On a single slice the vessels' cross-sections look like small
round nodules, which is the false-positive source a lung-nodule detector has to learn to reject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .anatomy import Anatomy

Vec = NDArray[np.float64]
AIRWAY_RATIO = 1.0  # outer bronchial radius / accompanying artery radius (bronchoarterial ratio)


@dataclass(frozen=True)
class Segments:
    """Tapered segments, one per row: start (N, 3), end (N, 3), radii r0 and r1 (N,), in mm."""

    start: Vec
    end: Vec
    r0: Vec
    r1: Vec

    @classmethod
    def from_rows(cls, rows: list[tuple[Vec, Vec, float, float]]) -> Segments:
        if not rows:
            empty = np.zeros((0, 3))
            return cls(empty, empty.copy(), np.zeros(0), np.zeros(0))
        return cls(
            np.array([r[0] for r in rows], dtype=np.float64),
            np.array([r[1] for r in rows], dtype=np.float64),
            np.array([r[2] for r in rows], dtype=np.float64),
            np.array([r[3] for r in rows], dtype=np.float64),
        )

    def __len__(self) -> int:
        return int(self.r0.size)

    def scaled(self, factor: float, offset: float = 0.0) -> Segments:
        """The same axes with radii ``r * factor + offset``."""
        return Segments(self.start, self.end, self.r0 * factor + offset, self.r1 * factor + offset)

    def select(self, mask: NDArray[np.bool_]) -> Segments:
        return Segments(self.start[mask], self.end[mask], self.r0[mask], self.r1[mask])

    def distance(self, point: Vec) -> Vec:
        """Distance from ``point`` to each segment's surface (mm; negative inside)."""
        axis = self.end - self.start
        length2 = np.maximum(np.einsum("ij,ij->i", axis, axis), 1e-12)
        t = np.clip(np.einsum("ij,ij->i", point - self.start, axis) / length2, 0.0, 1.0)
        closest = self.start + t[:, None] * axis
        dist = np.linalg.norm(point - closest, axis=1)
        return np.asarray(dist - (self.r0 + (self.r1 - self.r0) * t))

    def points(self, rng: np.random.Generator, n: int) -> Vec:
        """``n`` points on the axes of segments chosen in proportion to their length."""
        length = np.linalg.norm(self.end - self.start, axis=1)
        idx = rng.choice(len(self), size=n, p=length / length.sum())
        t = rng.uniform(0.15, 0.85, size=n)
        return np.asarray(self.start[idx] + t[:, None] * (self.end[idx] - self.start[idx]))


@dataclass(frozen=True)
class Trees:
    """All tubular structures of the lungs."""

    vessels: Segments  # arteries and veins (blood)
    airway_wall: Segments  # outer surface of the airways
    airway_lumen: Segments  # air inside them


@dataclass(frozen=True)
class TreeParams:
    territory_points: int = 4000  # per lung
    leaf_points: int = 4  # a branch with this many territory points or fewer ends
    min_radius: float = 0.45  # mm
    airway_min_radius: float = 1.5  # arteries thinner than this have no visible airway


def sample_lung_points(
    anatomy: Anatomy, rng: np.random.Generator, n: int, side: int, margin: float = 1.5
) -> Vec:
    """``n`` points uniformly inside one lung (side -1 right, +1 left), ``margin`` mm inside."""
    lo, hi = anatomy.lung_bounds()
    if side < 0:
        hi = hi.copy()
        hi[0] = anatomy.col_x
    else:
        lo = lo.copy()
        lo[0] = anatomy.col_x
    found: list[Vec] = []
    count = 0
    for _ in range(200):
        cand = rng.uniform(lo, hi, size=(4 * n, 3))
        keep = cand[anatomy.in_lung(cand, margin)]
        found.append(keep)
        count += len(keep)
        if count >= n:
            break
    pts = np.concatenate(found)[:n]
    if len(pts) < n:
        raise RuntimeError("the sampled anatomy has almost no lung; try another seed")
    return pts


def grow_tree(
    root: Vec,
    territory: Vec,
    radius: float,
    rng: np.random.Generator,
    params: TreeParams,
) -> tuple[list[tuple[Vec, Vec, float, float]], list[tuple[Vec, Vec, float, float, Vec, Vec]]]:
    """Grow one tree from ``root`` over ``territory``.

    Returns the segments and, for the ones thick enough to have an airway beside them, the same
    segments with the offset direction at their start and end (for the bronchus that runs along).
    """
    segments: list[tuple[Vec, Vec, float, float]] = []
    bundles: list[tuple[Vec, Vec, float, float, Vec, Vec]] = []
    first_dir = territory.mean(axis=0) - root
    offset0 = _perpendicular(first_dir, rng.standard_normal(3))
    stack: list[tuple[Vec, Vec, float, Vec]] = [(root, territory, radius, offset0)]
    while stack:
        p, pts, r, offset = stack.pop()
        c = pts.mean(axis=0)
        v = c - p
        dist = float(np.linalg.norm(v))
        if len(pts) <= params.leaf_points or r < params.min_radius or dist < 1.0:
            if dist > 0.5:
                segments.append((p, c, r, max(0.6 * r, params.min_radius * 0.8)))
            continue
        length = dist * float(rng.uniform(0.3, 0.55))
        q = p + v / dist * length
        r_end = 0.96 * r
        segments.append((p, q, r, r_end))
        end_offset = _perpendicular(v, offset + 0.3 * rng.standard_normal(3))
        if r >= params.airway_min_radius:
            bundles.append((p, q, r, r_end, _perpendicular(v, offset), end_offset))
        left, right = _split(pts, c, v, rng)
        frac = len(left) / len(pts)
        stack.append((q, left, r_end * frac ** (1 / 3), end_offset))
        stack.append((q, right, r_end * (1 - frac) ** (1 / 3), end_offset))
    return segments, bundles


def _split(pts: Vec, centre: Vec, direction: Vec, rng: np.random.Generator) -> tuple[Vec, Vec]:
    """Split points (whose mean is ``centre``) in two halves across their main axis (avoiding
    the growth direction)."""
    centred = pts - centre
    _, vecs = np.linalg.eigh(centred.T @ centred)
    d = direction / (np.linalg.norm(direction) + 1e-9)
    axis = vecs[:, 2] if abs(vecs[:, 2] @ d) < 0.8 else vecs[:, 1]
    axis = axis + 0.25 * rng.standard_normal(3)
    proj = centred @ axis
    # Unequal splits give the asymmetric branching of real lungs.
    cut = _quantile(proj, float(rng.uniform(0.35, 0.65)))
    below = proj <= cut
    if below.all() or not below.any():
        half = len(pts) // 2
        order = np.argsort(proj)
        return pts[order[:half]], pts[order[half:]]
    return pts[below], pts[~below]


def _quantile(values: Vec, q: float) -> float:
    """``np.quantile(values, q)`` of a 1-D array (its default "linear" method), to the last bit:
    the same index, the same two order statistics (by a partition) and the same interpolation
    as NumPy's ``_lerp``, without its general-case overhead (about 15x faster on the few hundred
    points of a branch; the trees split thousands of times per phantom)."""
    n = values.size
    virtual = (n - 1) * q
    lo = int(np.floor(virtual))
    hi = min(lo + 1, n - 1)
    ordered = np.partition(values, (lo, hi))
    below, above = ordered[lo], ordered[hi]
    gamma = virtual - lo
    step = above - below
    return float(above - step * (1 - gamma) if gamma >= 0.5 else below + step * gamma)


def _perpendicular(direction: Vec, hint: Vec) -> Vec:
    d = direction / (np.linalg.norm(direction) + 1e-9)
    v = hint - (hint @ d) * d
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        v = np.cross(d, np.array([1.0, 0.0, 0.0]))
        if np.linalg.norm(v) < 1e-6:
            v = np.cross(d, np.array([0.0, 1.0, 0.0]))
        n = float(np.linalg.norm(v))
    return np.asarray(v / n)


def build_trees(
    anatomy: Anatomy, rng: np.random.Generator, params: TreeParams | None = None
) -> Trees:
    """Arteries, veins and airways of both lungs."""
    params = params or TreeParams()
    a = anatomy
    vessels: list[tuple[Vec, Vec, float, float]] = []
    wall: list[tuple[Vec, Vec, float, float]] = []
    carina = np.array(a.carina())
    trachea_top = carina + np.array([0.0, 0.0, 260.0])
    wall.append((trachea_top, carina, 10.5, 10.0))
    pa_bif = np.array(a.pulmonary_bifurcation())
    left_atrium = np.array(a.left_atrium())
    for side in (-1, 1):
        hilum = np.array(a.hilum(side))
        territory = sample_lung_points(a, rng, params.territory_points, side)
        # Arteries, with the bronchi beside them.
        r_pa = 9.0 if side < 0 else 8.5
        vessels.append((pa_bif, hilum, r_pa + 1.0, r_pa))
        arteries, bundles = grow_tree(hilum, territory, r_pa, rng, params)
        vessels.extend(arteries)
        if bundles:
            p0, _, r0, _, off0, _ = bundles[0]
            bronchus_start = p0 + off0 * (r0 + AIRWAY_RATIO * r0 + 0.8)
            wall.append((carina, bronchus_start, 7.5, AIRWAY_RATIO * r0))
        for p, q, r0, r1, o0, o1 in bundles:
            ra0, ra1 = AIRWAY_RATIO * r0, AIRWAY_RATIO * r1
            wall.append((p + o0 * (r0 + ra0 + 0.8), q + o1 * (r1 + ra1 + 0.8), ra0, ra1))
        # Veins: an independent tree from the left atrium.
        vein_hilum = hilum + np.array([0.0, 18.0, -35.0])
        vessels.append((left_atrium, vein_hilum, 8.0, 7.5))
        veins, _ = grow_tree(
            vein_hilum, territory[rng.permutation(len(territory))], 7.5, rng, params
        )
        vessels.extend(veins)
    walls = Segments.from_rows(wall)
    wall_thickness = 0.15 * np.maximum(walls.r0, walls.r1) + 0.35
    lumen = Segments(walls.start, walls.end, walls.r0 - wall_thickness, walls.r1 - wall_thickness)
    return Trees(Segments.from_rows(vessels), walls, lumen)
