"""DICOM series to a 3D volume in Hounsfield units, with its geometry in patient coordinates.

Slices are ordered by their position along the slice normal (not by Instance Number; the Instance
Numbers are kept, in volume order, for viewers that number images as the PACS does), the
rescale is applied, and the geometry is checked: a series with gantry tilt, a missing slice or
irregular spacing is refused with the reason, so that findings are never placed in the wrong
spot. Compressed transfer syntaxes decode through pydicom's pixel handlers and the pylibjpeg
plugins.

A series is either single-frame images (CT Image Storage: one slice a file) or multi-frame
instances with functional groups (Enhanced CT Image Storage, Legacy Converted Enhanced CT Image
Storage: one slice a frame; usually one instance holds the whole series). A frame's position
comes from its Per-Frame Functional Groups (Plane Position Sequence); its orientation, pixel
spacing and rescale from its own or the Shared Functional Groups. Frames are ordered along the
normal like single-frame slices, whatever their order in the file, and each slice keeps its frame
number (:attr:`Volume.frames`). A series mixing the two kinds is refused.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import iter_pixels

# How far positions may stray from a regular grid before the series is refused.
SPACING_TOLERANCE = 0.1  # fraction of the median slice spacing
ORTHOGONALITY_TOLERANCE = 1e-3  # |row · col| of the direction cosines
TILT_TOLERANCE_MM = 0.5  # in-plane drift of slice origins over the whole series
# How far one slice's direction cosines (and pixel spacing, relative) may differ from another's.
SAME_ORIENTATION_TOLERANCE = 1e-3
SAME_PIXEL_SPACING_TOLERANCE = 1e-3


class VolumeError(ValueError):
    """The series cannot be turned into a volume; the message gives the reason."""


@dataclass(frozen=True)
class Volume:
    """A series as an array ``hu[k, row, column]`` (k along the slice normal) and its geometry.

    The patient position (LPS, mm) of voxel (k, r, c) is
    ``origin + k * spacing[0] * normal + r * spacing[1] * col_dir + c * spacing[2] * row_dir``,
    where ``row_dir`` and ``col_dir`` are the first and second triplets of Image Orientation
    (Patient): the direction along a row (increasing column) and down a column (increasing row).

    ``sop_uids``, ``files``, ``instance_numbers`` and ``frames`` run parallel to k. For a
    multi-frame instance every one of its frames repeats the instance's SOP Instance UID and
    file; ``frames[k]`` is then the slice's frame number in that instance (1-based, as DICOM
    references it: Referenced Frame Number), None for single-frame images. ``instance_numbers[k]``
    is the image number a PACS shows for the slice: the Instance Number of a single-frame
    image, the frame number of a frame (all the frames of an instance share its Instance
    Number, which would not tell them apart).
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
    instance_numbers: tuple[int | None, ...] = ()  # each slice's image number (see above)
    frames: tuple[int | None, ...] = ()  # each slice's frame number (None: single-frame image)

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

    def slice_of(self, sop_instance_uid: str, frame: int | None = None) -> int:
        """k of an image (``frame`` None) or of frame ``frame`` of a multi-frame instance;
        ValueError when the series has no such slice."""
        frames = self.frames or (None,) * len(self.sop_uids)
        for k, (uid, f) in enumerate(zip(self.sop_uids, frames, strict=True)):
            if uid == sop_instance_uid and f == frame:
                return k
        where = sop_instance_uid if frame is None else f"frame {frame} of {sop_instance_uid}"
        raise ValueError(f"{where} is not a slice of series {self.series_uid}")


@dataclass(frozen=True)
class SliceSource:
    """Where slice k of a volume comes from: its instance's header (without pixel data; one
    Dataset shared by all the frames of a multi-frame instance) and its frame number in that
    instance (None for a single-frame image)."""

    header: Dataset
    frame: int | None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.SOPClassUID)


def slice_sources(volume: Volume) -> list[SliceSource]:
    """The source of each slice of ``volume``, in volume order (k), reading each file once."""
    headers: dict[Path, Dataset] = {}
    frames = volume.frames or (None,) * len(volume.files)
    sources = []
    for path, frame in zip(volume.files, frames, strict=True):
        if path not in headers:
            headers[path] = dcmread(path, stop_before_pixels=True)
        sources.append(SliceSource(headers[path], frame))
    return sources


