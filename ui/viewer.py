"""The review app's image renderer: one axial slice of a series as an RGB picture, with the AI
result drawn over it.

- The slice is windowed with the linear VOI LUT function of PS3.3 C.11.2.1.2 (Window Center and
  Window Width), as PACS viewers do, in its stored row and column order.
- Contours come from the result's DICOM SEG (PS3.3 A.51): each frame is placed on the slice whose
  SOP Instance UID its Derivation Image Sequence names, and belongs to the finding whose id its
  segment's Tracking ID (``Nodule {id}``, see ``inference.results_common``) carries. Without a
  SEG, the findings' in-memory masks serve (a result fresh from ``inference.pipeline``).
- Boxes come from each finding's ``bbox_mm`` (patient LPS mm), mapped to pixels with the series
  affine; a box is drawn on every slice its bbox spans, with the finding id beside it.

Everything the pictures need is prepared when the study opens (windowing aside): the SEG frames
are decoded once and kept as small crops, and each slice's contour pixels are worked out the
first time the slice is shown, then cached. Torch-free, as the whole serving path.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import operator
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from aidx.config import NodeConfig
from aidx.deflate import InflateLimitError, read_header
from inference.findings import Finding, FindingsReport
from inference.results_common import RGB, finding_colour
from inference.volume import Volume, load_series

from .overlays import _mask_pieces, _Piece, _read_seg, _seg_pieces, _seg_series

log = logging.getLogger("aidx.ui.viewer")
# A stored deflated file is inflated only up to the node's default maximum data set size.
MAX_INFLATED_BYTES = NodeConfig().max_dataset_bytes


class WindowLevel(NamedTuple):
    window: float  # Window Width, HU
    level: float  # Window Center, HU


WINDOW_PRESETS: dict[str, WindowLevel] = {
    "lung": WindowLevel(1500.0, -600.0),
    "mediastinum": WindowLevel(350.0, 50.0),
    "bone": WindowLevel(2000.0, 500.0),
}

# Black to the eye, never (0, 0, 0): the marks layer (viewer_session.render_marks) takes
# (0, 0, 0) for "nothing drawn".
LABEL_BACKGROUND: RGB = (0, 0, 1)
BOX_MARGIN = 3  # pixels between a bbox edge and its drawn box: clear of the 2-pixel contour
THUMBNAIL_CONTEXT_MM = 40.0  # field of view of a thumbnail around a small finding
SQUARE = np.ones((3, 3), dtype=bool)


def window_gray(hu: NDArray[np.floating], window: float, level: float) -> NDArray[np.uint8]:
    """HU to 8-bit grey with the linear VOI LUT function (PS3.3 C.11.2.1.2.1):
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``, clipped; ``w`` at least 1."""
    _check_window(window, level)
    if window == 1.0:
        return np.where(hu <= level - 0.5, 0, 255).astype(np.uint8)
    gain = 255.0 / (window - 1.0)
    # +0.5 rounds to nearest on the truncating cast (the values are >= 0 after clipping).
    offset = (0.5 - (level - 0.5) / (window - 1.0)) * 255.0 + 0.5
    scaled = hu.astype(np.float32, copy=False) * np.float32(gain)
    scaled += np.float32(offset)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


def _check_window(window: float, level: float) -> None:
    if not (math.isfinite(window) and math.isfinite(level)) or window < 1.0:
        raise ValueError(
            f"window {window} / level {level}: the window must be a number >= 1 HU and the "
            "level a finite number"
        )


def display_order(volume: Volume) -> tuple[int, ...]:
    """The volume's slice indices in the order a radiologist scrolls them.

    That is the PACS's order: by Instance Number, when every slice has a distinct one and
    they rise or fall steadily along the series. Otherwise, the usual hanging: an axial
    series from the head down, a sagittal one from the patient's right, a coronal one from the
    front (volume index k rises along the slice normal, in LPS coordinates).
    """
    n = len(volume.sop_uids)
    forward, backward = tuple(range(n)), tuple(range(n - 1, -1, -1))
    numbers = volume.instance_numbers
    if len(numbers) == n and all(x is not None for x in numbers):
        steps = np.diff(np.asarray(numbers, dtype=np.int64))
        if (steps > 0).all():
            return forward
        if (steps < 0).all():
            return backward
    axis = int(np.argmax(np.abs(volume.normal)))
    towards = float(volume.normal[axis])
    # LPS: +z is the head (show the highest first); +x is the patient's left and +y the back
    # (show the lowest first).
    reverse = towards > 0 if axis == 2 else towards < 0
    return backward if reverse else forward


@dataclass(frozen=True)
class _Outline:
    """Pixels just outside one finding's mask on one slice, a 1-pixel and a 2-pixel ring, as
    indices into the flattened slice."""

    finding_id: int
    thin: NDArray[np.int32]
    thick: NDArray[np.int32]


@dataclass(frozen=True)
class _Box:
    """A finding's bbox in index space: the slices it spans and its pixel rectangle."""

    finding_id: int
    k0: int
    k1: int
    r0: int
    r1: int
    c0: int
    c1: int


