"""What the DICOM result writers (``inference.sr``, ``inference.seg``) share.

- Deterministic UIDs: every UID a result carries is derived from (source Series Instance UID,
  model name, model version, kind), so writing the result of the same series with the same model
  again gives the same Series and SOP Instance UIDs; a PACS then replaces the object instead of
  storing a duplicate (ARCHITECTURE.md: every step after receipt is idempotent).
- Tracking identifiers (TID 4108): ``Nodule {id}`` and a UID per finding, equal in the SR's
  measurement group and the SEG's segment, so that viewers join the two.
- The source series check: the writers take the series' datasets in volume order (as
  ``inference.volume.Volume``: sorted along the slice normal), one series, one Frame of Reference.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from inference.findings import Finding
from models.registry import ModelCard

MANUFACTURER = "aidx"
SR_SERIES_NUMBER = 9001
SEG_SERIES_NUMBER = 9002
LO_MAX = 64  # characters of a Long String (Series Description, Device Serial Number)

# Codes both objects use (PS3.16): what was found, where, and by what kind of algorithm.
NODULE = Code("27925004", "SCT", "Nodule")  # CID 7151, and the SR's Finding
LUNG = Code("39607008", "SCT", "Lung")  # CID 4 Anatomic Region
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162

# Attributes the writers read from every source image (headers only; pixels are not needed).
REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)


def result_uid(series_uid: str, model: ModelCard, kind: str, revision: int = 1) -> str:
    """The UID of one ``kind`` of result object (e.g. ``"sr-instance"``) for a series and model.

    ``revision``: the study version the result is for (a study updated by late images gets a
    new result that supersedes the old one); revision 1 keeps the UIDs of ``aidx infer``.
    The same inputs always give the same UID, so a result sent again is the same object.
    """
    if not series_uid or not kind:
        raise ValueError("a result UID needs the source Series Instance UID and a kind")
    if revision > 1:
        kind = f"{kind} revision {revision}"
    return _uid("aidx-result", series_uid, model.name, model.version, kind)


def tracking_uid(series_uid: str, model: ModelCard, finding_id: int) -> str:
    """Tracking Unique Identifier (DCM 112040) of a finding: the SR group's and SEG segment's."""
    return result_uid(series_uid, model, f"tracking {finding_id}")


def tracking_id(finding_id: int) -> str:
    """Tracking Identifier (DCM 112039) of a finding, the label a radiologist sees."""
    return f"Nodule {finding_id}"


def device_uid(model: ModelCard) -> str:
    """Device Observer UID (TID 1004): one per model version, the same for every study."""
    return _uid("aidx-device", model.name, model.version)


def _uid(*parts: str) -> str:
    # One JSON string as the entropy: generate_uid joins its sources without a separator, so
    # ("det1", "2.0") and ("det", "12.0") would otherwise give the same UID.
    return str(generate_uid(entropy_srcs=[json.dumps(parts)]))


def model_ref(model: ModelCard) -> str:
    return f"{model.name}@{model.version}"


def series_description(what: str, model: ModelCard) -> str:
    """E.g. ``AI nodule findings (aidx nodule-detector@1.2.0)``, cut to the 64 characters of LO."""
    return f"{what} ({MANUFACTURER} {model_ref(model)})"[:LO_MAX]


@dataclass(frozen=True)
class SourceSeries:
    """The source series, checked: datasets in volume order and what the writers need of them."""

    datasets: tuple[Dataset, ...]
    series_uid: str
    frame_of_reference_uid: str
    index: dict[str, int]  # SOP Instance UID -> k (position in volume order)

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.datasets[0]
        return (len(self.datasets), int(first.Rows), int(first.Columns))

    def dataset(self, sop_instance_uid: str) -> Dataset:
        return self.datasets[self.index[sop_instance_uid]]


def source_series(datasets: Sequence[Dataset]) -> SourceSeries:
    """Check the source datasets and return them as a :class:`SourceSeries`; ValueError if not.

    The datasets must be one series, one Frame of Reference and one image size, in volume order:
    sorted by position along the slice normal, as ``Volume.sop_uids``.
    """
    if len(datasets) == 0:
        raise ValueError("no source images: pass the series' datasets in volume order")
    for ds in datasets:
        missing = [k for k in REQUIRED if k not in ds]
        if missing:
            uid = ds.get("SOPInstanceUID", "?")
            raise ValueError(f"source image {uid} lacks {', '.join(missing)}")
    first = datasets[0]
    for attribute in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        values = {str(ds[attribute].value) for ds in datasets}
        if len(values) > 1:
            raise ValueError(
                f"source images differ in {attribute} ({', '.join(sorted(values))}); "
                "pass the images of one series"
            )
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != len(uids):
        raise ValueError("source images repeat a SOP Instance UID")
    if len(datasets) > 1:
        along = _positions(datasets) @ _normal(first)
        steps = np.diff(along)
        if np.any(steps <= 0):
            k = int(np.argmax(steps <= 0))
            raise ValueError(
                f"source images are not in volume order: {uids[k + 1]} does not lie above "
                f"{uids[k]} along the slice normal; pass them as ordered in Volume.sop_uids"
            )
    return SourceSeries(
        datasets=tuple(datasets),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        index={uid: k for k, uid in enumerate(uids)},
    )


def check_findings(findings: Sequence[Finding], series: SourceSeries) -> None:
    """Finding ids unique and every key slice in the series; ValueError naming the finding."""
    ids = [f.id for f in findings]
    if len(set(ids)) != len(ids):
        raise ValueError(f"finding ids repeat: {ids}")
    for f in findings:
        if f.key_sop_instance_uid not in series.index:
            raise ValueError(
                f"finding {f.id}: key slice {f.key_sop_instance_uid} is not an image of "
                f"series {series.series_uid}"
            )


def _normal(ds: Dataset) -> NDArray[np.float64]:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return np.asarray(np.cross(iop[:3], iop[3:]), dtype=np.float64)


def _positions(datasets: Sequence[Dataset]) -> NDArray[np.float64]:
    return np.array(
        [[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=np.float64
    )


def save_atomically(dataset: Dataset, path: Path) -> None:
    """Write a Part 10 file so that a reader never sees a half-written one (rename at the end)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as f:
            dataset.save_as(f, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
