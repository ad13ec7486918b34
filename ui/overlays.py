"""Reading overlays for the viewer: a finding's mask per slice from the SEG (frames placed on
the slices their referenced SOP Instance UIDs name, checked against the series) or from the
findings' own masks, cropped and bit-packed."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference.findings import Finding
from inference.volume import Volume

log = logging.getLogger("aidx.ui.viewer")

CROP_PAD = 2  # pixels kept around each mask crop, room for the contour outside the mask


@dataclass(frozen=True)
class _Piece:
    """One finding's mask on one slice, cropped to its extent plus CROP_PAD, bit-packed (a
    body-sized mask on every slice of a 300-slice series stays a few MB)."""

    finding_id: int
    top: int
    left: int
    height: int
    width: int
    bits: NDArray[np.uint8]

    @property
    def mask(self) -> NDArray[np.bool_]:
        flat = np.unpackbits(self.bits, count=self.height * self.width)
        return flat.reshape(self.height, self.width).view(np.bool_)


def _read_seg(path: Path) -> hd.seg.Segmentation:
    try:
        return hd.seg.segread(path)
    except Exception as exc:  # highdicom raises many kinds; all mean "not a usable SEG"
        raise ValueError(f"{path}: not a readable DICOM SEG: {exc}") from exc


def _seg_series(seg: hd.seg.Segmentation | None, where: Path | str | None) -> str | None:
    if seg is None:
        return None
    series = sorted({str(s) for _, s, _ in seg.get_source_image_uids()})
    if len(series) != 1:
        raise ValueError(f"{where}: the SEG must refer to one series, it refers to {len(series)}")
    return series[0]


_TRACKING_ID = re.compile(r"(\d+)\s*$")


def _segment_finding_id(
    seg: hd.seg.Segmentation, number: int, findings: dict[int, Finding], where: str
) -> int:
    """The finding a segment draws: the number its Tracking ID (else label) ends with."""
    description = seg.get_segment_description(number)
    for text in (description.tracking_id, description.segment_label):
        match = _TRACKING_ID.search(text or "")
        if match:
            fid = int(match.group(1))
            if findings and fid not in findings:
                raise ValueError(
                    f"{where}: segment {number} ({text!r}) names finding {fid}, which the "
                    "findings do not hold; open the SEG of the same result"
                )
            return fid
    raise ValueError(
        f"{where}: segment {number} has no Tracking ID naming a finding ('Nodule <id>')"
    )


def _frame_item(seg: hd.seg.Segmentation, n: int, keyword: str) -> Dataset | None:
    """The first item of functional group ``keyword`` for frame ``n`` (0-based): the frame's
    own (Per-Frame Functional Groups), else the shared one."""
    per_frame = seg.get("PerFrameFunctionalGroupsSequence")
    shared = seg.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[n] if per_frame else None, shared[0] if shared else None):
        if group is not None and group.get(keyword):
            item: Dataset = group[keyword].value[0]
            return item
    return None


def _seg_pieces(
    seg: hd.seg.Segmentation, volume: Volume, findings: dict[int, Finding], where: str
) -> dict[int, list[_Piece]]:
    """Each frame of the SEG as a crop on the slice its source image is (PS3.3 C.8.20.2 frames,
    C.7.6.16.2.6 Derivation Image). Frames are decoded one at a time, so memory stays small."""
    kind = seg.segmentation_type
    if kind not in (hd.seg.SegmentationTypeValues.BINARY, hd.seg.SegmentationTypeValues.FRACTIONAL):
        raise ValueError(
            f"{where}: Segmentation Type {kind.value} is not shown (BINARY, FRACTIONAL)"
        )
    if (int(seg.Rows), int(seg.Columns)) != (volume.hu.shape[1], volume.hu.shape[2]):
        raise ValueError(
            f"{where}: frames are {seg.Rows}x{seg.Columns}, the series' images "
            f"{volume.hu.shape[1]}x{volume.hu.shape[2]}"
        )
    frame_of_reference = str(seg.get("FrameOfReferenceUID", ""))
    if frame_of_reference and frame_of_reference != volume.frame_of_reference_uid:
        raise ValueError(f"{where}: Frame of Reference {frame_of_reference} is not the series'")
    ids = {n: _segment_finding_id(seg, n, findings, where) for n in seg.segment_numbers}
    threshold = 1
    if kind == hd.seg.SegmentationTypeValues.FRACTIONAL:
        threshold = max(1, math.ceil(int(seg.MaximumFractionalValue) / 2))
    frames = volume.frames or (None,) * len(volume.sop_uids)
    slice_of = {key: k for k, key in enumerate(zip(volume.sop_uids, frames, strict=True))}
    tolerance = 0.5 * min(volume.spacing[1:])
    pieces: dict[int, list[_Piece]] = {}
    for n in range(int(seg.number_of_frames)):
        segment = _frame_item(seg, n, "SegmentIdentificationSequence")
        derivation = _frame_item(seg, n, "DerivationImageSequence")
        sources = derivation.get("SourceImageSequence", []) if derivation else []
        if segment is None or not sources:
            raise ValueError(f"{where}: frame {n + 1} names no segment or no source image")
        uid = str(sources[0].ReferencedSOPInstanceUID)
        k = slice_of.get((uid, _frame_number(sources[0])))
        if k is None:
            raise ValueError(f"{where}: frame {n + 1} lies on image {uid}, not in the series")
        position = _frame_item(seg, n, "PlanePositionSequence")
        if position is not None and "ImagePositionPatient" in position:
            offset = np.array([float(v) for v in position.ImagePositionPatient])
            gap = float(np.linalg.norm(offset - volume.to_patient((k, 0, 0))))
            if gap > tolerance:
                raise ValueError(
                    f"{where}: frame {n + 1} lies {gap:.2f} mm from its source image {uid}"
                )
        mask = seg.get_stored_frame(n + 1) >= threshold
        piece = _crop(ids[int(segment.ReferencedSegmentNumber)], mask)
        if piece is not None:
            pieces.setdefault(k, []).append(piece)
    return pieces


def _mask_pieces(findings: Sequence[Finding], volume: Volume) -> dict[int, list[_Piece]]:
    pieces: dict[int, list[_Piece]] = {}
    for finding in findings:
        if finding.mask is None:
            continue
        if finding.mask.shape != volume.hu.shape:
            raise ValueError(
                f"finding {finding.id}: mask shape {finding.mask.shape} is not the series' "
                f"{volume.hu.shape}"
            )
        for k in np.flatnonzero(finding.mask.any(axis=(1, 2))):
            piece = _crop(finding.id, finding.mask[k])
            if piece is not None:
                pieces.setdefault(int(k), []).append(piece)
    return pieces


def _crop(finding_id: int, mask: NDArray[np.bool_]) -> _Piece | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = max(int(rows[0]) - CROP_PAD, 0), max(int(cols[0]) - CROP_PAD, 0)
    bottom = min(int(rows[-1]) + CROP_PAD + 1, mask.shape[0])
    right = min(int(cols[-1]) + CROP_PAD + 1, mask.shape[1])
    bits = np.packbits(mask[top:bottom, left:right])
    return _Piece(finding_id, top, left, bottom - top, right - left, bits)


def _frame_number(reference: Dataset) -> int | None:
    """The (first) Referenced Frame Number of an image reference; None for a whole image."""
    value = reference.get("ReferencedFrameNumber")
    if value is None or value == "":
        return None
    return int(value[0] if isinstance(value, MultiValue) else value)
