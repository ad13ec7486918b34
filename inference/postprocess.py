"""From a probability map in model space to ``Finding`` records in patient coordinates.

The map (on the grid of ``Preprocessed``: LPS-ordered, resampled) is thresholded at the
operating point (or, for a calibrated model, at the calibration's segmentation threshold; each
finding's probability is then the calibrated one, and findings below the operating point are
dropped: see ``models.registry.Calibration``), split into 26-connected components, components
smaller than a minimum volume or mostly outside the patient's body (``Preprocessed.body``) are
dropped, and components whose centres lie closer than a merge
distance are joined (single linkage: fragments of one lesion cut by a thin gap become one
finding). Each finding is measured in millimetres through the preprocessing affine:
probability-weighted centre, longest 3D extent (maximum Feret diameter), volume, bounding box.
The volume reported is that of its mask's voxels on the series grid, so that the SR's Volume is
exactly the SEG segment's (the calibration keeps the model grid's count it was fitted on).
Its key slice and its mask are on the ORIGINAL series grid (``Volume``), where the SR's image
references and the SEG's frames live.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.spatial.distance import pdist
from skimage import measure

from models.registry import Calibration

from .findings import Finding, Point
from .preprocess import Preprocessed
from .volume import Volume

# scikit-image ships no annotations for these: give the two calls used here their types.
_label: Callable[..., NDArray[np.intp]] = measure.label
_marching_cubes: Callable[..., tuple[NDArray[np.float64], Any, Any, Any]] = measure.marching_cubes

MIN_VOLUME_MM3 = 5.0  # below this a component is noise (a 3 mm nodule is 14 mm³)
MERGE_DISTANCE_MM = 5.0


class PostprocessError(ValueError):
    """The probability map does not fit the preprocessed volume; the message says how."""


@dataclass(frozen=True)
class _Component:
    index: NDArray[np.intp]  # (n, 3) voxel indices in model space
    weight: NDArray[np.float32]  # probability of each voxel

    @property
    def centre(self) -> NDArray[np.float64]:
        w = self.weight.astype(np.float64)
        return np.asarray((self.index * w[:, None]).sum(axis=0) / w.sum())


def findings_from_probability(
    probability: NDArray[np.floating],
    pre: Preprocessed,
    volume: Volume,
    threshold: float,
    min_volume_mm3: float = MIN_VOLUME_MM3,
    merge_distance_mm: float = MERGE_DISTANCE_MM,
    calibration: Calibration | None = None,
) -> list[Finding]:
    """Findings (ids 1..N by decreasing probability) from a probability map on ``pre``'s grid.

    ``probability`` is what the runner returned for ``pre.array``; ``volume`` is the series it
    was preprocessed from, whose grid carries the key slice and the masks. With
    ``calibration``, components are cut at its segmentation threshold and ``threshold``
    applies to the calibrated probability.
    """
    if probability.shape != pre.array.shape:
        raise PostprocessError(
            f"probability map {probability.shape} does not match the model input "
            f"{pre.array.shape}; pass the runner's output for this preprocessed volume"
        )
    if not 0.0 < threshold < 1.0:
        raise PostprocessError(f"threshold must be in (0, 1), got {threshold}")
    axes = pre.affine[:3, :3]
    voxel_mm3 = abs(float(np.linalg.det(axes)))
    cut = calibration.segmentation_threshold if calibration is not None else threshold
    labels = _label(probability >= cut, connectivity=3)  # 26-connected
    components: list[_Component] = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        local = np.nonzero(labels[box] == label)
        if len(local[0]) * voxel_mm3 < min_volume_mm3:
            continue
        index = np.stack([ax + s.start for ax, s in zip(local, box, strict=True)], axis=1)
        if pre.body is not None and pre.body[tuple(index.T)].mean() < 0.5:
            continue  # mostly outside the patient's body
        weight = np.asarray(probability[box][local], dtype=np.float32)
        components.append(_Component(index, weight))
    groups = _merge(components, axes, merge_distance_mm)
    measured = [
        _measure(
            group,
            _feret_diameter(group, *_extent(group), probability, cut, axes),
            pre,
            volume,
            voxel_mm3,
        )
        for group in groups
    ]
    if calibration is not None:
        measured = [
            replace(m, probability=calibrated(calibration, m.volume_mm3, m.probability))
            for m in measured
        ]
        measured = [m for m in measured if m.probability >= threshold]
    return _numbered(measured)


@dataclass(frozen=True)
class Region:
    """One detection of a detector that scores places rather than voxels: its probability,
    its voxels on ``pre``'s grid (n, 3), and the point it was scored at (an index, or None for
    the voxels' centre)."""

    probability: float
    index: NDArray[np.intp]
    centre: NDArray[np.float64] | None = None