def in_volume_order(
    headers: Sequence[Dataset],
) -> tuple[list[Dataset], list[int | None]]:
    """The slices of a series' instance headers in volume order (along the slice normal): each
    single-frame image once (frame None), each multi-frame instance once per frame (with the
    frame number), as ``Volume`` orders them. ValueError when a slice has no position."""
    slices: list[tuple[float, Dataset, int | None]] = []
    normal: NDArray[np.float64] | None = None
    for ds in headers:
        frames: list[int | None] = (
            list(range(1, frame_count(ds) + 1)) if is_multiframe(ds) else [None]
        )
        for frame in frames:
            if frame is None:
                position, orientation = (
                    ds.get("ImagePositionPatient"),
                    ds.get("ImageOrientationPatient"),
                )
            else:
                position = frame_attribute(
                    ds, frame, "PlanePositionSequence", "ImagePositionPatient"
                )
                orientation = frame_attribute(
                    ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"
                )
            if position is None or orientation is None:
                where = str(ds.get("SOPInstanceUID", "?"))
                if frame is not None:
                    where = f"frame {frame} of {where}"
                raise ValueError(f"{where} has no position")
            if normal is None:
                iop = np.array([float(v) for v in orientation], dtype=np.float64)
                normal = np.cross(iop[:3], iop[3:])
            along = float(np.array([float(v) for v in position], dtype=np.float64) @ normal)
            slices.append((along, ds, frame))
    slices.sort(key=lambda s: s[0])
    return [s[1] for s in slices], [s[2] for s in slices]


