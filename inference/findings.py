"""The one canonical lesion record, ``Finding``, and the ``findings.json`` contract.

Every writer and reader (SR, SEG, JSON, review app, datasets) uses this record. Coordinates are
DICOM patient coordinates (LPS, millimetres), as in Image Position (Patient).

``findings.json``::

    {"study_instance_uid": ..., "series_instance_uid": ..., "model": {"name": ..., "version": ...},
     "findings": [{"id", "probability", "center_mm": [x, y, z], "diameter_mm", "volume_mm3",
                   "bbox_mm": [[x0, y0, z0], [x1, y1, z1]], "key_sop_instance_uid",
                   "key_frame_number" (multi-frame series only)}]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

FORMAT = "aidx-findings/1"
Point = tuple[float, float, float]


class FindingsError(ValueError):
    """A finding or a findings file that breaks the contract; the message says which field."""


@dataclass(frozen=True)
class Finding:
    """A detected lesion. Constructing one validates it: once built, it is valid."""

    id: int
    probability: float
    center_mm: Point
    diameter_mm: float
    volume_mm3: float
    bbox_mm: tuple[Point, Point]
    key_sop_instance_uid: str
    mask: NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)
    # The key slice's frame in a multi-frame instance (Enhanced CT); None for an image.
    key_frame: int | None = None

    def __post_init__(self) -> None:
        if self.id < 1:
            raise FindingsError(f"finding id must be 1 or more, got {self.id}")
        if not 0.0 <= self.probability <= 1.0 or math.isnan(self.probability):
            raise FindingsError(f"finding {self.id}: probability {self.probability} not in 0..1")
        if len(self.center_mm) != 3 or not all(math.isfinite(v) for v in self.center_mm):
            raise FindingsError(f"finding {self.id}: center_mm must be 3 finite numbers")
        if not self.diameter_mm > 0 or not self.volume_mm3 >= 0:
            raise FindingsError(f"finding {self.id}: diameter_mm must be > 0 and volume_mm3 >= 0")
        lo, hi = self.bbox_mm
        if any(a > b for a, b in zip(lo, hi, strict=True)):
            raise FindingsError(f"finding {self.id}: bbox_mm lower corner above upper corner")
        if not self.key_sop_instance_uid:
            raise FindingsError(f"finding {self.id}: key_sop_instance_uid is empty")
        if self.key_frame is not None and self.key_frame < 1:
            raise FindingsError(f"finding {self.id}: key_frame_number must be 1 or more")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "probability": round(self.probability, 6),
            "center_mm": [round(v, 3) for v in self.center_mm],
            "diameter_mm": round(self.diameter_mm, 3),
            "volume_mm3": round(self.volume_mm3, 2),
            "bbox_mm": [[round(v, 3) for v in corner] for corner in self.bbox_mm],
            "key_sop_instance_uid": self.key_sop_instance_uid,
        }
        if self.key_frame is not None:
            data["key_frame_number"] = self.key_frame
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        try:
            lo, hi = data["bbox_mm"]
            return cls(
                id=int(data["id"]),
                probability=float(data["probability"]),
                center_mm=_point(data["center_mm"]),
                diameter_mm=float(data["diameter_mm"]),
                volume_mm3=float(data["volume_mm3"]),
                bbox_mm=(_point(lo), _point(hi)),
                key_sop_instance_uid=str(data["key_sop_instance_uid"]),
                key_frame=(
                    None if data.get("key_frame_number") is None else int(data["key_frame_number"])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FindingsError):
                raise
            raise FindingsError(f"finding {data.get('id', '?')}: {exc!r}") from exc


def _point(values: Any) -> Point:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True)
class FindingsReport:
    """What ``aidx infer`` reports for one series."""

    study_instance_uid: str
    series_instance_uid: str
    model_name: str
    model_version: str
    findings: tuple[Finding, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "model": {"name": self.model_name, "version": self.model_version},
            "findings": [f.to_json() for f in self.findings],
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> FindingsReport:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            report = cls(
                study_instance_uid=str(data["study_instance_uid"]),
                series_instance_uid=str(data["series_instance_uid"]),
                model_name=str(data["model"]["name"]),
                model_version=str(data["model"]["version"]),
                findings=tuple(Finding.from_json(f) for f in data["findings"]),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FindingsError(f"{path}: not a findings file ({exc!r})") from exc
        ids = [f.id for f in report.findings]
        if len(set(ids)) != len(ids):
            raise FindingsError(f"{path}: finding ids repeat")
        return report
