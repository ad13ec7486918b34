"""The AI result's nodule masks as a DICOM Segmentation (PS3.3 A.51 Segmentation IOD, highdicom).

- Segmentation Type BINARY (the most widely readable type), one segment per finding, numbered in
  the order of the findings, labelled ``Nodule {id}``.
- Each segment (Segment Description, PS3.3 C.8.20.2): Segmented Property Category (49755003,
  SCT, "Morphologically abnormal structure") (CID 7150), Segmented Property Type (27925004,
  SCT, "Nodule") (CID 7151), Anatomic Region (39607008, SCT, "Lung"), Segment Algorithm Type
  AUTOMATIC with Segmentation Algorithm Identification (name and version of the model, family
  DCM 123110 "Artificial Intelligence", source ``aidx``), and Tracking ID and Tracking UID equal
  to those of the finding's measurement group in the SR (``inference.results_common``).
- Each segment has a Recommended Display CIELab Value: the colour the review app draws that
  finding in (``inference.results_common.finding_colour``), so 3D Slicer and OHIF tell the
  segments apart.
- Frames: only source slices that hold a segment are written, one frame per segment and slice
  (highdicom also omits empty frames); each frame names its source image (Derivation Image
  Sequence) and carries the source image's position, so it lies exactly on the source grid.
- Masks come on the source volume grid: ``Finding.mask`` is a bool array shaped like
  ``Volume.hu``, (k, row, column) with k in volume order; k maps to ``datasets[k]``.
- No findings, no SEG: :func:`build_seg` refuses an empty list; the SR says "no nodules".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference.findings import Finding
from inference.results_common import (
    ARTIFICIAL_INTELLIGENCE,
    LUNG,
    MANUFACTURER,
    NODULE,
    SEG_SERIES_NUMBER,
    SourceSeries,
    check_findings,
    device_uid,
    finding_colour,
    result_uid,
    save_atomically,
    series_description,
    source_series,
    tracking_id,
    tracking_uid,
)
from inference.volume import frame_count
from models.registry import ModelCard

MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")

SEG_DESCRIPTION = "AI nodule segmentation"
CONTENT_LABEL = "NODULES"


def build_seg(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    revision: int = 1,
    frames: Sequence[int | None] | None = None,
) -> hd.seg.Segmentation:
    """The SEG of the findings' masks on the series whose headers are ``datasets``.

    ``datasets``: the source images (headers are enough) in volume order, as ``Volume.sop_uids``;
    ``frames`` as ``Volume.frames`` for a multi-frame instance (the SEG's frames then reference
    its frames). Every finding needs a non-empty ``mask`` shaped like the volume. Raises
    ValueError if not.
    """
    if len(findings) == 0:
        raise ValueError("no findings: a SEG needs at least one segment (write only the SR)")
    series = source_series(datasets, frames)
    check_findings(findings, series)
    masks = [_checked_mask(f, series) for f in findings]
    if any(frame is not None for frame in series.frames):
        source_images, pixel_array = _multiframe_source(series, masks)
    else:
        slices = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))
        source_images, pixel_array = [series.datasets[k] for k in slices], _pixels(masks, slices)
    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(i, f, series, model) for i, f in enumerate(findings, 1)],
        series_instance_uid=result_uid(series.series_uid, model, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_uid(series.series_uid, model, "seg-instance", revision),
        instance_number=revision,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=device_uid(model),
        content_label=CONTENT_LABEL,
        content_description=series_description(SEG_DESCRIPTION, model),
        series_description=series_description(SEG_DESCRIPTION, model),
    )


def write_seg(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    path: Path,
    revision: int = 1,
    frames: Sequence[int | None] | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG (see :func:`build_seg`) and write it to ``path`` as a Part 10 file."""
    seg = build_seg(findings, datasets, model, revision, frames)
    save_atomically(seg, path)
    return seg


def algorithm_identification(model: ModelCard) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        source=MANUFACTURER,
    )


def _segment(
    number: int, finding: Finding, series: SourceSeries, model: ModelCard
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=tracking_id(finding.id),
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=NODULE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=tracking_uid(series.series_uid, model, finding.id),
        tracking_id=tracking_id(finding.id),
        anatomic_regions=[LUNG],
        # the review app's colour for the finding (Slicer and OHIF show each segment in it)
        display_color=hd.color.CIELabColor.from_rgb(*finding_colour(number - 1)),
    )


def _checked_mask(finding: Finding, series: SourceSeries) -> NDArray[np.bool_]:
    mask = finding.mask
    if mask is None:
        raise ValueError(f"finding {finding.id} has no mask; a SEG needs one per finding")
    if mask.shape != series.shape:
        raise ValueError(
            f"finding {finding.id}: mask shape {mask.shape} is not the volume's {series.shape} "
            "(k, rows, columns)"
        )
    if mask.dtype != np.bool_:
        raise ValueError(f"finding {finding.id}: mask must be bool, got {mask.dtype}")
    if not mask.any():
        raise ValueError(f"finding {finding.id}: mask is empty")
    return mask


def _multiframe_source(
    series: SourceSeries, masks: list[NDArray[np.bool_]]
) -> tuple[list[Dataset], NDArray[np.uint8]]:
    """The source (one multi-frame instance) and the masks in its frame order, as highdicom
    takes a multi-frame source: one array frame per source frame (empty ones are left out of
    the SEG)."""
    instances = {str(ds.SOPInstanceUID): ds for ds in series.instances}
    if len(instances) != 1 or any(frame is None for frame in series.frames):
        raise ValueError(
            "a SEG of a multi-frame series needs one multi-frame instance; the series has "
            f"{len(instances)} instances"
        )
    (instance,) = instances.values()
    everything = _pixels(masks, np.arange(len(series.frames)))
    pixels = np.zeros((frame_count(instance), *everything.shape[1:]), dtype=np.uint8)
    for k, frame in enumerate(series.frames):
        assert frame is not None
        pixels[frame - 1] = everything[k]
    return [instance], pixels


def _pixels(masks: list[NDArray[np.bool_]], slices: NDArray[np.intp]) -> NDArray[np.uint8]:
    """The masks on the slices that hold any, as highdicom takes them.

    Label-map style, (slice, row, column) with value i for segment i, when no two masks share a
    voxel (the usual case, and a fraction of the memory); else stacked, (slice, row, column,
    segment). Both give the same BINARY frames.
    """
    picked = [m[slices] for m in masks]
    counts = np.sum(picked, axis=0, dtype=np.uint16)
    if len(masks) < 256 and counts.max() <= 1:
        labels = np.zeros(picked[0].shape, dtype=np.uint8)
        for number, mask in enumerate(picked, 1):
            labels[mask] = number
        return labels
    return np.stack(picked, axis=-1).astype(np.uint8)
