"""DICOM CT series with DICOM Segmentations (PS3.3 A.51 Segmentation IOD) to the canonical
dataset (see training/dataset.py); torch-free.

:func:`dicom_seg_dataset` reads every DICOM file under a folder (recursively), groups the image
instances by Series Instance UID, and turns each SEG into one case:

- The SEG's source series is the one its references name (Referenced Series Sequence, or
  Studies Containing Other Referenced Instances, as highdicom's ``get_source_image_uids`` reads
  them); exactly one series must be named, and it must be among the files.
- The series is read with ``inference.volume.load_series`` (HU, LPS affine, slices along the
  normal), as the serving path reads it.
- Placement: every SEG frame must name its source slice (Derivation Image Sequence > Source
  Image Sequence, as highdicom, dcmqi and 3D Slicer write them) and lie on it: same Frame of
  Reference, rows, columns, Pixel Spacing and Image Orientation (Patient), and an Image Position
  (Patient) within a tenth of a voxel of the slice's. Then the frames are read by source SOP
  Instance UID (highdicom ``get_pixels_by_source_instance``); slices without a frame are empty.
- Which segments are lesions: a segment counts when its Segmented Property Category is
  "Morphologically abnormal structure" (SCT 49755003, CID 7150; what aidx's own SEG uses), or its
  Segmented Property Type is a nodule, lesion, mass or neoplasm, or its Segment Label names one
  ("Nodule 3", "lesion", "tumour", ...). Anatomy segments (lung, vessels) are left out, so a SEG
  holding organs beside nodules gives only the nodules. ``all_segments=True`` takes every segment.
  A SEG without any lesion segment is skipped with a log line.
- The label mask is the union of the chosen segments (FRACTIONAL frames thresholded at 0.5);
  lesions are its 26-connected components (``converters.components``: voxel centroid mapped to
  LPS, equivalent-sphere diameter), so touching lesions of different segments become one.
- Case ids are pseudonymous: ``ct-`` and 12 hex digits of the SHA-256 of the Series Instance UID
  (plus ``-`` and 6 of the SEG's SOP Instance UID when several SEGs share a series). Patient
  names, ids and file or folder names (PACS exports name folders after patients) never enter the
  dataset or the logs; provenance is the UIDs.
- Image series without a SEG (and non-image objects such as SRs) are skipped with a log line.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset as DicomDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import SegmentationStorage

from inference.volume import Volume, VolumeError, load_series

from .converters import components
from .dataset import Case, Dataset, DatasetError, write_case

log = logging.getLogger("aidx.dataset")

LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_CLASSES = frozenset({str(SegmentationStorage), LABEL_MAP_SEGMENTATION_STORAGE})
GRID_TOLERANCE = 0.1  # of a voxel: how far a SEG frame may lie from its source slice
DIRECTION_TOLERANCE = 1e-3
FRACTIONAL_THRESHOLD = 0.5

# SNOMED CT codes (SCT, or the legacy designator SRT) of lesion-like segments (CID 7150/7151).
ABNORMAL_CATEGORY = "49755003"  # Morphologically abnormal structure
LESION_TYPES = frozenset(
    {
        "27925004",  # Nodule
        "52988006",  # Lesion
        "4147007",  # Mass
        "108369006",  # Neoplasm
        "86049000",  # Malignant neoplasm, primary
        "14799000",  # Neoplasm, metastatic
    }
)
SNOMED = frozenset({"SCT", "SRT"})
LESION_LABEL = re.compile(r"\b(nodules?|lesions?|tumou?rs?|mass(es)?|neoplasms?)\b", re.IGNORECASE)


@dataclass
class _Folder:
    """What a folder holds: image instances by series (SOP UID -> file), and the SEG files."""

    series: dict[str, dict[str, Path]] = field(default_factory=lambda: defaultdict(dict))
    modality: dict[str, str] = field(default_factory=dict)
    segs: list[Path] = field(default_factory=list)
    not_dicom: int = 0


def dicom_seg_dataset(
    in_dir: Path, out: Path, name: str = "dicom-seg", *, all_segments: bool = False
) -> Dataset:
    """Convert every DICOM SEG under ``in_dir`` with its CT series into the canonical dataset at
    ``out`` (see the module docstring). Raises DatasetError naming the SEG file and UIDs when a
    SEG's series is missing or unreadable, or its frames do not lie on the series' grid."""
    in_dir, out = Path(in_dir), Path(out)
    if not in_dir.is_dir():
        raise DatasetError(f"{in_dir} is not a folder")
    folder = _scan(in_dir)
    if folder.not_dicom:
        log.info("%d files under the input folder are not DICOM; ignored", folder.not_dicom)
    if not folder.segs:
        raise DatasetError(
            f"no DICOM SEG under {in_dir} ({len(folder.series)} image series found); "
            "a case needs a series and a SEG that references it"
        )
    by_uid: dict[str, _Seg] = {}
    for path in folder.segs:
        item = _read_seg(path, in_dir)
        by_uid.setdefault(item.uid, item)  # a copy of the same SEG is one SEG
    segs = list(by_uid.values())
    per_series: dict[str, int] = defaultdict(int)
    for item in segs:
        per_series[item.series_uid] += 1
    dataset = Dataset(
        name=name,
        description=f"CT series with DICOM SEG lesion masks ({len(segs)} SEG objects)",
        root=out,
    )
    for item in sorted(segs, key=lambda s: (s.series_uid, s.uid)):
        case_id = _case_id(item.series_uid, item.uid, per_series[item.series_uid] > 1)
        case = _convert(item, folder, in_dir, out, case_id, all_segments)
        if case is not None:
            dataset.cases.append(case)
    for series_uid, instances in sorted(folder.series.items()):
        if series_uid not in per_series:
            log.info(
                "series %s (%s, %d instances) has no SEG; skipped",
                series_uid,
                folder.modality.get(series_uid, "?"),
                len(instances),
            )
    if not dataset.cases:
        raise DatasetError(f"no SEG under {in_dir} holds a lesion segment; nothing to convert")
    dataset.write(out)
    return dataset


def main_dicom_seg(in_dir: Path, out: Path, all_segments: bool = False) -> Dataset:
    """``aidx dataset dicom-seg IN_DIR OUT``: returns the dataset written."""
    return dicom_seg_dataset(Path(in_dir), Path(out), all_segments=all_segments)


# ---------------------------------------------------------------------------- the folder
def _scan(in_dir: Path) -> _Folder:
    folder = _Folder()
    tags = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"]
    for path in sorted(p for p in in_dir.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            folder.not_dicom += 1
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if sop_class in SEG_CLASSES:
            folder.segs.append(path)
        elif series_uid and "SOPInstanceUID" in ds:
            # The same instance twice (a copy in another folder) is one slice, not two.
            folder.series[series_uid].setdefault(str(ds.SOPInstanceUID), path)
            folder.modality.setdefault(series_uid, str(ds.get("Modality", "")))
        else:
            folder.not_dicom += 1  # DICOMDIR and the like: no series to convert
    return folder


def _where(path: Path, in_dir: Path) -> str:
    try:
        return path.relative_to(in_dir).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class _Seg:
    seg: hd.seg.Segmentation
    uid: str  # its SOP Instance UID
    series_uid: str  # the one series it segments
    where: str  # for messages: UID and file


def _read_seg(path: Path, in_dir: Path) -> _Seg:
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises many kinds; all mean "not a usable SEG"
        raise DatasetError(f"{_where(path, in_dir)}: not a readable DICOM SEG: {exc}") from exc
    seg_uid = str(seg.SOPInstanceUID)
    series = sorted({str(series_uid) for _, series_uid, _ in seg.get_source_image_uids()})
    if len(series) != 1:
        named = ", ".join(series) if series else "none"
        raise DatasetError(
            f"SEG {seg_uid} ({_where(path, in_dir)}) must reference exactly one source series "
            f"(Referenced Series Sequence); it references {named}"
        )
    return _Seg(seg, seg_uid, series[0], f"SEG {seg_uid} ({_where(path, in_dir)})")


def _case_id(series_uid: str, seg_uid: str, shared: bool) -> str:
    case_id = "ct-" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]
    if shared:
        case_id += "-" + hashlib.sha256(seg_uid.encode()).hexdigest()[:6]
    return case_id


# ------------------------------------------------------------------------------ one SEG
def _convert(
    item: _Seg, folder: _Folder, in_dir: Path, out: Path, case_id: str, all_segments: bool
) -> Case | None:
    seg, seg_uid, series_uid, where = item.seg, item.uid, item.series_uid, item.where
    instances = folder.series.get(series_uid)
    if not instances:
        raise DatasetError(
            f"{where} references series {series_uid}, which is not under {in_dir}; "
            "add that series' files to the folder or remove the SEG"
        )
    try:
        volume = load_series(list(instances.values()))
    except VolumeError as exc:
        raise DatasetError(f"{where}: its series {series_uid} cannot be read: {exc}") from exc
    segments = _lesion_segments(seg, all_segments)
    if not segments:
        log.warning(
            "SEG %s (series %s) has no lesion segment (of %d); skipped; "
            "--all-segments takes every segment",
            seg_uid,
            series_uid,
            len(seg.segment_numbers),
        )
        return None
    _check_grid(seg, volume, where)
    mask = _mask(seg, volume, segments)
    labels, lesions = components(mask, volume.affine)
    if not lesions:
        log.warning("SEG %s: the chosen segments are empty; a case without lesions", seg_uid)
    log.info(
        "SEG %s on series %s: segments %s, %d lesions -> case %s",
        seg_uid,
        series_uid,
        segments,
        len(lesions),
        case_id,
    )
    source: dict[str, Any] = {
        "kind": "dicom-seg",
        "study_instance_uid": volume.study_uid,
        "series_instance_uid": volume.series_uid,
        "seg_sop_instance_uid": seg_uid,
        "segments": segments,
    }
    return write_case(
        out, case_id, volume.hu, volume.affine, label=labels, lesions=lesions, source=source
    )


def _lesion_segments(seg: hd.seg.Segmentation, all_segments: bool) -> list[int]:
    numbers = [int(n) for n in seg.segment_numbers]
    if all_segments:
        return numbers
    return [n for n in numbers if _is_lesion(seg.get_segment_description(n))]


def _is_lesion(description: hd.seg.SegmentDescription) -> bool:
    category = description.segmented_property_category
    kind = description.segmented_property_type
    if category.scheme_designator in SNOMED and category.value == ABNORMAL_CATEGORY:
        return True
    if kind.scheme_designator in SNOMED and kind.value in LESION_TYPES:
        return True
    return bool(LESION_LABEL.search(str(description.segment_label)))


def _check_grid(seg: hd.seg.Segmentation, volume: Volume, where: str) -> None:
    """Refuse a SEG whose frames do not lie on the series' slices (see the module docstring)."""
    slices, rows, columns = volume.hu.shape
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise DatasetError(
            f"{where}: frames are {seg.Rows}x{seg.Columns}, the series {volume.series_uid} "
            f"{rows}x{columns}; the SEG is not on the series' grid"
        )
    frame_of_reference = str(seg.get("FrameOfReferenceUID", ""))
    if volume.frame_of_reference_uid and frame_of_reference != volume.frame_of_reference_uid:
        raise DatasetError(
            f"{where}: Frame of Reference {frame_of_reference or '(none)'} differs from the "
            f"series {volume.series_uid}'s {volume.frame_of_reference_uid}"
        )
    frames = volume.frames or (None,) * len(volume.sop_uids)
    index = {key: k for k, key in enumerate(zip(volume.sop_uids, frames, strict=True))}
    shared = (
        seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    )
    voxel = min(volume.spacing)
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        spacing = _group(frame, shared, "PixelMeasuresSequence", "PixelSpacing", where, n)
        if not np.allclose(spacing, volume.spacing[1:], rtol=1e-3, atol=1e-4):
            raise DatasetError(
                f"{where}: frame {n} Pixel Spacing {spacing} differs from the series "
                f"{volume.series_uid}'s {list(volume.spacing[1:])}; the SEG is not on its grid"
            )
        iop = _group(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient", where, n)
        expected = np.concatenate([volume.row_dir, volume.col_dir])
        if not np.allclose(iop, expected, atol=DIRECTION_TOLERANCE):
            raise DatasetError(
                f"{where}: frame {n} Image Orientation (Patient) {iop} differs from the series "
                f"{volume.series_uid}'s; the SEG is not on its grid"
            )
        sources = _sources(frame)
        if not sources:
            raise DatasetError(
                f"{where}: frame {n} names no source image (Derivation Image Sequence > Source "
                "Image Sequence), so it cannot be placed on the series"
            )
        missing = [uid for uid, _ in sources if not any(key[0] == uid for key in index)]
        if missing:
            raise DatasetError(
                f"{where}: frame {n} is derived from image {missing[0]}, which is not among the "
                f"{slices} images of series {volume.series_uid} found; add the missing files"
            )
        position = _group(frame, shared, "PlanePositionSequence", "ImagePositionPatient", where, n)
        if sources[0] not in index:
            raise DatasetError(
                f"{where}: frame {n} is derived from {sources[0][0]} frame {sources[0][1]}, "
                f"which is not a slice of series {volume.series_uid}"
            )
        k = index[sources[0]]
        offset = volume.to_index(position) - np.array([k, 0.0, 0.0])
        if np.abs(offset).max() > GRID_TOLERANCE:
            raise DatasetError(
                f"{where}: frame {n} lies at {position}, "
                f"{np.linalg.norm(offset * np.asarray(volume.spacing)):.2f} mm from its source "
                f"image {sources[0]} ({voxel:.2f} mm voxels); the SEG is not on the series' grid"
            )


def _group(
    frame: DicomDataset,
    shared: DicomDataset | None,
    sequence: str,
    attribute: str,
    where: str,
    n: int,
) -> NDArray[np.float64]:
    """A functional group attribute of a frame, per-frame first, then shared (PS3.3 C.7.6.16)."""
    for group in (frame, shared):
        if group is not None and sequence in group and attribute in group[sequence].value[0]:
            return np.array([float(v) for v in group[sequence].value[0][attribute].value])
    raise DatasetError(f"{where}: frame {n} has no {attribute} ({sequence})")


def _sources(frame: DicomDataset) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame number or None) of each source image a SEG frame names."""
    out = []
    for derivation in frame.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            if "ReferencedSOPInstanceUID" not in source:
                continue
            number = source.get("ReferencedFrameNumber")
            if isinstance(number, MultiValue):
                number = number[0]
            out.append(
                (
                    str(source.ReferencedSOPInstanceUID),
                    None if number in (None, "") else int(number),
                )
            )
    return out


def _mask(seg: hd.seg.Segmentation, volume: Volume, segments: Sequence[int]) -> NDArray[np.bool_]:
    """Union of ``segments`` on the volume grid (k, row, column); one segment at a time, which
    keeps the memory at one volume per segment."""
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    mask = np.zeros(volume.hu.shape, dtype=bool)
    for number in segments:
        pixels = seg.get_pixels_by_source_instance(
            list(volume.sop_uids),
            segment_numbers=[number],
            # _check_grid has checked every frame against its source slice, which is what
            # Spatial Locations Preserved would assert (and many SEGs leave it out).
            ignore_spatial_locations=True,
            # Slices without a frame hold no segment (writers omit empty frames).
            assert_missing_frames_are_empty=True,
            dtype=np.float32 if fractional else np.uint8,
        )
        layer = pixels[..., 0]
        mask |= layer >= FRACTIONAL_THRESHOLD if fractional else layer > 0
    return mask
