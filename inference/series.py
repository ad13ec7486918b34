"""Which series of a study the detector should read, by explicit rules.

Every series is either chosen or rejected with its reasons, so that a study with no eligible
series is recorded as such ("not applicable: …"), never skipped silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

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


@dataclass
class Candidate:
    series_uid: str
    description: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


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
    eligible.sort(key=lambda c: (-len(c.files), _thickness(c)))
    return Selection(eligible[0], rejected + eligible[1:])


def _thickness(c: Candidate) -> float:
    values = [
        float(h.SliceThickness) for h in c.headers if h.get("SliceThickness") not in (None, "")
    ]
    return float(np.median(values)) if values else float("inf")


def _check(c: Candidate, rules: SeriesRules) -> list[str]:
    reasons = []
    modalities = {str(h.get("Modality", "")) for h in c.headers}
    if not modalities & set(rules.modalities):
        reasons.append(
            f"modality {'/'.join(sorted(modalities))} is not {'/'.join(rules.modalities)}"
        )
    if len(c.files) < rules.min_slices:
        reasons.append(f"{len(c.files)} slices, fewer than {rules.min_slices}")
    types = {str(v).upper() for h in c.headers for v in (h.get("ImageType") or [])}
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
    orientations = [h.get("ImageOrientationPatient") for h in c.headers]
    if any(o is None for o in orientations):
        reasons.append("no Image Orientation (Patient)")
    else:
        iop = np.array([float(v) for v in orientations[0]])
        normal = np.cross(iop[:3], iop[3:])
        angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))
        if angle > rules.max_axial_tilt_deg:
            reasons.append(f"not axial ({angle:.0f}° from the axial plane)")
    return reasons
