"""The candidate stage of the two-stage detector (torch-free): where a nodule might be.

A high-recall, low-precision search, as the first stage of the leading LUNA16 systems: every
place in the lungs that looks like a bright blob at some scale becomes a candidate, and a
second stage (a small 3D classifier on a crop around each, ``inference.detector``) decides.

On the model's grid (fine and isotropic, e.g. 1 mm; see ``preprocess``):

1. **Lungs.** Air inside the patient's body (``Preprocessed.body``), found on a 4x coarser grid:
   the two largest low-density parts, closed by a ball (a nodule on the pleura or beside the
   mediastinum is a dent in the lung, and the closing takes it in), holes filled slice by slice
   (vessels, airways walls and nodules inside), grown by a margin. Only the lungs' bounding box
   is searched.
2. **Background** (``background_mm``, when set): a grey opening by a cube of that width is
   subtracted (a white top-hat), so the chest wall, the mediastinum and every structure wider
   than the cube are gone, while what is narrower (nodules up to about that size, vessels)
   keeps its contrast: a small nodule on the pleura or against a vessel, which the wall or the
   vessel would otherwise drown, is a blob of its own.
3. **Blobs.** A scale-normalised difference-of-Gaussians pyramid (Lowe's approximation of
   ``-sigma² ∇² G``) on the windowed intensities, with sigmas from about 0.9 mm (a 3 mm nodule:
   ``sigma = r / √3``) to 9 mm (30 mm); larger sigmas run on a grid halved and halved again, so
   the whole pyramid costs about three times its finest level.
4. **Peaks.** Local maxima in space of each level, above ``min_response``, inside the lungs;
   across levels and positions the strongest peak wins and suppresses weaker ones closer than
   the smaller of their radii; the ``max_candidates`` strongest remain, each with its position,
   scale (an estimate of the radius) and response.

The figures that chose these settings (candidate recall at N candidates per scan by size) are
printed by ``benchmarks/detector_ceiling.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

LUNG_HU = -400.0  # lung parenchyma and airways are below this, solid tissue above
COARSE = 4  # the lung mask is found on a grid this many times coarser
BLUR_THREADS = 2  # Gaussian filters run side by side (the 2-core CPU budget)
# the 26 neighbours of a voxel, nearest first (they reject most voxels that are no peak)
NEIGHBOURS = np.array(
    sorted(
        (
            (a, b, c)
            for a in (-1, 0, 1)
            for b in (-1, 0, 1)
            for c in (-1, 0, 1)
            if (a, b, c) != (0, 0, 0)
        ),
        key=lambda v: abs(v[0]) + abs(v[1]) + abs(v[2]),
    ),
    dtype=np.intp,
)


class CandidateError(ValueError):
    """The candidate settings cannot be used; the message says which and why."""


@dataclass(frozen=True)
class CandidateSpec:
    """The candidate stage's settings (the model card's ``detector.candidates``)."""

    sigmas_mm: tuple[float, ...] = (0.9, 1.3, 1.8, 2.5, 3.5, 5.0, 7.0, 9.0)
    min_response: float = 0.02  # scale-normalised response, in windowed units (0..1)
    max_candidates: int = 400
    shape_power: float = 1.0  # candidates are ranked by response x roundness ** shape_power
    lung_closing_mm: float = 12.0
    lung_margin_mm: float = 4.0
    background_mm: float | None = None  # the top-hat's cube (None: the blobs of the image)

    def __post_init__(self) -> None:
        if not self.sigmas_mm or any(s <= 0 for s in self.sigmas_mm):
            raise CandidateError(f"sigmas_mm must be positive, got {self.sigmas_mm}")
        if list(self.sigmas_mm) != sorted(self.sigmas_mm):
            raise CandidateError(f"sigmas_mm must increase, got {self.sigmas_mm}")
        if self.max_candidates < 1:
            raise CandidateError(f"max_candidates must be 1 or more, got {self.max_candidates}")
        if self.background_mm is not None and self.background_mm <= 0:
            raise CandidateError(f"background_mm must be positive, got {self.background_mm}")


@dataclass(frozen=True)
class Candidates:
    """Candidate centres (n, 3) as (z, y, x) voxel indices of the model grid (floats), their
    radius estimates in mm and their responses, strongest first."""

    index: NDArray[np.float64]
    radius_mm: NDArray[np.float64]
    response: NDArray[np.float64]  # the ranking score: blob response x shape ** shape_power
    shape: NDArray[np.float64]  # roundness 0..1 (blob_shape)

    def __len__(self) -> int:
        return len(self.response)


def lung_mask(
    array: NDArray[np.floating],
    body: NDArray[np.bool_] | None,
    spacing_mm: float,
    spec: CandidateSpec,
    hu_window: tuple[float, float],
    step: int = COARSE,
) -> NDArray[np.bool_]:
    """The lungs (closed, filled, with a margin) on the grid of ``array`` (windowed 0..1),
    found on a grid ``step`` times coarser."""
    lo, hi = hu_window
    level = (LUNG_HU - lo) / (hi - lo)
    coarse = array[::step, ::step, ::step]
    air = coarse < level
    if body is not None:
        air &= body[::step, ::step, ::step]
    else:
        air &= _inside(coarse >= level)
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros(array.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.argsort(sizes)[::-1][:2]
    keep = keep[sizes[keep] >= 0.1 * sizes[keep[0]]]  # a second lung, not a bowel gas bubble
    lungs = np.isin(labels, keep)
    coarse_mm = spacing_mm * step
    radius = max(1, round(spec.lung_closing_mm / coarse_mm))
    lungs = ndimage.binary_closing(np.pad(lungs, radius), _ball(radius))[
        radius:-radius, radius:-radius, radius:-radius
    ]
    for k in range(lungs.shape[0]):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    margin = max(1, round(spec.lung_margin_mm / coarse_mm))
    lungs = ndimage.binary_dilation(lungs, _ball(margin))
    full = np.repeat(np.repeat(np.repeat(lungs, step, 0), step, 1), step, 2)
    return np.ascontiguousarray(full[: array.shape[0], : array.shape[1], : array.shape[2]])


def find_candidates(
    array: NDArray[np.floating],
    lungs: NDArray[np.bool_],
    spacing_mm: float,
    spec: CandidateSpec,
) -> Candidates:
    """Blob candidates inside ``lungs`` on an isotropic grid of ``spacing_mm`` (see module)."""
    empty = Candidates(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0))
    if not lungs.any():
        return empty
    box = bounding_box(lungs)
    if spec.background_mm is None:
        crop = np.asarray(array[box], dtype=np.float32)
    else:
        crop = without_background(array, box, spec.background_mm / spacing_mm)
    inside = lungs[box]
    offset = np.array([s.start for s in box], dtype=np.float64)
    found: list[tuple[NDArray[np.float64], ...]] = []
    for factor, sigmas in _octaves(spec.sigmas_mm, spacing_mm):
        grid = crop if factor == 1 else _shrink(crop, factor)
        mask = inside if factor == 1 else inside[::factor, ::factor, ::factor]
        mask = mask[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
        step_mm = spacing_mm * factor
        # sigmas in voxels of this grid, and one more above the last for its difference
        levels = [s / step_mm for s in sigmas]
        ratio = levels[1] / levels[0] if len(levels) > 1 else 1.4
        blurred = _blur(grid, [*levels, levels[-1] * ratio])
        for i, sigma_mm in enumerate(sigmas):
            k = (levels[i + 1] if i + 1 < len(levels) else levels[-1] * ratio) / levels[i]
            response = (blurred[i] - blurred[i + 1]) / np.float32(k - 1.0)
            where = local_peaks(response, mask, spec.min_response)
            if len(where) == 0:
                continue
            values = response[tuple(where.T)].astype(np.float64)
            shape = blob_shape(blurred[i], where)
            centres = where.astype(np.float64) * factor + (factor - 1) / 2.0 + offset
            radius = np.full(len(values), sigma_mm * math.sqrt(3.0))
            found.append((centres, radius, values, shape))
    if not found:
        return empty
    centres, radius, values, shape = (np.concatenate([f[j] for f in found]) for j in range(4))
    score = values * shape**spec.shape_power
    keep = _suppress(centres * spacing_mm, radius, score, spec.max_candidates)
    return Candidates(centres[keep], radius[keep], score[keep], shape[keep])


def without_background(
    array: NDArray[np.floating], box: tuple[slice, ...], width: float
) -> NDArray[np.float32]:
    """``array[box]`` minus its grey opening by a cube ``width`` voxels wide (rounded to an odd
    count; a white top-hat): what is narrower than the cube keeps its contrast, what is wider
    (the chest wall, the mediastinum, large nodules' cores) is gone. The opening sees half a
    cube more than the box on every side, where the grid has it, so that the wall at the box's
    edge is known as wall. A cube's minimum and maximum filters are separable: six 1D passes."""
    size = max(3, round(width) // 2 * 2 + 1)
    half = size // 2
    wide = tuple(
        slice(max(s.start - half, 0), min(s.stop + half, n))
        for s, n in zip(box, array.shape, strict=True)
    )
    region = np.asarray(array[wide], dtype=np.float32)
    opened = ndimage.grey_opening(region, size=size, mode="nearest")
    inner = tuple(
        slice(s.start - w.start, s.stop - w.start) for s, w in zip(box, wide, strict=True)
    )
    return np.asarray(region[inner] - opened[inner], dtype=np.float32)


def probability_peaks(
    probability: NDArray[np.floating],
    spacing_mm: tuple[float, float, float],
    min_probability: float,
    max_candidates: int,
    separation_mm: float = 4.0,
) -> Candidates:
    """Local maxima of a segmentation network's probability map above ``min_probability`` (far
    below its operating point: a candidate source, not findings), strongest first, none closer
    than ``separation_mm`` to a stronger one. Indices are on the probability map's grid."""
    p = np.asarray(probability, dtype=np.float32)
    peaks = (p == ndimage.maximum_filter(p, size=3, mode="nearest")) & (p > min_probability)
    where = np.argwhere(peaks)
    if len(where) == 0:
        return Candidates(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0))
    values = p[tuple(where.T)].astype(np.float64)
    centres = where.astype(np.float64)
    radius = np.full(len(values), separation_mm)
    keep = _suppress(centres * np.asarray(spacing_mm), radius, values, max_candidates)
    return Candidates(centres[keep], radius[keep], values[keep], np.ones(len(keep)))


def blob_shape(smoothed: NDArray[np.float32], where: NDArray[np.intp]) -> NDArray[np.float64]:
    """How round a bright peak is, 0..1: the ratio of the smallest to the largest curvature
    (Hessian eigenvalue magnitudes, central differences of the smoothed level at each peak).
    A sphere is 1; a vessel (a tube: no curvature along it) or a wall is near 0; a peak that is
    not bright in every direction is 0."""
    z, y, x = (where[:, j] for j in range(3))
    limit = np.asarray(smoothed.shape) - 1
    inner = np.all((where > 0) & (where < limit), axis=1)
    out = np.zeros(len(where), dtype=np.float64)
    if not inner.any():
        return out
    z, y, x = z[inner], y[inner], x[inner]
    v = smoothed.astype(np.float64, copy=False)
    c = v[z, y, x]
    h = np.empty((len(z), 3, 3))
    h[:, 0, 0] = v[z + 1, y, x] + v[z - 1, y, x] - 2 * c
    h[:, 1, 1] = v[z, y + 1, x] + v[z, y - 1, x] - 2 * c
    h[:, 2, 2] = v[z, y, x + 1] + v[z, y, x - 1] - 2 * c
    h[:, 0, 1] = h[:, 1, 0] = (
        v[z + 1, y + 1, x] - v[z + 1, y - 1, x] - v[z - 1, y + 1, x] + v[z - 1, y - 1, x]
    ) / 4
    h[:, 0, 2] = h[:, 2, 0] = (
        v[z + 1, y, x + 1] - v[z + 1, y, x - 1] - v[z - 1, y, x + 1] + v[z - 1, y, x - 1]
    ) / 4
    h[:, 1, 2] = h[:, 2, 1] = (
        v[z, y + 1, x + 1] - v[z, y + 1, x - 1] - v[z, y - 1, x + 1] + v[z, y - 1, x - 1]
    ) / 4
    eig = np.linalg.eigvalsh(h)  # ascending: the most negative first
    largest = -eig[:, 0]
    smallest = -eig[:, 2]
    ratio = np.where(largest > 0, np.clip(smallest / np.maximum(largest, 1e-12), 0.0, 1.0), 0.0)
    out[inner] = ratio
    return out


def local_peaks(
    array: NDArray[np.float32], mask: NDArray[np.bool_], floor: float
) -> NDArray[np.intp]:
    """The voxels (n, 3), in C order, of ``mask`` above ``floor`` that equal the maximum of
    their 3x3x3 neighbourhood (edges repeated beyond the grid), i.e. ``np.argwhere`` of
    ``(array == maximum_filter(array, size=3, mode="nearest")) & (array > floor) & mask``;
    but the neighbours are compared only at the voxels above the floor, and each comparison
    keeps only the voxels still in the running (the nearest neighbours reject most)."""
    flat = np.flatnonzero((array > floor) & mask)
    if len(flat) == 0:
        return np.zeros((0, 3), dtype=np.intp)
    padded = np.pad(array, 1, mode="edge")  # the edge repeated: maximum_filter's "nearest"
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], dtype=np.intp)
    zyx = np.unravel_index(flat, array.shape)
    at = (zyx[0] + 1) * strides[0] + (zyx[1] + 1) * strides[1] + (zyx[2] + 1) * strides[2]
    values = padded.ravel()
    centre = values[at]
    for offset in NEIGHBOURS @ strides:
        keep = centre >= values[at + offset]
        at, centre = at[keep], centre[keep]
    z, rest = np.divmod(at, strides[0])
    y, x = np.divmod(rest, strides[1])
    return np.stack([z - 1, y - 1, x - 1], axis=1).astype(np.intp)