class StudyView:
    """One series with its AI findings and their contours, rendered slice by slice.

    Safe to share between the app's request threads: rendering reads only, and the contour
    cache at worst works a slice out twice.
    """

    def __init__(
        self,
        volume: Volume,
        findings: Sequence[Finding] = (),
        seg: hd.seg.Segmentation | None = None,
        seg_name: str = "SEG",
    ) -> None:
        """``findings`` on ``volume``'s series; contours from ``seg`` when given, else from the
        findings' masks (those without one get a box only). Raises ValueError on a mismatch."""
        self.volume = volume
        self.findings = tuple(findings)
        self._by_id = {f.id: f for f in self.findings}
        if len(self._by_id) != len(self.findings):
            raise ValueError("finding ids repeat; each finding needs its own id")
        self._colour = {f.id: finding_colour(i) for i, f in enumerate(self.findings)}
        pieces = (
            _seg_pieces(seg, volume, self._by_id, seg_name)
            if seg is not None
            else _mask_pieces(self.findings, volume)
        )
        # Segments of a SEG opened without findings get colours (and ids) too.
        drawn = {piece.finding_id for slice_pieces in pieces.values() for piece in slice_pieces}
        for extra in sorted(drawn - self._colour.keys()):
            self._colour[extra] = finding_colour(len(self._colour))
        self._pieces = pieces
        self._outlines: dict[int, tuple[_Outline, ...]] = {}
        self._boxes = tuple(_box(f, volume) for f in self.findings)
        self._labels = {i: _label(str(i)) for i in self._colour}
        self._display = display_order(volume)
        self._position = {k: pos for pos, k in enumerate(self._display)}

    @classmethod
    def open(
        cls,
        files_or_dir: Path | str | Sequence[Path | str],
        findings_json_path: Path | str | None = None,
        seg_path: Path | str | None = None,
    ) -> StudyView:
        """Read a series (its files, or a folder holding them), its ``findings.json`` and its
        SEG. A folder may hold other series and objects: with findings or a SEG, the series
        they refer to is picked. Raises ValueError (VolumeError, FindingsError) with the reason.
        """
        start = time.perf_counter()
        report = FindingsReport.read(Path(findings_json_path)) if findings_json_path else None
        seg = _read_seg(Path(seg_path)) if seg_path else None
        seg_series = _seg_series(seg, seg_path)
        series_uid = report.series_instance_uid if report else seg_series
        volume = load_series(_series_files(files_or_dir, series_uid))
        named = (
            (findings_json_path, report and report.series_instance_uid),
            (seg_path, seg_series),
        )
        for path, uid in named:
            if uid is not None and uid != volume.series_uid:
                raise ValueError(
                    f"{path} is for series {uid}, the images are series {volume.series_uid}"
                )
        view = cls(volume, report.findings if report else (), seg, str(seg_path))
        log.info(
            "study view opened: series_uid=%s slices=%d findings=%d contour_slices=%d %.2f s",
            volume.series_uid,
            len(volume.sop_uids),
            len(view.findings),
            len(view._pieces),
            time.perf_counter() - start,
        )
        return view

    # ------------------------------------------------------------------------------ geometry
    @property
    def slice_count(self) -> int:
        return len(self.volume.sop_uids)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of a slice."""
        return int(self.volume.hu.shape[1]), int(self.volume.hu.shape[2])

    def display_position(self, slice_index: int) -> int:
        """Where a slice (volume index) comes in the viewer's scroll order (0-based)."""
        return self._position[self._slice(slice_index)]

    def slice_at(self, position: int) -> int:
        """The slice (volume index) at a scroll position (0-based; clamped to the series)."""
        return self._display[min(max(int(position), 0), self.slice_count - 1)]

    def instance_number(self, slice_index: int) -> int | None:
        """The slice's DICOM Instance Number (the image number the PACS shows), if it has one."""
        numbers = self.volume.instance_numbers
        k = self._slice(slice_index)
        return numbers[k] if len(numbers) == self.slice_count else None

    def slice_location(self, slice_index: int) -> float:
        """Position of the slice along its normal (mm), as the PACS shows Slice Location for an
        axial series (the patient z coordinate there)."""
        k = self._slice(slice_index)
        return float(self.volume.to_patient((k, 0.0, 0.0)) @ self.volume.normal)

    def finding(self, finding_id: int) -> Finding:
        try:
            return self._by_id[finding_id]
        except KeyError:
            known = ", ".join(str(i) for i in self._by_id) or "none"
            raise ValueError(f"no finding {finding_id} in this study (findings: {known})") from None

    def colour(self, finding_id: int) -> RGB:
        """The colour the finding is drawn in (for the findings panel's legend)."""
        if finding_id not in self._colour:
            self.finding(finding_id)  # raises, naming the findings
        return self._colour[finding_id]

    def finding_slice(self, finding_id: int) -> int:
        """Index of the finding's key slice (its key SOP Instance UID, and frame in a multi-frame
        instance) in the series."""
        finding = self.finding(finding_id)
        try:
            return self.volume.slice_of(finding.key_sop_instance_uid, finding.key_frame)
        except ValueError as exc:
            raise ValueError(f"finding {finding_id}: key slice {exc}") from None

    def pixel_to_patient(
        self, slice_index: int, row: float, col: float
    ) -> tuple[float, float, float]:
        """Patient position (LPS mm) of a point on a slice; ``row`` and ``col`` may be fractional
        (pixel centres at integers), as a click on a scaled image gives them."""
        k = self._slice(slice_index)
        rows, cols = self.shape
        if not (-0.5 <= row <= rows - 0.5 and -0.5 <= col <= cols - 0.5):
            raise ValueError(f"pixel ({row}, {col}) is outside the {rows}x{cols} image")
        x, y, z = (float(v) for v in self.volume.to_patient((k, row, col)))
        return (x, y, z)

    def patient_to_pixel(
        self, point: Sequence[float] | NDArray[np.floating]
    ) -> tuple[float, float, float]:
        """Fractional (slice, row, column) of a patient position (LPS mm)."""
        k, r, c = (float(v) for v in self.volume.to_index(point))
        return (k, r, c)

    def findings_on_slice(self, slice_index: int) -> tuple[int, ...]:
        """Ids of the findings drawn on a slice (a contour there, or a bbox spanning it)."""
        k = self._slice(slice_index)
        ids = {p.finding_id for p in self._pieces.get(k, ())}
        ids.update(b.finding_id for b in self._boxes if b.k0 <= k <= b.k1)
        return tuple(sorted(ids))

    # ------------------------------------------------------------------------------ pictures
    def render(
        self,
        slice_index: int,
        window: float,
        level: float,
        overlays: bool = True,
        selected_finding: int | None = None,
    ) -> NDArray[np.uint8]:
        """The slice as RGB (rows, columns, 3), windowed, with contours, boxes and finding ids
        (``overlays``); ``selected_finding`` is drawn thicker, with its id inverted."""
        k = self._slice(slice_index)
        if selected_finding is not None:
            self.colour(selected_finding)  # an unknown id raises
        gray = window_gray(self.volume.hu[k], window, level)
        rgb = np.stack((gray, gray, gray), axis=-1)  # 5x faster than broadcasting
        if overlays:
            self.draw_overlays(rgb, k, selected_finding)
        return rgb

    def draw_overlays(
        self, rgb: NDArray[np.uint8], slice_index: int, selected_finding: int | None = None
    ) -> None:
        """Draw the contours, boxes and finding ids of a slice into ``rgb`` (rows, columns, 3)
        in place; ``selected_finding`` thicker, on top, with its id inverted."""
        k = self._slice(slice_index)
        if selected_finding is not None:
            self.colour(selected_finding)  # an unknown id raises
        flat = rgb.reshape(-1, 3)  # a view: contour pixels are flat indices
        outlines = self._slice_outlines(k)
        boxes = [b for b in self._boxes if b.k0 <= k <= b.k1]
        # The selected finding last, so that it lies on top.
        order = [i for i in self._colour if i != selected_finding]
        if selected_finding is not None:
            order.append(selected_finding)
        for fid in order:
            selected = fid == selected_finding
            colour = self._colour[fid]
            for outline in outlines:
                if outline.finding_id == fid:
                    flat[outline.thick if selected else outline.thin] = colour
            for box in boxes:
                if box.finding_id == fid:
                    _draw_box(rgb, box, colour, 2 if selected else 1)
                    _draw_label(rgb, box, self._labels[fid], colour, selected)

    def render_png(
        self,
        slice_index: int,
        window: float,
        level: float,
        overlays: bool = True,
        selected_finding: int | None = None,
    ) -> bytes:
        """:meth:`render` as PNG bytes."""
        rgb = self.render(slice_index, window, level, overlays, selected_finding)
        buffer = io.BytesIO()
        # Fast compression: the picture crosses a local network once; encoding time is latency.
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def thumbnail(
        self,
        finding_id: int,
        size: int = 96,
        window: float = WINDOW_PRESETS["lung"].window,
        level: float = WINDOW_PRESETS["lung"].level,
    ) -> NDArray[np.uint8]:
        """A square RGB (size, size, 3) crop around the finding on its key slice, with its
        contour; the crop is twice the finding's extent, and at least THUMBNAIL_CONTEXT_MM
        (and 25 pixels) across, so that a small nodule shows its surroundings."""
        if not 8 <= size <= 1024:
            raise ValueError(f"thumbnail size must be 8..1024 pixels, got {size}")
        finding = self.finding(finding_id)
        k = self.finding_slice(finding_id)
        _, r, c = self.patient_to_pixel(finding.center_mm)
        box = next(b for b in self._boxes if b.finding_id == finding_id)
        context = math.ceil(THUMBNAIL_CONTEXT_MM / 2 / min(self.volume.spacing[1:]))
        half = max(box.r1 - box.r0 + 1, box.c1 - box.c0 + 1, context, 12)
        top, left = round(r) - half, round(c) - half
        gray = window_gray(self.volume.hu[k], window, level)
        rgb = np.stack((gray, gray, gray), axis=-1)
        for outline in self._slice_outlines(k):
            if outline.finding_id == finding_id:
                rgb.reshape(-1, 3)[outline.thin] = self._colour[finding_id]
        crop = np.zeros((2 * half + 1, 2 * half + 1, 3), dtype=np.uint8)  # black beyond edges
        rows, cols = self.shape
        r0, r1 = max(top, 0), min(top + 2 * half + 1, rows)
        c0, c1 = max(left, 0), min(left + 2 * half + 1, cols)
        if r0 < r1 and c0 < c1:
            crop[r0 - top : r1 - top, c0 - left : c1 - left] = rgb[r0:r1, c0:c1]
        resized = Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8).copy()

    # ------------------------------------------------------------------------------ internals
    def _slice(self, slice_index: int) -> int:
        try:
            k = operator.index(slice_index)
        except TypeError:
            raise ValueError(f"slice index must be an integer, got {slice_index!r}") from None
        if not 0 <= k < self.slice_count:
            raise ValueError(
                f"slice index {k} is outside 0..{self.slice_count - 1} "
                f"(series {self.volume.series_uid} has {self.slice_count} slices)"
            )
        return k

    def _slice_outlines(self, k: int) -> tuple[_Outline, ...]:
        cached = self._outlines.get(k)
        if cached is None:
            cached = tuple(_outline(p, self.shape) for p in self._pieces.get(k, ()))
            self._outlines[k] = cached
        return cached


