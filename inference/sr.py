"""The AI result as a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom).

Document (PS3.3 A.35.13, Comprehensive 3D SR IOD; PS3.16 TID 1500 "Measurement Report"); the
tree, and which viewer needs what, are in docs/results.md:

- Title (DCM 126000, "Imaging Measurement Report"); language en-US (TID 1204).
- Observation context (TID 1001/1002/1004): a device observer, name ``aidx``, manufacturer
  ``aidx``, model name ``<model>@<version>``, and a Device Observer UID derived from the model.
- Procedure reported: (169069000, SCT, "CT of chest").
- Image Library (TID 1600/1601): the images the report's lines are drawn on (the findings' key
  slices), or the series' middle image when there are none. The evidence lists every image of
  the series (what the model looked at) and the SEG written beside the SR.
- Imaging Measurements: one TID 1411 "Volumetric ROI Measurements" group per finding, whose ROI
  is the finding's segment in the SEG (Referenced Segment, Source Series for Segmentation):
  tracking identifier ``Nodule {id}`` and UID (TID 4108, equal to the SEG segment's), Finding
  (27925004, SCT, "Nodule"), Finding Site (39607008, SCT, "Lung"), Algorithm Identification
  (TID 4019) and, in this order (TID 300):

  * (103339001, SCT, "Long Axis") and (103340004, SCT, "Short Axis") in ``mm``: the caliper
    measurement on the key slice (:mod:`inference.axes`, on the SEG mask's cross-section),
    each INFERRED FROM its 2-point SCOORD POLYLINE on that image (SELECTED FROM it). OHIF places
    a measurement only by such a SCOORD, and draws the first NUM's; Cornerstone3D hydrates the
    two as a bidirectional tool.
  * (81827009, SCT, "Diameter") with Derivation (56851009, SCT, "Maximum") in ``mm``: the
    finding's longest extent in 3D (``Finding.diameter_mm``).
  * (118565006, SCT, "Volume") in ``mm3``: exactly the SEG segment's voxels.
  * (122157, DCM, "Probability") in ``%`` (UCUM): the detector's probability, 0..100 (OHIF shows
    the unit's code, so "93.00 %" rather than "0.93 1"; ``findings.json`` keeps 0..1).
- No findings: TID 1500's "searched, none found" — an Imaging Measurements container with no
  group and a Qualitative Evaluations container (TID 1500 row 10) with (27925004, SCT,
  "Nodule") = (272519000, SCT, "Absent"). Read the groups with :func:`finding_groups`:
  highdicom's getters raise on an empty container.
- ``cornerstone=True``: the same report, under its own SOP Instance UID, with each Tracking
  Identifier prefixed by Cornerstone3D's tool tag (``Cornerstone3DTools@^0.1.0:Bidirectional:
  Nodule 1``), which is what makes Cornerstone3D (and OHIF) open the groups as editable tools.

The document is COMPLETE, PRELIMINARY and UNVERIFIED (a radiologist's sign-off is a new SR).
Patient, study and accession are copied from the source images by highdicom, and so is the
Specific Character Set, so a name such as ``王^小明`` is written in the source's own character set.
A date, time, age or number among them that does not parse is left empty, with a warning naming
the attribute (``inference.results_common.copyable_sources``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.axes import Axes, measure_axes, scoord
from inference.findings import Finding
from inference.results_common import (
    ARTIFICIAL_INTELLIGENCE,
    LUNG,
    MANUFACTURER,
    NODULE,
    SR_SERIES_NUMBER,
    SourceSeries,
    check_findings,
    device_uid,
    model_ref,
    result_uid,
    save_atomically,
    series_description,
    source_series,
    tracking_id,
    tracking_uid,
)
from models.registry import ModelCard

# Codes (PS3.16): concept names and values written into the report.
CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")
# CID 7470 "Linear Measurement" meanings, capitalised as the CID gives them: Cornerstone3D finds a
# bidirectional measurement's two NUMs by these meanings.
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")
DIAMETER = Code("81827009", "SCT", "Diameter")
MAXIMUM = Code("56851009", "SCT", "Maximum")  # CID 3488 "Min/Max/Mean": the Diameter's derivation
VOLUME = Code("118565006", "SCT", "Volume")
PROBABILITY = Code("122157", "DCM", "Probability")
ABSENT = Code("272519000", "SCT", "Absent")
MILLIMETER = Code("mm", "UCUM", "millimeter")
CUBIC_MILLIMETER = Code("mm3", "UCUM", "cubic millimeter")
PERCENT = Code("%", "UCUM", "percent")
DEVICE = Code("121007", "DCM", "Device")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 10
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements.value  # "126010"

NO_FINDINGS_TRACKING_ID = "No nodules"
SR_DESCRIPTION = "AI nodule findings"
# Cornerstone3D (and so OHIF) turns an SR measurement group into an editable tool only when its
# Tracking Identifier starts with the tool's tag (adapters' BaseAdapter3D); see docs/results.md.
CORNERSTONE_BIDIRECTIONAL = "Cornerstone3DTools@^0.1.0:Bidirectional"


def build_sr(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    revision: int = 1,
    previous_versions: Sequence[Dataset] = (),
    cornerstone: bool = False,
    frames: Sequence[int | None] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``findings`` on the series whose headers are ``datasets``.

    ``datasets``: the source images (``dcmread(..., stop_before_pixels=True)`` is enough) in
    volume order; every finding needs its mask (the axes are measured on it). ``revision``: the
    study version (see :func:`result_uid`); ``previous_versions``: earlier reports this one
    supersedes (Predecessor Documents). Each finding's group references its segment in the SEG
    that :func:`inference.seg.build_seg` writes for the same findings, model and revision.
    ``cornerstone``: the variant whose Tracking Identifiers Cornerstone3D hydrates into editable
    bidirectional tools (its own SOP Instance UID; docs/results.md). ``frames``: the slices'
    frame numbers in their multi-frame instance (``Volume.frames``; see
    :func:`inference.results_common.source_series`). Raises ValueError when the series or a
    finding cannot be reported.
    """
    series = source_series(datasets, frames)
    check_findings(findings, series)
    algorithm = algorithm_identification(model)
    seg = _seg_reference(series, model, revision)
    measured = [_measured(f, series) for f in findings]
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        _finding_group(number, f, m, series, model, algorithm, seg, cornerstone)
        for number, (f, m) in enumerate(zip(findings, measured, strict=True), start=1)
    ]
    placeholder = not groups
    if placeholder:
        groups = [_placeholder_group(series, model)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept.from_code(DEVICE),
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=device_uid(model),
                    name=MANUFACTURER,
                    manufacturer_name=MANUFACTURER,
                    model_name=model_ref(model),
                ),
            )
        ),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=groups,
        referenced_images=image_library([m.slice for m in measured], series),
    )
    if placeholder:
        state_no_findings(report)
    number_library_frames(report, library_slices([m.slice for m in measured], series), series)
    kind = "sr-cornerstone-instance" if cornerstone else "sr-instance"
    return hd.sr.Comprehensive3DSR(
        evidence=[*_instances(series), *([seg] if findings else [])],
        content=report,
        series_instance_uid=result_uid(series.series_uid, model, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(series.series_uid, model, kind, revision),
        instance_number=revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(SR_DESCRIPTION, model),
        manufacturer_model_name=model.name,
        software_versions=model.version,
        previous_versions=list(previous_versions) or None,
    )


def write_sr(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    path: Path,
    revision: int = 1,
    previous_versions: Sequence[Dataset] = (),
    cornerstone: bool = False,
    frames: Sequence[int | None] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the report (see :func:`build_sr`) and write it to ``path`` as a Part 10 file."""
    sr = build_sr(findings, datasets, model, revision, previous_versions, cornerstone, frames)
    save_atomically(sr, path)
    return sr


def library_slices(slices: Sequence[int], series: SourceSeries) -> list[int]:
    """The slices the Image Library lists: the key slices, each once, in volume order; the
    middle slice if none."""
    return sorted(set(slices)) or [len(series.datasets) // 2]


def number_library_frames(
    report: hd.sr.MeasurementReport, slices: Sequence[int], series: SourceSeries
) -> None:
    """Give each Image Library entry of a frame its Referenced Frame Number (highdicom
    references whole instances); ``slices`` as :func:`library_slices` returns them."""
    frames = [series.frame(k) for k in slices]
    if all(frame is None for frame in frames):
        return
    (library,) = hd.sr.utils.find_content_items(report[0], name=codes.DCM.ImageLibrary)
    images = hd.sr.utils.find_content_items(library, value_type="IMAGE", recursive=True)
    for item, frame in zip(images, frames, strict=True):
        if frame is not None:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = frame


def image_library(slices: Sequence[int], series: SourceSeries) -> list[Dataset]:
    """Images for the Image Library: the key slices (indices k), each once, in volume order; the
    middle image if none.

    Only referenced images: a library of every slice costs about 17 ms per image to build.
    Without findings the middle image still names the series and its Frame of Reference for
    viewers that look the report's images up in the library. A frame of a multi-frame instance
    is its frame view (the instance is named once per frame; the frame is in the coordinates).
    """
    return [series.datasets[k] for k in library_slices(slices, series)]


def _instances(series: SourceSeries) -> list[Dataset]:
    """The series' headers, one per instance (a multi-frame instance once), for the evidence."""
    unique: dict[str, Dataset] = {}
    for ds in series.datasets:
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    return list(unique.values())


class NamedModel(Protocol):
    """What names a model in a report: a :class:`ModelCard`, or the ``name@version`` that a
    result records (the radiologist's sign-off, ``ui.signoff``, has only that)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


def algorithm_identification(model: NamedModel) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the model."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=ARTIFICIAL_INTELLIGENCE,
        manufacturer=MANUFACTURER,
    )


def key_slice_point(
    ds: Dataset, center_mm: Sequence[float] | NDArray[np.floating]
) -> tuple[float, float]:
    """(column, row) of a patient point projected onto an image, as SCOORD Graphic Data.

    SCOORD puts 0.0\\0.0 at the top left corner of the top left pixel (PS3.3 C.18.6.1.1), so
    the centre of pixel (row r, column c) is (c + 0.5, r + 0.5).
    """
    iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    offset = np.asarray(center_mm, dtype=np.float64) - np.array(
        [float(v) for v in ds.ImagePositionPatient], dtype=np.float64
    )
    spacing_rows, spacing_columns = (float(v) for v in ds.PixelSpacing)
    column = float(offset @ iop[:3]) / spacing_columns + 0.5
    row = float(offset @ iop[3:]) / spacing_rows + 0.5
    return column, row


def centre_coordinates(
    key: Dataset,
    center_mm: Sequence[float],
    frame_of_reference_uid: str,
    what: str = "finding",
    frame: int | None = None,
) -> list[hd.sr.CoordinatesForMeasurement | hd.sr.CoordinatesForMeasurement3D]:
    """The regions a measurement is INFERRED FROM (TID 320): a SCOORD POINT at the centre
    projected onto its key slice ``key`` (SELECTED FROM that image) and a SCOORD3D POINT at the
    centre in the Frame of Reference (patient coordinates, mm). New content items on each call
    (one set per measurement). ValueError, naming ``what``, when the centre falls outside the
    key slice."""
    column, row = key_slice_point(key, center_mm)
    columns, rows = int(key.Columns), int(key.Rows)
    if not (0.0 <= column <= columns and 0.0 <= row <= rows):
        raise ValueError(
            f"{what}: centre {center_mm} falls outside its key slice {key.SOPInstanceUID} "
            f"(column {column:.1f}, row {row:.1f} of {columns}x{rows})"
        )
    return [
        hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=np.array([[column, row]]),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(key.SOPClassUID),
                referenced_sop_instance_uid=str(key.SOPInstanceUID),
                referenced_frame_numbers=None if frame is None else [frame],
            ),
        ),
        hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([list(center_mm)], dtype=np.float64),
            frame_of_reference_uid=frame_of_reference_uid,
        ),
    ]


@dataclass(frozen=True)
class _Axes:
    """A finding's caliper measurement: the slice it is drawn on and its two axes there."""

    slice: int  # k
    axes: Axes


def _measured(finding: Finding, series: SourceSeries) -> _Axes:
    """The long and short axes of the finding's mask on its key slice, or, when the mask misses
    the key slice (a component thinner than a slice whose centre falls between two), on the
    slice where its cross-section is largest. ValueError without a mask."""
    if finding.mask is None:
        raise ValueError(f"finding {finding.id} has no mask; the SR measures its axes on it")
    if finding.mask.shape != series.shape:
        raise ValueError(
            f"finding {finding.id}: mask shape {finding.mask.shape} is not the volume's "
            f"{series.shape} (k, rows, columns)"
        )
    k = series.slice_of(finding.key_sop_instance_uid, finding.key_frame)
    if not finding.mask[k].any():
        areas = finding.mask.sum(axis=(1, 2))
        if not areas.any():
            raise ValueError(f"finding {finding.id}: mask is empty")
        k = int(np.argmax(areas))
    ds = series.datasets[k]
    rows, columns = (float(v) for v in ds.PixelSpacing)
    return _Axes(k, measure_axes(finding.mask[k], (rows, columns)))


def _seg_reference(series: SourceSeries, model: ModelCard, revision: int) -> Dataset:
    """The SEG's identity as evidence (its UIDs are derived, as :func:`inference.seg.build_seg`
    derives them), so that the SR names the SEG written beside it."""
    seg = Dataset()
    seg.StudyInstanceUID = series.datasets[0].StudyInstanceUID
    seg.SeriesInstanceUID = result_uid(series.series_uid, model, "seg-series")
    seg.SOPClassUID = SEGMENTATION_STORAGE
    seg.SOPInstanceUID = result_uid(series.series_uid, model, "seg-instance", revision)
    return seg


def _finding_group(
    number: int,
    finding: Finding,
    measured: _Axes,
    series: SourceSeries,
    model: ModelCard,
    algorithm: hd.sr.AlgorithmIdentification,
    seg: Dataset,
    cornerstone: bool,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of finding ``number`` (its segment number in the SEG), with the caliper
    axes' NUMs INFERRED FROM their lines on the image (docs/results.md: why both)."""
    axes = measured.axes
    identifier = tracking_id(finding.id)
    if cornerstone:
        identifier = f"{CORNERSTONE_BIDIRECTIONAL}:{identifier}"
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(series.series_uid, model, finding.id), identifier=identifier
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=SEGMENTATION_STORAGE,
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series.series_uid),
        ),
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=LONG_AXIS, value=axes.long_mm, unit=MILLIMETER),
            hd.sr.Measurement(name=SHORT_AXIS, value=axes.short_mm, unit=MILLIMETER),
            hd.sr.Measurement(
                name=DIAMETER, value=finding.diameter_mm, unit=MILLIMETER, derivation=MAXIMUM
            ),
            hd.sr.Measurement(name=VOLUME, value=finding.volume_mm3, unit=CUBIC_MILLIMETER),
            hd.sr.Measurement(name=PROBABILITY, value=100.0 * finding.probability, unit=PERCENT),
        ],
    )
    image = series.datasets[measured.slice]
    frame = series.frame(measured.slice)
    for name, segment in ((LONG_AXIS, axes.long), (SHORT_AXIS, axes.short)):
        _num(group, name).ContentSequence.append(
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=scoord(segment),
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=str(image.SOPClassUID),
                    referenced_sop_instance_uid=str(image.SOPInstanceUID),
                    referenced_frame_numbers=None if frame is None else [frame],
                ),
            )
        )
    return group


