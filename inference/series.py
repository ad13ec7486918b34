"""Which series of a study the detector should read, by explicit rules.

Every series is either chosen or rejected with its reasons, so that a study with no eligible
series is recorded as such ("not applicable: …"), never skipped silently.

A series' slices are its frames: a multi-frame instance (Enhanced CT, Legacy Converted Enhanced
CT) counts its Number of Frames, a single-frame image one. Image Orientation, Slice Thickness and
Image Type are read at the top level and, for multi-frame instances, from the functional groups
(Plane Orientation, Pixel Measures, the frame type macros), shared or per frame.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from .volume import frame_attribute, frame_count, is_multiframe

if TYPE_CHECKING:
    from aidx.config import AidxConfig

HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ImageType",
    "SliceThickness",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SOPInstanceUID",
    "BodyPartExamined",
    # Multi-frame instances: the frame count and the functional groups (read without pixel data).
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]


@dataclass(frozen=True)
class SeriesRules:
    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 20
    max_slice_thickness_mm: float = 5.0
    max_axial_tilt_deg: float = 10.0  # angle between the slice normal and the patient's z axis
    exclude_image_types: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY", "PROJECTION")
    body_parts: tuple[str, ...] = ()  # Body Part Examined values accepted; empty: any
    description_pattern: str = ""  # regular expression searched in Series Description


def series_rules(config: AidxConfig) -> SeriesRules:
    """The rules of ``inference.series`` (a route adds its body parts and description)."""
    s = config.inference.series
    return SeriesRules(
        modalities=tuple(s.modalities),
        min_slices=s.min_slices,
        max_slice_thickness_mm=s.max_slice_thickness_mm,
        max_axial_tilt_deg=s.max_axial_tilt_deg,
        exclude_image_types=tuple(s.exclude_image_types),
    )


@dataclass
class Candidate:
    series_uid: str
    description: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def slice_count(self) -> int:
        """Slices in the series: the frames of its multi-frame instances, one a single-frame
        image."""
        return sum(frame_count(h) if is_multiframe(h) else 1 for h in self.headers)


@dataclass(frozen=True)
class Selection:
    """The chosen series (None when no series is eligible) and why each other was not."""

    chosen: Candidate | None
    rejected: list[Candidate]

    def reason(self) -> str:
        """One line saying why nothing was chosen (empty when a series was)."""
        if self.chosen is not None:
            return ""
        if not self.rejected:
            return "the study has no readable DICOM images"
        parts = [
            f"series {c.series_uid} ({c.description or 'no description'}): {'; '.join(c.reasons)}"
            for c in self.rejected
        ]
        return "no eligible series: " + " | ".join(parts)


def group_series(files: Iterable[Path]) -> list[Candidate]:
    """Read the headers of ``files`` and group them by series (unreadable files are skipped)."""
    groups: dict[str, Candidate] = {}
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception:  # noqa: BLE001 - not DICOM: not part of any series
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            continue
        candidate = groups.setdefault(uid, Candidate(uid, str(ds.get("SeriesDescription", ""))))
        candidate.files.append(path)
        candidate.headers.append(ds)
    return list(groups.values())


def select_series(files: Iterable[Path], rules: SeriesRules | None = None) -> Selection:
    """Apply ``rules`` to every series; choose the eligible one with the most (thinnest) slices."""
    rules = rules or SeriesRules()
    eligible: list[Candidate] = []
    rejected: list[Candidate] = []
    for candidate in group_series(files):
        candidate.reasons = _check(candidate, rules)
        (rejected if candidate.reasons else eligible).append(candidate)
    if not eligible:
        return Selection(None, rejected)
    eligible.sort(key=lambda c: (-c.slice_count, _thickness(c)))
    return Selection(eligible[0], rejected + eligible[1:])


def _frame_values(h: Dataset, keyword: str, sequence: str) -> list[Any]:
    """``keyword`` at the top level of ``h``; for a multi-frame instance without it there, the
    value of each frame in the functional group ``sequence`` (None for a frame without one)."""
    value = h.get(keyword)
    if value not in (None, "") or not is_multiframe(h):
        return [value]
    return [frame_attribute(h, f, sequence, keyword) for f in range(1, frame_count(h) + 1)]


def _thickness(c: Candidate) -> float:
    values = [
        float(v)
        for h in c.headers
        for v in _frame_values(h, "SliceThickness", "PixelMeasuresSequence")
        if v not in (None, "")
    ]
    return float(np.median(values)) if values else float("inf")


def _image_types(h: Dataset) -> set[str]:
    """Image Type values, and for a multi-frame instance the Frame Type values of its frames
    (CT Image Frame Type and the like, shared or per frame)."""
    types = {str(v).upper() for v in (h.get("ImageType") or [])}
    groups = [*(h.get("SharedFunctionalGroupsSequence") or [])]
    groups += [*(h.get("PerFrameFunctionalGroupsSequence") or [])]
    for group in groups:
        for element in group:
            if element.VR == "SQ" and element.keyword.endswith("FrameTypeSequence"):
                for item in element.value:
                    types |= {str(v).upper() for v in (item.get("FrameType") or [])}
    return types


def _check(c: Candidate, rules: SeriesRules) -> list[str]:
    reasons = []
    modalities = {str(h.get("Modality", "")) for h in c.headers}
    if not modalities & set(rules.modalities):
        reasons.append(
            f"modality {'/'.join(sorted(modalities))} is not {'/'.join(rules.modalities)}"
        )
    if c.slice_count < rules.min_slices:
        reasons.append(f"{c.slice_count} slices, fewer than {rules.min_slices}")
    multi = [is_multiframe(h) for h in c.headers]
    if any(multi) and not all(multi):
        reasons.append(
            f"{multi.count(False)} single-frame images mixed with {multi.count(True)} "
            "multi-frame instances"
        )
    types = {t for h in c.headers for t in _image_types(h)}
    excluded = sorted(types & set(rules.exclude_image_types))
    if excluded:
        reasons.append(f"image type {', '.join(excluded)}")
    if rules.body_parts:
        parts = {str(h.get("BodyPartExamined", "")).upper() for h in c.headers}
        if not parts & {p.upper() for p in rules.body_parts}:
            shown = "/".join(sorted(p for p in parts if p)) or "none"
            reasons.append(f"body part {shown} is not {'/'.join(rules.body_parts)}")
    if rules.description_pattern and not re.search(
        rules.description_pattern, c.description, re.IGNORECASE
    ):
        reasons.append(f"description does not match {rules.description_pattern!r}")
    thickness = _thickness(c)
    if thickness != float("inf") and thickness > rules.max_slice_thickness_mm:
        reasons.append(f"slice thickness {thickness:g} mm > {rules.max_slice_thickness_mm:g} mm")
    orientations = [
        o
        for h in c.headers
        for o in _frame_values(h, "ImageOrientationPatient", "PlaneOrientationSequence")
    ]
    if any(o is None for o in orientations):
        reasons.append("no Image Orientation (Patient)")
    else:
        iop = np.array([float(v) for v in orientations[0]])
        normal = np.cross(iop[:3], iop[3:])
        angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))
        if angle > rules.max_axial_tilt_deg:
            reasons.append(f"not axial ({angle:.0f}° from the axial plane)")
    return reasons