def bounding_box(mask: NDArray[np.bool_]) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty mask (as
    ``ndimage.find_objects``, without its uint8 copy and labelled scan of the whole grid)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _blur(grid: NDArray[np.float32], sigmas: list[float]) -> list[NDArray[np.float32]]:
    """``grid`` smoothed by a Gaussian of each sigma (voxels), two at a time: SciPy's filters
    release the GIL, so two threads use both cores of a small machine."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only here

    def blur(sigma: float) -> NDArray[np.float32]:
        return np.asarray(ndimage.gaussian_filter(grid, sigma, mode="nearest"))

    with ThreadPoolExecutor(max_workers=BLUR_THREADS) as pool:
        return list(pool.map(blur, sigmas))


def _octaves(sigmas_mm: tuple[float, ...], spacing_mm: float) -> list[tuple[int, list[float]]]:
    """Group the sigmas by the grid they run on: a level runs on the coarsest grid (the model
    grid halved, 1, 2 or 3 times) on which its sigma is still at least 1.5 voxels."""
    groups: dict[int, list[float]] = {}
    for s in sigmas_mm:
        factor = 1
        while factor < 4 and s / (spacing_mm * factor * 2) >= 1.5:
            factor *= 2
        groups.setdefault(factor, []).append(s)
    return sorted(groups.items())


def _shrink(volume: NDArray[np.float32], factor: int) -> NDArray[np.float32]:
    """Mean of each ``factor``³ block (the incomplete blocks at the far edges dropped)."""
    z, y, x = (n // factor * factor for n in volume.shape)
    v = volume[:z, :y, :x]
    return np.asarray(
        v.reshape(z // factor, factor, y // factor, factor, x // factor, factor).mean(
            axis=(1, 3, 5), dtype=np.float32
        )
    )


def _suppress(
    centres_mm: NDArray[np.float64],
    radius: NDArray[np.float64],
    values: NDArray[np.float64],
    n: int,
) -> NDArray[np.intp]:
    """Indices of the strongest peaks, each suppressing weaker ones closer than the smaller of
    the two radii (the same blob seen at two scales; a small nodule beside a large structure
    survives)."""
    from scipy.spatial import cKDTree  # noqa: PLC0415 - only here

    order = np.argsort(-values, kind="stable")
    tree = cKDTree(centres_mm)
    taken = np.zeros(len(values), dtype=bool)
    gone = np.zeros(len(values), dtype=bool)
    kept: list[int] = []
    reach = float(radius.max())
    for i in order:
        if gone[i]:
            continue
        kept.append(int(i))
        taken[i] = True
        if len(kept) >= n:
            break
        near = np.asarray(tree.query_ball_point(centres_mm[i], reach), dtype=np.intp)
        if len(near):
            d = np.linalg.norm(centres_mm[near] - centres_mm[i], axis=1)
            gone[near[d < np.minimum(radius[near], radius[i])]] = True
    return np.asarray(kept, dtype=np.intp)


def _ball(radius: int) -> NDArray[np.bool_]:
    r = np.arange(-radius, radius + 1)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return np.asarray(z * z + y * y + x * x <= radius * radius)


def _inside(tissue: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Where no body mask is known: the holes of each slice's tissue."""
    out = np.empty_like(tissue)
    for k in range(tissue.shape[0]):
        out[k] = ndimage.binary_fill_holes(tissue[k]) & ~tissue[k]
    return out
