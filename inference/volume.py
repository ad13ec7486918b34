"""DICOM series to a 3D volume in Hounsfield units, with its geometry in patient coordinates.

Slices are ordered by their position along the slice normal (not by Instance Number; the Instance
Numbers are kept, in volume order, for viewers that number images as the PACS does), the
rescale is applied, and the geometry is checked: a series with gantry tilt, a missing slice or
irregular spacing is refused with the reason, so that findings are never placed in the wrong
spot. Compressed transfer syntaxes decode through pydicom's pixel handlers and the pylibjpeg
plugins.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset

# How far positions may stray from a regular grid before the series is refused.
SPACING_TOLERANCE = 0.1  # fraction of the median slice spacing
ORTHOGONALITY_TOLERANCE = 1e-3  # |row · col| of the direction cosines
TILT_TOLERANCE_MM = 0.5  # in-plane drift of slice origins over the whole series


class VolumeError(ValueError):
    """The series cannot be turned into a volume; the message gives the reason."""


@dataclass(frozen=True)
class Volume:
    """A series as an array ``hu[k, row, column]`` (k along the slice normal) and its geometry.

    The patient position (LPS, mm) of voxel (k, r, c) is
    ``origin + k * spacing[0] * normal + r * spacing[1] * col_dir + c * spacing[2] * row_dir``,
    where ``row_dir`` and ``col_dir`` are the first and second triplets of Image Orientation
    (Patient): the direction along a row (increasing column) and down a column (increasing row).
    """

    hu: NDArray[np.float32]
    origin: NDArray[np.float64]
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    normal: NDArray[np.float64]
    spacing: tuple[float, float, float]  # (between slices, between rows, between columns)
    sop_uids: tuple[str, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    files: tuple[Path, ...] = ()  # the source file of each slice, in volume order
    instance_numbers: tuple[int | None, ...] = ()  # each slice's Instance Number, volume order

    @property
    def affine(self) -> NDArray[np.float64]:
        """4×4 matrix from (k, row, column, 1) to patient (x, y, z, 1)."""
        m = np.eye(4)
        m[:3, 0] = self.normal * self.spacing[0]
        m[:3, 1] = self.col_dir * self.spacing[1]
        m[:3, 2] = self.row_dir * self.spacing[2]
        m[:3, 3] = self.origin
        return m

    def to_patient(self, index: NDArray[np.floating] | Sequence[float]) -> NDArray[np.float64]:
        """Patient coordinates (mm) of voxel indices (..., 3) in (k, row, column) order."""
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(idx @ self.affine[:3, :3].T + self.origin)

    def to_index(self, point: NDArray[np.floating] | Sequence[float]) -> NDArray[np.float64]:
        """Fractional voxel indices (k, row, column) of patient points (..., 3)."""
        p = np.asarray(point, dtype=np.float64) - self.origin
        return np.asarray(p @ np.linalg.inv(self.affine[:3, :3]).T)


def load_series(files: Sequence[Path]) -> Volume:
    """Read one series' files into a :class:`Volume`; raises VolumeError with the reason."""
    if len(files) < 2:
        raise VolumeError(f"a volume needs at least 2 slices, the series has {len(files)}")
    headers = [_header(f) for f in files]
    first = headers[0]
    _same_series(headers)
    row_dir, col_dir = _orientation(first)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    order = np.argsort(positions @ normal)
    positions = positions[order]
    spacing_k = _check_spacing(positions, normal, [headers[i] for i in order])
    rows, cols = int(first.Rows), int(first.Columns)
    pixel_spacing = [float(v) for v in first.PixelSpacing]
    hu = np.empty((len(files), rows, cols), dtype=np.float32)
    sop_uids = []
    for k, i in enumerate(order):
        ds = _read_pixels(files[i])
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeError(
                f"slice {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, the series {rows}x{cols}"
            )
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        hu[k] = ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        sop_uids.append(str(ds.SOPInstanceUID))
    return Volume(
        hu=hu,
        origin=positions[0],
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        spacing=(spacing_k, pixel_spacing[0], pixel_spacing[1]),
        sop_uids=tuple(sop_uids),
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(getattr(first, "FrameOfReferenceUID", "")),
        files=tuple(files[i] for i in order),
        instance_numbers=tuple(_instance_number(headers[i]) for i in order),
    )


def _instance_number(ds: Dataset) -> int | None:
    """Instance Number (Type 2 in CT: it may be empty), or None when absent or not an integer."""
    value = ds.get("InstanceNumber")
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def _header(path: Path) -> Dataset:
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise VolumeError(f"{path.name} cannot be read: {exc}") from exc
    missing = [k for k in REQUIRED if k not in ds]
    if missing:
        raise VolumeError(f"slice {ds.get('SOPInstanceUID', path.name)} lacks {', '.join(missing)}")
    return ds


def _read_pixels(path: Path) -> Dataset:
    try:
        ds = dcmread(path)
        # A decoder that has to warn (short segments, bad padding) read damaged data: refuse
        # the slice rather than show the detector something that is not the image.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds.pixel_array  # noqa: B018 - decode now, so that a corrupt block names its slice
    except Exception as exc:
        raise VolumeError(f"pixel data of {path.name} cannot be decoded: {exc}") from exc
    return ds


def _same_series(headers: list[Dataset]) -> None:
    series = {str(h.SeriesInstanceUID) for h in headers}
    if len(series) > 1:
        raise VolumeError(f"the files belong to {len(series)} series; load one at a time")


def _orientation(ds: Dataset) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise VolumeError("Image Orientation (Patient) is not made of unit vectors")
    if abs(row_dir @ col_dir) > ORTHOGONALITY_TOLERANCE:
        raise VolumeError("Image Orientation (Patient) rows and columns are not orthogonal")
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)


def _check_spacing(
    positions: NDArray[np.float64], normal: NDArray[np.float64], headers: list[Dataset]
) -> float:
    """The slice spacing, after checking that slices lie on a regular grid along the normal."""
    along = positions @ normal
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise VolumeError(
            f"slices {headers[k].SOPInstanceUID} and {headers[k + 1].SOPInstanceUID} share a "
            "position: duplicate or overlapping slices"
        )
    median = float(np.median(steps))
    # Gantry tilt: slice origins drift within the image plane instead of moving along the normal.
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    if float(np.abs(drift).max()) > TILT_TOLERANCE_MM:
        raise VolumeError(
            f"slice origins drift {np.abs(drift).max():.1f} mm within the image plane "
            "(gantry tilt or a sheared series); reconstruct without tilt"
        )
    bad = np.nonzero(np.abs(steps - median) > SPACING_TOLERANCE * median)[0]
    if bad.size:
        k = int(bad[0])
        gap = float(steps[k])
        kind = "a missing slice" if gap > 1.5 * median else "irregular spacing"
        raise VolumeError(
            f"{kind}: {gap:.2f} mm between slices {headers[k].SOPInstanceUID} and "
            f"{headers[k + 1].SOPInstanceUID}, {median:.2f} mm elsewhere"
        )
    return median