def findings_from_regions(
    regions: list[Region], pre: Preprocessed, volume: Volume
) -> list[Finding]:
    """Findings (ids 1..N by decreasing probability) from detections that are already
    separate (a detector's own suppression decided which place is which lesion): each is
    measured as a component of a probability map is, its probability the detector's."""
    axes = pre.affine[:3, :3]
    voxel_mm3 = abs(float(np.linalg.det(axes)))
    measured: list[_Measured] = []
    for region in regions:
        if len(region.index) == 0:
            raise PostprocessError("a detection has no voxels")
        c = _Component(region.index, np.full(len(region.index), region.probability, np.float32))
        lo, hi = _extent(c)
        # the region alone, as a map of 1 inside and 0 outside, for its isosurface at 0.5
        local = np.zeros(tuple(hi - lo + 1), dtype=np.float32)
        local[tuple((c.index - lo).T)] = 1.0
        shifted = _Component(c.index - lo, c.weight)
        diameter = _feret_diameter(shifted, *_extent(shifted), local, 0.5, axes)
        m = _measure(c, diameter, pre, volume, voxel_mm3)
        if region.centre is not None:
            m = replace(m, center_mm=_point(pre.to_patient(region.centre[None])[0]))
        measured.append(m)
    return _numbered(measured)


def calibrated(calibration: Calibration, volume_mm3: float, max_probability: float) -> float:
    """The calibrated probability of a component (see ``models.registry.Calibration``)."""
    p = min(max(max_probability, 1e-6), 1.0 - 1e-6)
    z = (
        calibration.intercept
        + calibration.volume_coef * math.log1p(volume_mm3)
        + calibration.max_coef * math.log(p / (1.0 - p))
    )
    return 1.0 / (1.0 + math.exp(-min(max(z, -50.0), 50.0)))


