"""The one preprocessing function, shared by inference and training (torch-free).

A volume is brought to the model's frame as its card declares: axes reordered and flipped so
that columns run to the patient's left, rows to posterior and slices to superior (DICOM LPS,
the frame of an axial head-first supine scan), resampled to the model's voxel spacing with
linear interpolation, and Hounsfield units clipped to a window and scaled to 0..1. The affine of
the result maps its voxel indices back to patient millimetres, so that findings in model space
return to the patient exactly. Train/serve skew would be a bug: both sides call this function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .volume import Volume

AXIS_TOLERANCE = 0.02  # how far direction cosines may be from a patient axis (≈ 1.1°)
BODY_HU = -500.0  # tissue; the lungs (about -850 HU) are inside the body as holes of it


class PreprocessError(ValueError):
    """The volume cannot be brought to the model's frame; the message says why."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects (from its card)."""

    spacing_mm: tuple[float, float, float]  # (slice, row, column) = (z, y, x) in LPS
    hu_window: tuple[float, float]  # clipped to this range, then scaled to 0..1

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.spacing_mm):
            raise PreprocessError(f"spacing must be positive, got {self.spacing_mm}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise PreprocessError(f"HU window must be (low, high), got {self.hu_window}")


@dataclass(frozen=True)
class Preprocessed:
    """The model's input, ``array[z, y, x]`` in 0..1, and its voxel-to-patient affine."""

    array: NDArray[np.float32]
    affine: NDArray[np.float64]  # (k, row, column, 1) -> patient (x, y, z, 1)
    # Voxels inside the patient (see body_mask); None: not known, nothing is excluded.
    body: NDArray[np.bool_] | None = None

    def to_patient(self, index: NDArray[np.floating]) -> NDArray[np.float64]:
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(idx @ self.affine[:3, :3].T + self.affine[:3, 3])


def preprocess(volume: Volume, spec: PreprocessSpec, body: bool = True) -> Preprocessed:
    """Reorient to LPS, resample to ``spec.spacing_mm`` and window/scale HU to 0..1; with
    ``body`` also find the patient's body on the result (``Preprocessed.body``; the two-stage
    detector's fine grid and first-stage input need none: the lungs are found on a coarse
    grid, and the body mask of a 1 mm lung box costs half a second)."""
    hu, affine = to_lps(volume)
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    zoom = spacing_in / np.asarray(spec.spacing_mm)
    if np.allclose(zoom, 1.0, atol=1e-6):
        resampled = hu
    else:
        resampled = ndimage.zoom(hu, zoom, order=1, mode="nearest", grid_mode=False)
    # With grid_mode=False the first and last voxel centres stay in place: the new spacing is
    # the extent divided by the new number of intervals.
    extent = (np.asarray(hu.shape) - 1) * spacing_in
    steps = np.maximum(np.asarray(resampled.shape) - 1, 1)
    new_spacing = np.where(np.asarray(hu.shape) > 1, extent / steps, spacing_in)
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] / spacing_in * new_spacing
    lo, hi = spec.hu_window
    array = np.clip(resampled, lo, hi, out=np.empty_like(resampled, dtype=np.float32))
    array -= np.float32(lo)
    array *= np.float32(1.0 / (hi - lo))
    return Preprocessed(array=array, affine=out_affine, body=body_mask(resampled) if body else None)


def to_lps(volume: Volume) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """The volume with axes (z, y, x) increasing towards superior, posterior and left, and the
    matching affine; only axis-aligned series (any of the 48 axis orders and flips)."""
    directions = volume.affine[:3, :3] / np.asarray(volume.spacing)  # columns: k, row, column
    patient_axis = np.argmax(np.abs(directions), axis=0)  # which of x, y, z each array axis runs
    if len(set(patient_axis.tolist())) != 3 or np.any(
        np.abs(np.abs(directions).max(axis=0) - 1.0) > AXIS_TOLERANCE
    ):
        raise PreprocessError(
            "the series is oblique (its axes are not along the patient's axes); "
            "reformat it to axial slices"
        )
    hu = volume.hu
    affine = volume.affine.copy()
    # Flip array axes that run against the patient axis.
    for axis in range(3):
        if directions[patient_axis[axis], axis] < 0:
            hu = np.flip(hu, axis=axis)
            n = hu.shape[axis]
            affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1)
            affine[:3, axis] = -affine[:3, axis]
    # Reorder array axes to (z, y, x).
    order = [int(np.nonzero(patient_axis == target)[0][0]) for target in (2, 1, 0)]
    hu = np.ascontiguousarray(np.transpose(hu, order), dtype=np.float32)
    reordered = np.eye(4)
    reordered[:3, :3] = affine[:3, :3][:, order]
    reordered[:3, 3] = affine[:3, 3]
    return hu, reordered


def body_mask(hu: NDArray[np.float32]) -> NDArray[np.bool_]:
    """The patient's body on an LPS (z, y, x) grid: voxels above BODY_HU with the holes of each
    axial slice filled (lungs and airways lie inside the body's ring), then the largest
    connected part (the table, clothing and air are out). A finding outside it is not in the
    patient. Where a field of view cuts through the body, the image edge closes its ring:
    along each edge the body touches, everything between the first and the last body pixel
    counts as wall, so the lungs of a cut chest stay inside."""
    tissue = hu > BODY_HU
    body = np.empty_like(tissue)
    for k in range(tissue.shape[0]):
        body[k] = _fill_closed_by_edges(tissue[k])
    labels, count = ndimage.label(body)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        body = labels == int(sizes.argmax())
    return body


def _fill_closed_by_edges(tissue: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Fill the holes of one slice's tissue, treating the stretch of each image edge between
    the first and last tissue pixel as closed (the body continues beyond the field of view)."""
    framed = np.pad(tissue, 1, constant_values=False)
    for edge in (framed[1, 1:-1], framed[-2, 1:-1], framed[1:-1, 1], framed[1:-1, -2]):
        touching = np.flatnonzero(edge)
        if len(touching) > 1:
            edge[touching[0] : touching[-1] + 1] = True
    filled = ndimage.binary_fill_holes(framed)[1:-1, 1:-1]
    return np.asarray(filled | tissue)