# ---------------------------------------------------------------------------------- reading
def _series_files(
    files_or_dir: Path | str | Sequence[Path | str], series_uid: str | None
) -> list[Path]:
    """The files to load: those given, or a folder's files (those of ``series_uid`` when the
    findings or the SEG name one; a folder may also hold other series, results and notes)."""
    if not isinstance(files_or_dir, (str, Path)):
        return [Path(p) for p in files_or_dir]
    root = Path(files_or_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass a folder or a list of DICOM files")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if series_uid is None:
        return files
    picked = []
    for path in files:
        try:
            header = read_header(path, MAX_INFLATED_BYTES, specific_tags=["SeriesInstanceUID"])
        except InflateLimitError:
            log.warning(
                "%s left out: its deflated data set inflates past %d bytes",
                path,
                MAX_INFLATED_BYTES,
            )
            continue
        except (InvalidDicomError, OSError, zlib.error):
            continue  # not a DICOM file: not part of the series
        if str(header.get("SeriesInstanceUID", "")) == series_uid:
            picked.append(path)
    if not picked:
        raise ValueError(f"none of the {len(files)} files in {root} belongs to series {series_uid}")
    return picked


# ---------------------------------------------------------------------------------- drawing
def _outline(piece: _Piece, shape: tuple[int, int]) -> _Outline:
    """Rings outside the mask (the lesion's own pixels stay visible), 8-connected dilation."""
    mask = piece.mask
    once = ndimage.binary_dilation(mask, SQUARE)
    twice = ndimage.binary_dilation(once, SQUARE)

    def pixels(ring: NDArray[np.bool_]) -> NDArray[np.int32]:
        r, c = np.nonzero(ring)
        return ((r + piece.top) * shape[1] + c + piece.left).astype(np.int32)

    return _Outline(piece.finding_id, pixels(once & ~mask), pixels(twice & ~mask))


def _box(finding: Finding, volume: Volume) -> _Box:
    """The bbox's eight corners in index space; the slices whose centres it holds, and the
    pixels holding its edges."""
    lo, hi = finding.bbox_mm
    index = volume.to_index(np.array(list(itertools.product(*zip(lo, hi, strict=True)))))
    first, last = index.min(axis=0), index.max(axis=0)
    eps = 1e-6
    return _Box(
        finding.id,
        math.ceil(first[0] - eps),
        math.floor(last[0] + eps),
        math.floor(first[1] + 0.5),
        math.ceil(last[1] - 0.5),
        math.floor(first[2] + 0.5),
        math.ceil(last[2] - 0.5),
    )


def _draw_box(rgb: NDArray[np.uint8], box: _Box, colour: RGB, width: int) -> None:
    rows, cols = rgb.shape[:2]
    r0, r1 = box.r0 - BOX_MARGIN, box.r1 + BOX_MARGIN
    c0, c1 = box.c0 - BOX_MARGIN, box.c1 + BOX_MARGIN
    if r1 < 0 or c1 < 0 or r0 >= rows or c0 >= cols:
        return
    # Edges outside the image are not drawn; the visible part of the box is.
    cr0, cr1, cc0, cc1 = max(r0, 0), min(r1, rows - 1), max(c0, 0), min(c1, cols - 1)
    for t in range(width):
        if 0 <= r0 + t < rows:
            rgb[r0 + t, cc0 : cc1 + 1] = colour
        if 0 <= r1 - t < rows:
            rgb[r1 - t, cc0 : cc1 + 1] = colour
        if 0 <= c0 + t < cols:
            rgb[cr0 : cr1 + 1, c0 + t] = colour
        if 0 <= c1 - t < cols:
            rgb[cr0 : cr1 + 1, c1 - t] = colour


def _draw_label(
    rgb: NDArray[np.uint8], box: _Box, glyphs: NDArray[np.bool_], colour: RGB, selected: bool
) -> None:
    """The finding id on a plate above the box's top-left corner (inside the box when there is
    no room above); a selected finding's plate is in its colour, with dark text."""
    rows, cols = rgb.shape[:2]
    h, w = glyphs.shape[0] + 2, glyphs.shape[1] + 2
    if h > rows or w > cols:
        return
    top = box.r0 - BOX_MARGIN - h
    if top < 0:
        top = max(box.r0 - BOX_MARGIN, 0) + 2
    top = min(top, rows - h)
    left = min(max(box.c0 - BOX_MARGIN, 0), cols - w)
    plate = rgb[top : top + h, left : left + w]
    plate[...] = colour if selected else LABEL_BACKGROUND
    plate[1:-1, 1:-1][glyphs] = LABEL_BACKGROUND if selected else colour


@lru_cache(maxsize=256)
def _label(text: str) -> NDArray[np.bool_]:
    """The text as a bitmap in Pillow's built-in font (read-only; shared between views)."""
    font = ImageFont.load_default()
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    image = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(image).text((-left, -top), text, fill=255, font=font)
    glyphs = np.asarray(image) > 127
    glyphs.setflags(write=False)
    return glyphs
