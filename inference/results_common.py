"""What the DICOM result writers (``inference.sr``, ``inference.seg``) share.

- Deterministic UIDs: every UID a result carries is derived from (source Series Instance UID,
  model name, model version, kind), so writing the result of the same series with the same model
  again gives the same Series and SOP Instance UIDs; a PACS then replaces the object instead of
  storing a duplicate (ARCHITECTURE.md: every step after receipt is idempotent).
- Tracking identifiers (TID 4108): ``Nodule {id}`` and a UID per finding, equal in the SR's
  measurement group and the SEG's segment, so that viewers join the two.
- The source series check: the writers take the series' datasets in volume order (as
  ``inference.volume.Volume``: sorted along the slice normal), one series, one Frame of Reference.
- Patient and study attributes that do not parse: highdicom copies the Patient and Study
  modules of a source image into each result and fails on a date, time or age it cannot read
  (PatientBirthDate ``1961-02-03``), or writes it on as it is. The writers copy such a value
  only if it is valid for its VR; otherwise the result carries it empty (these attributes are
  Type 2 or 3) and a warning names the attribute and the image, never the value
  (:func:`copyable_sources`). Names and identifiers are copied as they are.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM, validate_value

from inference.findings import Finding
from inference.volume import frame_attribute
from models.registry import ModelCard

RGB = tuple[int, int, int]
# One colour per finding, in the order of the findings (segment i of the SEG, the review app's
# i-th finding), saturated so that none reads as grey on a CT.
FINDING_PALETTE: tuple[RGB, ...] = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 210, 0),
    (80, 225, 100),
    (255, 110, 230),
    (255, 150, 40),
    (165, 125, 255),
    (0, 230, 200),
)


def finding_colour(index: int) -> RGB:
    """The colour of the ``index``-th finding (0-based): the palette, then saturated hues a
    golden angle apart, so that no two neighbours look alike. The SEG recommends it as the
    segment's display colour and the review app draws the finding in it."""
    if index < len(FINDING_PALETTE):
        return FINDING_PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = (min(max(abs((hue * 6 + s) % 6 - 3) - 1, 0.0), 1.0) for s in (0, 4, 2))
    return (round(60 + 195 * r), round(60 + 195 * g), round(60 + 195 * b))


log = logging.getLogger("aidx.inference")

MANUFACTURER = "aidx"
SR_SERIES_NUMBER = 9001
SEG_SERIES_NUMBER = 9002
RESULT_FILE_MODE = 0o640  # docs/conformance.md: data at rest
LO_MAX = 64  # characters of a Long String (Series Description, Device Serial Number)

# Codes both objects use (PS3.16): what was found, where, and by what kind of algorithm.
NODULE = Code("27925004", "SCT", "Nodule")  # CID 7151, and the SR's Finding
LUNG = Code("39607008", "SCT", "Lung")  # CID 4 Anatomic Region
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162

# The radiologist's decisions (a private coding scheme: the signed SR, ui/signoff.py, says why;
# the FHIR report, inference/fhir_report.py, gives its findings the same codes). REJECTED is the
# FHIR report's only: the signed SR leaves rejected findings out.
CODING_SCHEME = "99AIDX"
DECISION = Code("DECISION", CODING_SCHEME, "Radiologist decision")
ACCEPTED = Code("ACCEPTED", CODING_SCHEME, "AI finding accepted by radiologist")
EDITED = Code("EDITED", CODING_SCHEME, "AI finding edited by radiologist")
ADDED = Code("ADDED", CODING_SCHEME, "Finding added by radiologist")
REJECTED = Code("REJECTED", CODING_SCHEME, "AI finding rejected by radiologist")
AI_LONG_AXIS = Code("AILONGAXIS", CODING_SCHEME, "Long axis measured by AI")

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


# Patient and study attributes that the result objects copy from a source image (highdicom's
# Patient, General Study and Patient Study modules: all of group 0010, the Clinical Trial
# Subject group 0012, and these), checked before they are copied.
STUDY_ATTRIBUTES = frozenset(
    tag_for_keyword(k)
    for k in (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "StudyDescription",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDate",
        "AdmittingTime",
        "LastMenstrualDate",
    )
)
PATIENT_GROUPS = (0x0010, 0x0012)
# Value representations whose values must parse; text (names, identifiers) is copied as it is.
PARSED_VRS = ("DA", "TM", "DT", "AS", "DS", "IS")
_PARSERS = {"DA": DA, "TM": TM, "DT": DT}
PATIENT_SEX_VALUES = ("M", "F", "O")  # PS3.3 C.7.1.1, the values highdicom accepts
_PATIENT_SEX = tag_for_keyword("PatientSex")


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


SliceKey = tuple[str, int | None]  # (SOP Instance UID, frame number or None)