def _num(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, name: Code) -> Dataset:
    """The NUM content item ``name`` of a measurement group, with a Content Sequence."""
    item: Dataset
    for item in group[0].ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "NUM" and concept.CodeValue == name.value:
            if "ContentSequence" not in item:
                item.ContentSequence = hd.sr.ContentSequence()
            return item
    raise LookupError(f"the group has no {name.meaning} measurement")


def _placeholder_group(
    series: SourceSeries, model: NamedModel
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group for highdicom to build the report around (it wants one); removed again by
    :func:`state_no_findings`."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_placeholder_uid(series, model), identifier=NO_FINDINGS_TRACKING_ID
        ),
    )


def _placeholder_uid(series: SourceSeries, model: NamedModel) -> str:
    return result_uid(series.series_uid, model, "tracking none")  # type: ignore[arg-type]


def state_no_findings(report: hd.sr.MeasurementReport) -> None:
    """Turn a report built around a placeholder group into TID 1500's "searched, none found":
    an Imaging Measurements container with no measurement group, and a Qualitative Evaluations
    container (TID 1500 row 10) saying (27925004, SCT, "Nodule") = (272519000, SCT, "Absent").

    Every viewer tried opens it (OHIF fails on a measurement group without coordinates;
    Cornerstone3D fails without an Imaging Measurements container), and a reader that counts
    nodule groups counts none.
    """
    root = report[0]
    for item in root.ContentSequence:
        if (
            item.ValueType == "CONTAINER"
            and item.ConceptNameCodeSequence[0].CodeValue == _IMAGING_MEASUREMENTS
        ):
            del item.ContentSequence
            break
    else:  # pragma: no cover - highdicom always writes the container
        raise LookupError("the report has no Imaging Measurements container")
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=NODULE, value=ABSENT, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        ]
    )
    root.ContentSequence.append(evaluations)


def finding_groups(
    report: hd.sr.MeasurementReport,
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
]:
    """The measurement groups of a report aidx wrote: TID 1411 (AI findings) and TID 1501
    (a radiologist's), none for a "no nodule" report. highdicom's own getters raise on the
    latter's empty Imaging Measurements container (they expect its Content Sequence)."""
    root = report[0]
    container = next(
        (
            item
            for item in root.ContentSequence
            if item.ValueType == "CONTAINER"
            and item.ConceptNameCodeSequence[0].CodeValue == _IMAGING_MEASUREMENTS
        ),
        None,
    )
    if container is None or "ContentSequence" not in container:
        return []
    return [
        *report.get_volumetric_roi_measurement_groups(),
        *report.get_image_measurement_groups(),
    ]