def _merge(
    components: list[_Component], axes: NDArray[np.float64], distance_mm: float
) -> list[_Component]:
    """Join components whose centres are closer than ``distance_mm`` (single linkage)."""
    if len(components) < 2 or distance_mm <= 0:
        return components
    centres = np.array([c.centre for c in components]) @ axes.T  # mm, relative to the origin
    parent = list(range(len(components)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # A k-d tree, not an n×n distance matrix: a noisy map can have thousands of components.
    for i, j in cKDTree(centres).query_pairs(r=distance_mm):
        if np.linalg.norm(centres[i] - centres[j]) < distance_mm:
            parent[root(i)] = root(j)
    groups: dict[int, list[_Component]] = {}
    for i, c in enumerate(components):
        groups.setdefault(root(i), []).append(c)
    return [
        _Component(np.concatenate([c.index for c in g]), np.concatenate([c.weight for c in g]))
        for g in groups.values()
    ]


@dataclass(frozen=True)
class _Measured:
    probability: float
    center_mm: Point
    diameter_mm: float
    volume_mm3: float  # on the model's grid (what the calibration was fitted on)
    bbox_mm: tuple[Point, Point]
    key_sop_instance_uid: str
    key_frame: int | None
    mask: NDArray[np.bool_]
    mask_mm3: float  # the mask's voxels on the series grid: the volume reported (SR = SEG)


def _numbered(measured: list[_Measured]) -> list[Finding]:
    """Findings numbered 1..N by decreasing probability (then volume)."""
    measured = sorted(measured, key=lambda m: (-m.probability, -m.volume_mm3))
    return [
        Finding(
            id=i,
            probability=m.probability,
            center_mm=m.center_mm,
            diameter_mm=m.diameter_mm,
            volume_mm3=m.mask_mm3,
            bbox_mm=m.bbox_mm,
            key_sop_instance_uid=m.key_sop_instance_uid,
            key_frame=m.key_frame,
            mask=m.mask,
        )
        for i, m in enumerate(measured, start=1)
    ]


def _extent(c: _Component) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    return c.index.min(axis=0), c.index.max(axis=0)


def _measure(
    c: _Component,
    diameter_mm: float,
    pre: Preprocessed,
    volume: Volume,
    voxel_mm3: float,
) -> _Measured:
    centre = pre.to_patient(c.centre)
    lo, hi = _extent(c)
    corners = pre.to_patient(_box_corners(lo - 0.5, hi + 0.5))
    k = int(np.clip(np.rint(volume.to_index(centre)[0]), 0, len(volume.sop_uids) - 1))
    mask = _volume_mask(c, lo, hi, pre, volume)
    if not mask[k].any():
        # The key slice shows the finding: a curved or hollow component's centre can fall on a
        # slice it does not touch; then the slice where its cross-section is largest.
        k = int(np.argmax(mask.sum(axis=(1, 2))))
    series_voxel_mm3 = abs(float(np.linalg.det(volume.affine[:3, :3])))
    return _Measured(
        probability=float(np.clip(c.weight.max(), 0.0, 1.0)),
        center_mm=_point(centre),
        diameter_mm=diameter_mm,
        volume_mm3=len(c.weight) * voxel_mm3,
        bbox_mm=(_point(corners.min(axis=0)), _point(corners.max(axis=0))),
        key_sop_instance_uid=volume.sop_uids[k],
        key_frame=volume.frames[k] if volume.frames else None,
        mask=mask,
        mask_mm3=int(np.count_nonzero(mask)) * series_voxel_mm3,
    )


def _feret_diameter(
    c: _Component,
    lo: NDArray[np.intp],
    hi: NDArray[np.intp],
    probability: NDArray[np.floating],
    threshold: float,
    axes: NDArray[np.float64],
) -> float:
    """Longest extent (mm) of the component: the maximum Feret diameter of its surface.

    The surface is the component's threshold isosurface (marching cubes on the probabilities,
    interpolated between voxels, other components blanked), so a lesion's size does not grow
    with the staircase of its voxels. The farthest pair of surface points is searched on their
    convex hull only, which keeps large components cheap; distances are taken after mapping
    through the affine, so anisotropic voxels measure right.
    """
    first = np.maximum(lo - 1, 0)
    last = np.minimum(hi + 2, probability.shape)
    box = tuple(slice(a, b) for a, b in zip(first, last, strict=True))
    crop = np.array(probability[box], dtype=np.float32)
    inside = np.zeros(crop.shape, dtype=bool)
    inside[tuple((c.index - first).T)] = True
    crop[(crop >= threshold) & ~inside] = 0.0  # neighbours above threshold belong to others
    crop = np.pad(crop, 1)  # zeros around: the surface closes at the volume's border too
    # A component whose voxels all sit exactly at the threshold has no surface at that level
    # (marching cubes needs values on both sides): take the level just below its maximum.
    level = min(threshold, float(np.nextafter(np.float32(crop.max()), np.float32(0.0))))
    vertices, _, _, _ = _marching_cubes(crop, level=level)
    points = vertices @ axes.T
    with contextlib.suppress(QhullError):  # flat or tiny sets: all vertices are few anyway
        points = points[ConvexHull(points).vertices]
    diameter = math.sqrt(float(pdist(points, "sqeuclidean").max())) if len(points) > 1 else 0.0
    # A single voxel's isosurface can be smaller than the voxel; report one voxel at least.
    return max(diameter, float(np.linalg.norm(axes, axis=0).min()))


def _volume_mask(
    c: _Component,
    lo: NDArray[np.intp],
    hi: NDArray[np.intp],
    pre: Preprocessed,
    volume: Volume,
) -> NDArray[np.bool_]:
    """The component on the series grid: each original voxel centre, mapped into model space,
    takes the value of the nearest model voxel. Only the box around the component is mapped."""
    shape = volume.hu.shape
    model = np.zeros(tuple(hi - lo + 1), dtype=bool)
    model[tuple((c.index - lo).T)] = True
    # Series voxels whose centres can fall in the component's model-space box.
    corners = volume.to_index(pre.to_patient(_box_corners(lo - 0.5, hi + 0.5)))
    first = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)
    last = np.minimum(np.ceil(corners.max(axis=0)).astype(int), np.asarray(shape) - 1)
    mask = np.zeros(shape, dtype=bool)
    if np.any(last < first):
        return _nearest_voxel(c, pre, volume, mask)
    grid = np.stack(
        np.meshgrid(
            *(np.arange(a, b + 1) for a, b in zip(first, last, strict=True)), indexing="ij"
        ),
        axis=-1,
    ).astype(np.float64)
    to_model = np.linalg.inv(pre.affine) @ volume.affine  # series (k, row, col) -> model index
    inside = np.floor(grid @ to_model[:3, :3].T + to_model[:3, 3] + 0.5).astype(np.intp) - lo
    valid = np.all((inside >= 0) & (inside < model.shape), axis=-1)
    hit = np.zeros(valid.shape, dtype=bool)
    hit[valid] = model[tuple(inside[valid].T)]
    mask[tuple(slice(a, b + 1) for a, b in zip(first, last, strict=True))] = hit
    return mask if hit.any() else _nearest_voxel(c, pre, volume, mask)


def _nearest_voxel(
    c: _Component, pre: Preprocessed, volume: Volume, mask: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """A component smaller than the series' voxels (a coarse series, e.g. 5 mm slices under a
    2.5 mm model) covers no series voxel centre: mark the voxel that holds its centre, so that
    every finding has a segment."""
    centre = volume.to_index(pre.to_patient(c.centre[None]))[0]
    voxel = np.clip(np.rint(centre).astype(int), 0, np.asarray(mask.shape) - 1)
    mask[tuple(voxel)] = True
    return mask


def _box_corners(lo: NDArray[np.floating], hi: NDArray[np.floating]) -> NDArray[np.float64]:
    """The 8 corners (8, 3) of the index box [lo, hi]."""
    return np.array(
        [[(lo, hi)[b][axis] for axis, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)],
        dtype=np.float64,
    )


def _point(values: NDArray[np.floating]) -> Point:
    x, y, z = (float(v) for v in values)
    return (x, y, z)