@dataclass(frozen=True)
class SourceSeries:
    """The source series, checked: one header per slice in volume order and what the writers
    need of them.

    A slice is an image (a single-frame instance) or one frame of a multi-frame instance
    (Enhanced CT, Legacy Converted Enhanced CT); ``frames[k]`` is slice k's frame number (None
    for an image). ``datasets[k]`` reads as a single-frame header either way (for a frame: its
    instance's attributes with the frame's geometry at the top level, :func:`frame_view`), and
    ``instances[k]`` is the instance's own header (the SEG references it with frame numbers).
    """

    datasets: tuple[Dataset, ...]
    series_uid: str
    frame_of_reference_uid: str
    index: dict[SliceKey, int]  # (SOP Instance UID, frame) -> k (position in volume order)
    frames: tuple[int | None, ...] = ()
    instances: tuple[Dataset, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.datasets[0]
        return (len(self.datasets), int(first.Rows), int(first.Columns))

    def slice_of(self, sop_instance_uid: str, frame: int | None = None) -> int:
        """k of an image, or of a frame of a multi-frame instance; KeyError if not in the series."""
        return self.index[(sop_instance_uid, frame)]

    def dataset(self, sop_instance_uid: str, frame: int | None = None) -> Dataset:
        return self.datasets[self.slice_of(sop_instance_uid, frame)]

    def frame(self, k: int) -> int | None:
        return self.frames[k] if self.frames else None


# What a frame view leaves out: the functional groups (their values move to the top level) and
# the pixels.
_FRAME_VIEW_OMITS = frozenset(
    tag_for_keyword(k)
    for k in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelData")
)


def frame_view(ds: Dataset, frame: int) -> Dataset:
    """Frame ``frame`` (1-based) of a multi-frame image as a single-frame header: the instance's
    top-level attributes (patient, study, series, SOP Class and Instance UIDs, Rows, Columns)
    and the frame's Image Position and Orientation (Patient), Pixel Spacing and Slice Thickness
    from its functional groups. For the writers' geometry and for highdicom's copies of the
    patient and study; references to it must carry the frame number."""
    view = Dataset()
    for tag in list(ds.keys()):  # keys(): iterating the Dataset would convert every element
        if tag not in _FRAME_VIEW_OMITS:
            view[tag] = ds[tag]
    for sequence, keyword in (
        ("PlanePositionSequence", "ImagePositionPatient"),
        ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelMeasuresSequence", "PixelSpacing"),
        ("PixelMeasuresSequence", "SliceThickness"),
    ):
        value = frame_attribute(ds, frame, sequence, keyword)
        if value is not None:
            setattr(view, keyword, value)
    view.pop("NumberOfFrames", None)
    return view


def source_series(
    datasets: Sequence[Dataset], frames: Sequence[int | None] | None = None
) -> SourceSeries:
    """Check the source datasets and return them as a :class:`SourceSeries`; ValueError if not.

    The datasets must be one series, one Frame of Reference and one image size, in volume order:
    sorted by position along the slice normal, as ``Volume.sop_uids``. ``frames`` (as
    ``Volume.frames``): slice k is frame ``frames[k]`` of the multi-frame instance
    ``datasets[k]`` (the same header for each of its frames), or an image where None.
    """
    if len(datasets) == 0:
        raise ValueError("no source images: pass the series' datasets in volume order")
    frames = tuple(frames) if frames else (None,) * len(datasets)
    if len(frames) != len(datasets):
        raise ValueError(f"{len(frames)} frame numbers for {len(datasets)} source slices")
    views: dict[tuple[int, int], Dataset] = {}
    headers = [
        ds if frame is None else views.setdefault((id(ds), frame), frame_view(ds, frame))
        for ds, frame in zip(datasets, frames, strict=True)
    ]
    for ds, frame in zip(headers, frames, strict=True):
        missing = [k for k in REQUIRED if k not in ds]
        if missing:
            uid = ds.get("SOPInstanceUID", "?")
            where = f"frame {frame} of " if frame is not None else ""
            raise ValueError(f"source image {where}{uid} lacks {', '.join(missing)}")
    first = headers[0]
    for attribute in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        values = {str(ds[attribute].value) for ds in headers}
        if len(values) > 1:
            raise ValueError(
                f"source images differ in {attribute} ({', '.join(sorted(values))}); "
                "pass the images of one series"
            )
    keys = [(str(ds.SOPInstanceUID), frame) for ds, frame in zip(headers, frames, strict=True)]
    if len(set(keys)) != len(keys):
        raise ValueError("source images repeat a SOP Instance UID (and frame)")
    if len(headers) > 1:
        along = _positions(headers) @ _normal(first)
        steps = np.diff(along)
        if np.any(steps <= 0):
            k = int(np.argmax(steps <= 0))
            raise ValueError(
                f"source images are not in volume order: {_name(keys[k + 1])} does not lie "
                f"above {_name(keys[k])} along the slice normal; pass them as ordered in "
                "Volume.sop_uids"
            )
    return SourceSeries(
        datasets=tuple(copyable_sources(headers)),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        index={key: k for k, key in enumerate(keys)},
        frames=frames,
        instances=tuple(datasets),
    )


def _name(key: SliceKey) -> str:
    uid, frame = key
    return uid if frame is None else f"frame {frame} of {uid}"


def value_is_valid(vr: str, value: object) -> bool:
    """Whether ``value`` (one value or a MultiValue) is valid for ``vr``: it matches the VR's
    syntax (PS3.5 6.2), and a date or time is one that exists. Empty is valid."""
    items = list(value) if isinstance(value, MultiValue) else [value]
    for item in items:
        if item is None or item == "":
            continue
        text = item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)
        try:
            validate_value(vr, text, pydicom_config.RAISE)
            parse = _PARSERS.get(vr)
            if parse is not None:
                parse(text)
        except (ValueError, TypeError, OverflowError):
            return False
    return True