def is_multiframe(ds: Dataset) -> bool:
    """Whether ``ds`` is a multi-frame image with functional groups (Enhanced CT and the like),
    whose frame geometry lies in the Shared and Per-Frame Functional Groups Sequences."""
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def frame_count(ds: Dataset) -> int:
    """Number of Frames (1 where absent, empty or not a positive integer)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def frame_attribute(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` in the functional group macro ``sequence`` (e.g. "PlanePositionSequence",
    "ImagePositionPatient") of the 1-based ``frame`` of a multi-frame instance: from the
    frame's Per-Frame Functional Groups item, else from the Shared Functional Groups (a macro
    lies in one or the other); None where neither holds a value."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = []
    if per_frame and 1 <= frame <= len(per_frame):
        groups.append(per_frame[frame - 1])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        macro = group.get(sequence)
        if macro:
            value = macro[0].get(keyword)
            if value is not None and value != "":
                return value
    return None


@dataclass(frozen=True)
class _Slice:
    """One slice of the series, before ordering: a single-frame file or a frame of one."""

    file: int  # index into the files
    frame: int | None  # 1-based frame number; None for a single-frame image
    uid: str
    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    instance_number: int | None

    @property
    def name(self) -> str:
        """The SOP Instance UID, and the frame number for a frame of a multi-frame instance."""
        return self.uid if self.frame is None else f"{self.uid} frame {self.frame}"


def load_series(files: Sequence[Path]) -> Volume:
    """Read one series' files into a :class:`Volume`; raises VolumeError with the reason."""
    if len(files) < 1:
        raise VolumeError("a volume needs at least 2 slices, the series has 0")
    headers = [_header(f) for f in files]
    _same_series(headers)
    multi = [is_multiframe(h) for h in headers]
    if any(multi) and not all(multi):
        uids = ", ".join(
            str(h.get("SOPInstanceUID", "")) for h, m in zip(headers, multi, strict=True) if m
        )
        raise VolumeError(
            f"the series mixes {multi.count(False)} single-frame images with "
            f"{multi.count(True)} multi-frame instances ({uids}); load the multi-frame "
            "instances on their own"
        )
    count = sum(frame_count(h) if m else 1 for h, m in zip(headers, multi, strict=True))
    if count < 2:
        raise VolumeError(f"a volume needs at least 2 slices, the series has {count}")
    slices = [
        s
        for i, (h, m) in enumerate(zip(headers, multi, strict=True))
        for s in (_frames(i, h) if m else [_single(i, h, files[i])])
    ]
    first = headers[0]
    rows, cols = int(first.Rows), int(first.Columns)
    for h in headers:
        if (int(h.Rows), int(h.Columns)) != (rows, cols):
            raise VolumeError(
                f"slice {h.SOPInstanceUID} is {h.Rows}x{h.Columns}, the series {rows}x{cols}"
            )
    row_dir, col_dir = _orientation(slices)
    pixel_spacing = _pixel_spacing(slices)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([s.position for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    slices = [slices[i] for i in order]
    spacing_k = _check_spacing(positions, normal, [s.name for s in slices])

    hu = np.empty((len(slices), rows, cols), dtype=np.float32)
    where: dict[tuple[int, int | None], int] = {(s.file, s.frame): k for k, s in enumerate(slices)}
    for i, path in enumerate(files):
        if multi[i]:
            _read_frames(path, i, slices, where, hu)
        else:
            k = where[(i, None)]
            pixels = _read_pixels(path).pixel_array
            hu[k] = _rescale(pixels, slices[k])
    return Volume(
        hu=hu,
        origin=positions[0],
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        spacing=(spacing_k, pixel_spacing[0], pixel_spacing[1]),
        sop_uids=tuple(s.uid for s in slices),
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(getattr(first, "FrameOfReferenceUID", "")),
        files=tuple(files[s.file] for s in slices),
        instance_numbers=tuple(s.instance_number for s in slices),
        frames=tuple(s.frame for s in slices),
    )


def _rescale(pixels: NDArray[Any], s: _Slice) -> NDArray[np.float32]:
    return np.asarray(
        pixels.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept),
        dtype=np.float32,
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
        return dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise VolumeError(f"{path.name} cannot be read: {exc}") from exc


def _floats(value: Any, n: int) -> NDArray[np.float64] | None:
    """``value`` as n floats, or None when it is not n numbers."""
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return np.array(values) if len(values) == n else None


def _number(value: Any, default: float) -> float:
    try:
        return default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default


def _single(index: int, ds: Dataset, path: Path) -> _Slice:
    uid = str(ds.get("SOPInstanceUID", path.name))
    missing = [k for k in REQUIRED if k not in ds]
    if missing:
        raise VolumeError(f"slice {uid} lacks {', '.join(missing)}")
    if frame_count(ds) > 1:
        raise VolumeError(
            f"slice {uid} has {frame_count(ds)} frames but no functional groups (not an "
            "Enhanced CT image): its frames have no positions"
        )
    position = _floats(ds.ImagePositionPatient, 3)
    orientation = _floats(ds.ImageOrientationPatient, 6)
    spacing = _floats(ds.PixelSpacing, 2)
    if position is None or orientation is None or spacing is None:
        raise VolumeError(
            f"slice {uid}: Image Position (Patient), Image Orientation (Patient) or Pixel "
            "Spacing is not 3, 6 or 2 numbers"
        )
    return _Slice(
        file=index,
        frame=None,
        uid=uid,
        position=position,
        orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slope=_number(ds.get("RescaleSlope"), 1.0) or 1.0,
        intercept=_number(ds.get("RescaleIntercept"), 0.0),
        instance_number=_instance_number(ds),
    )


def _frames(index: int, ds: Dataset) -> list[_Slice]:
    """The slices of a multi-frame instance, one a frame, in frame order."""
    uid = str(ds.get("SOPInstanceUID", ""))
    missing = [k for k in ("Rows", "Columns", "NumberOfFrames") if k not in ds]
    if missing:
        raise VolumeError(f"multi-frame instance {uid} lacks {', '.join(missing)}")
    n = frame_count(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n:
        raise VolumeError(
            f"multi-frame instance {uid} has {n} frames but {len(per_frame)} items in its "
            "Per-Frame Functional Groups Sequence"
        )
    slices = []
    for frame in range(1, n + 1):
        name = f"{uid} frame {frame}"
        position = _floats(
            frame_attribute(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3
        )
        if position is None:
            raise VolumeError(f"{name} has no Image Position (Patient) (Plane Position Sequence)")
        iop = frame_attribute(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        orientation = _floats(iop if iop is not None else ds.get("ImageOrientationPatient"), 6)
        if orientation is None:
            raise VolumeError(
                f"{name} has no Image Orientation (Patient) (Plane Orientation Sequence)"
            )
        ps = frame_attribute(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        spacing = _floats(ps if ps is not None else ds.get("PixelSpacing"), 2)
        if spacing is None:
            raise VolumeError(f"{name} has no Pixel Spacing (Pixel Measures Sequence)")
        slope = frame_attribute(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = frame_attribute(
            ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"
        )
        slices.append(
            _Slice(
                file=index,
                frame=frame,
                uid=uid,
                position=position,
                orientation=orientation,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slope=_number(slope if slope is not None else ds.get("RescaleSlope"), 1.0) or 1.0,
                intercept=_number(
                    intercept if intercept is not None else ds.get("RescaleIntercept"), 0.0
                ),
                instance_number=frame,
            )
        )
    return slices


def _decode_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the pixel data could not be decoded: any Exception, and the panic of
    a Rust decoder (pylibjpeg-rle's on some damaged RLE segments), which pyo3 raises as a
    PanicException deriving from BaseException only; not KeyboardInterrupt and the like."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class DamagedPixelDataError(Exception):
    """A pixel decoder warned while decoding: it read damaged data (short segments, bad
    padding), which is refused rather than shown to the detector or a reader."""


# The warnings filters are the process's, not a thread's (Python 3.11): a decode that set them to
# "error" turned a warning of another thread of the review app (Gradio's analytics, in pandas)
# into an exception there, and two decodes at once could restore each other's filters. Decodes
# take this lock and record warnings ("always") instead; what the pixel decoders warned is this
# decode's, any other thread's warning in the window is passed on as it was.
_WARNINGS_LOCK = threading.Lock()
_DECODER_PACKAGES = ("pydicom", "pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "PIL", "numpy")


@contextmanager
def _decoder_warnings() -> Iterator[Callable[[], None]]:
    """Within the block, ``check()`` raises DamagedPixelDataError if a pixel decoder warned since
    the block began; other warnings are shown as usual when it ends."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def check() -> None:
            for w in caught:
                if _from_decoder(w):
                    raise DamagedPixelDataError(f"{w.category.__name__}: {w.message}")

        try:
            yield check
        finally:
            others = [w for w in caught if not _from_decoder(w)]
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _from_decoder(w: warnings.WarningMessage) -> bool:
    parts = Path(w.filename).parts
    return any(p.startswith(_DECODER_PACKAGES) for p in parts) or w.filename == __file__


def _read_pixels(path: Path) -> Dataset:
    try:
        ds = dcmread(path)
        # A decoder that has to warn (short segments, bad padding) read damaged data: refuse
        # the slice rather than show the detector something that is not the image.
        with _decoder_warnings() as check:
            ds.pixel_array  # noqa: B018 - decode now, so that a corrupt block names its slice
            check()
    except BaseException as exc:
        if not _decode_failure(exc):
            raise
        raise VolumeError(f"pixel data of {path.name} cannot be decoded: {exc}") from exc
    return ds


def _read_frames(
    path: Path,
    index: int,
    slices: list[_Slice],
    where: dict[tuple[int, int | None], int],
    hu: NDArray[np.float32],
) -> None:
    """Decode a multi-frame instance's pixel data once, frame by frame (only one decoded frame
    is held at a time), into its slices of ``hu``."""
    try:
        ds = dcmread(path)
    except Exception as exc:
        raise VolumeError(f"pixel data of {path.name} cannot be read: {exc}") from exc
    frame = 0
    try:
        with _decoder_warnings() as check:  # as in _read_pixels: a warning means damaged data
            for number, pixels in enumerate(iter_pixels(ds), start=1):
                check()  # what decoding frame ``number`` warned
                frame = number
                k = where[(index, frame)]
                hu[k] = _rescale(pixels, slices[k])
    except BaseException as exc:
        if not _decode_failure(exc):
            raise
        raise VolumeError(
            f"pixel data of {path.name} frame {frame + 1} cannot be decoded: {exc}"
        ) from exc
    if frame != frame_count(ds):
        raise VolumeError(
            f"pixel data of {path.name} holds {frame} frames, Number of Frames says "
            f"{frame_count(ds)}"
        )


def _same_series(headers: list[Dataset]) -> None:
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise VolumeError(f"the files belong to {len(series)} series; load one at a time")


def _orientation(slices: list[_Slice]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    iop = slices[0].orientation
    for s in slices[1:]:
        if float(np.abs(s.orientation - iop).max()) > SAME_ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"slices {slices[0].name} and {s.name} differ in Image Orientation (Patient): "
                "not one stack of parallel slices"
            )
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise VolumeError("Image Orientation (Patient) is not made of unit vectors")
    if abs(row_dir @ col_dir) > ORTHOGONALITY_TOLERANCE:
        raise VolumeError("Image Orientation (Patient) rows and columns are not orthogonal")
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)


def _pixel_spacing(slices: list[_Slice]) -> tuple[float, float]:
    spacing = slices[0].pixel_spacing
    for s in slices[1:]:
        if any(
            abs(a - b) > SAME_PIXEL_SPACING_TOLERANCE * b
            for a, b in zip(s.pixel_spacing, spacing, strict=True)
        ):
            raise VolumeError(
                f"slices {slices[0].name} and {s.name} differ in Pixel Spacing "
                f"({spacing[0]:g}\\{spacing[1]:g} and {s.pixel_spacing[0]:g}\\"
                f"{s.pixel_spacing[1]:g} mm)"
            )
    return spacing


def _check_spacing(
    positions: NDArray[np.float64], normal: NDArray[np.float64], names: list[str]
) -> float:
    """The slice spacing, after checking that slices lie on a regular grid along the normal.
    ``names`` name the slices (UID, and frame number for a frame) in the same order."""
    along = positions @ normal
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise VolumeError(
            f"slices {names[k]} and {names[k + 1]} share a position: duplicate or overlapping "
            "slices"
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
            f"{kind}: {gap:.2f} mm between slices {names[k]} and {names[k + 1]}, "
            f"{median:.2f} mm elsewhere"
        )
    return median