def invalid_attributes(ds: Dataset) -> list[int]:
    """Tags of the patient and study attributes of ``ds`` that would be copied into a result
    but whose values do not parse (see :data:`PARSED_VRS`), or a Patient's Sex that is not
    M, F or O."""
    bad = []
    # keys(), not the dataset: iterating a Dataset converts every element.
    for tag in list(ds.keys()):
        if tag.group not in PATIENT_GROUPS and tag not in STUDY_ATTRIBUTES:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:  # a private or unknown attribute: not copied by a module
            continue
        if tag != _PATIENT_SEX and vr not in PARSED_VRS:
            continue
        try:
            value = ds[tag].value
        except (ValueError, TypeError, OverflowError):  # pydicom cannot even convert it
            bad.append(int(tag))
            continue
        if tag == _PATIENT_SEX:
            valid = value in (None, "", *PATIENT_SEX_VALUES)
        else:
            valid = value_is_valid(vr, value)
        if not valid:
            bad.append(int(tag))
    return bad


def copyable_sources(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The source datasets as the result writers may copy them: an image whose patient or study
    attribute does not parse (:func:`invalid_attributes`) is replaced by a copy in which that
    attribute is empty, with a warning per attribute that names its keyword, the first such
    image and the study (UIDs; never the value). The caller's datasets are not changed; valid
    ones are passed through as they are."""
    out: list[Dataset] = []
    found: dict[int, list[str]] = {}
    for ds in datasets:
        bad = invalid_attributes(ds)
        if not bad:
            out.append(ds)
            continue
        fixed = copy.deepcopy(ds)
        for tag in bad:
            fixed.add_new(tag, dictionary_VR(tag), None)  # present and empty (Type 2)
            found.setdefault(tag, []).append(str(ds.get("SOPInstanceUID", "?")))
        out.append(fixed)
    study_uid = str(datasets[0].get("StudyInstanceUID", "?")) if datasets else "?"
    for tag, sop_uids in found.items():
        log.warning(
            "%s of the source images is not a valid %s value; the results carry it empty "
            "(study_uid=%s, sop_uid=%s%s)",
            keyword_for_tag(tag) or f"{tag:08X}",
            dictionary_VR(tag),
            study_uid,
            sop_uids[0],
            f" and {len(sop_uids) - 1} more images" if len(sop_uids) > 1 else "",
        )
    return out


def check_findings(findings: Sequence[Finding], series: SourceSeries) -> None:
    """Finding ids unique and every key slice in the series; ValueError naming the finding."""
    ids = [f.id for f in findings]
    if len(set(ids)) != len(ids):
        raise ValueError(f"finding ids repeat: {ids}")
    for f in findings:
        if (f.key_sop_instance_uid, f.key_frame) not in series.index:
            raise ValueError(
                f"finding {f.id}: key slice {_name((f.key_sop_instance_uid, f.key_frame))} is "
                f"not an image of series {series.series_uid}"
            )


def _normal(ds: Dataset) -> NDArray[np.float64]:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return np.asarray(np.cross(iop[:3], iop[3:]), dtype=np.float64)


def _positions(datasets: Sequence[Dataset]) -> NDArray[np.float64]:
    return np.array(
        [[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=np.float64
    )


def save_atomically(dataset: Dataset, path: Path) -> None:
    """Write a Part 10 file so that a reader never sees a half-written one (rename at the end),
    readable by its owner and group only (:data:`RESULT_FILE_MODE`): results carry patient data.
    """
    with atomic_file(path) as f:
        dataset.save_as(f, enforce_file_format=True)


def write_atomically(data: bytes, path: Path) -> None:
    """Write ``data`` as :func:`save_atomically` writes a DICOM file (the FHIR report)."""
    with atomic_file(path) as f:
        f.write(data)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A new file for a result, under a temporary name, fsync'd and renamed to ``path`` when
    the block ends (removed if it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, RESULT_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
