"""The AI result as a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom).

Document (PS3.3 A.35.13, Comprehensive 3D SR IOD; PS3.16 TID 1500 "Measurement Report"):

- Title (DCM 126000, "Imaging Measurement Report"); language en-US (TID 1204).
- Observation context (TID 1001/1002/1004): a device observer, name ``aidx``, manufacturer
  ``aidx``, model name ``<model>@<version>``, and a Device Observer UID derived from the model.
- Procedure reported: (169069000, SCT, "CT of chest").
- Image Library (TID 1600/1601): the key slices of the findings (the images the report
  references), or the series' middle image when there are none, so viewers can place the
  coordinates without opening the images first. The evidence (Current Requested Procedure
  Evidence Sequence) lists every image of the series: what the model looked at.
- Imaging Measurements: one TID 1501 "Measurement and Qualitative Evaluation Group" per finding:
  tracking identifier ``Nodule {id}`` and UID (TID 4108, equal to the SEG segment's), Finding
  (27925004, SCT, "Nodule"), Finding Site (39607008, SCT, "Lung"), Algorithm Identification
  (TID 4019: name and version of the model, manufacturer ``aidx``, family DCM 123110 "Artificial
  Intelligence") and three measurements (TID 300):

  * (103339001, SCT, "Long axis") in ``mm``,
  * (118565006, SCT, "Volume") in ``mm3``,
  * (122157, DCM, "Probability") in ``1`` (UCUM "no units"), a value in 0..1: the detector's
    probability for the finding. DICOM has no code for "a detector's probability for a lesion"
    in a TID 1500 value set; DCM 122157 is in the DICOM vocabulary (PS3.16 Annex D), is known to
    pydicom's and highdicom's code dictionaries, and says what the number is. A fraction with
    unit ``1`` rather than a percentage keeps the number the same as in ``findings.json``.

  Each measurement is INFERRED FROM (TID 320) a SCOORD POINT at the finding's centre on its key
  slice (image coordinates, SELECTED FROM that image) and a SCOORD3D POINT at the centre in the
  series' Frame of Reference (patient coordinates, mm). TID 1501 is used rather than TID
  1410/1411 because those templates admit exactly one region reference (a 2D region, a 3D
  region or a segmentation), and a 2D point on the key slice and the 3D centre are both wanted.
- No findings: one TID 1501 group (tracking identifier ``No nodules``) whose qualitative
  evaluation (TID 1501 row "CONTAINS CODE") is (27925004, SCT, "Nodule") = (272519000, SCT,
  "Absent") (CID 240 "Present/Absent"), with finding site and algorithm identification, and no
  Finding item, so a reader that counts nodule groups counts none. highdicom requires at least
  one measurement group in TID 1500; this says "searched, none found" rather than nothing.

The document is COMPLETE, PRELIMINARY and UNVERIFIED (a radiologist's sign-off is a new SR).
Patient, study and accession are copied from the source images by highdicom, and so is the
Specific Character Set, so a name such as ``王^小明`` is written in the source's own character set.
A date, time, age or number among them that does not parse is left empty, with a warning naming
the attribute (``inference.results_common.copyable_sources``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

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
LONG_AXIS = Code("103339001", "SCT", "Long axis")
VOLUME = Code("118565006", "SCT", "Volume")
PROBABILITY = Code("122157", "DCM", "Probability")
ABSENT = Code("272519000", "SCT", "Absent")
MILLIMETER = Code("mm", "UCUM", "millimeter")
CUBIC_MILLIMETER = Code("mm3", "UCUM", "cubic millimeter")
NO_UNITS = Code("1", "UCUM", "no units")
DEVICE = Code("121007", "DCM", "Device")

NO_FINDINGS_TRACKING_ID = "No nodules"
SR_DESCRIPTION = "AI nodule findings"


def build_sr(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    revision: int = 1,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``findings`` on the series whose headers are ``datasets``.

    ``datasets``: the source images (``dcmread(..., stop_before_pixels=True)`` is enough) in
    volume order. ``revision``: the study version (see :func:`result_uid`);
    ``previous_versions``: earlier reports this one supersedes (Predecessor Documents).
    Raises ValueError when the series or a finding cannot be reported.
    """
    series = source_series(datasets)
    check_findings(findings, series)
    algorithm = algorithm_identification(model)
    groups = [_finding_group(f, series, model, algorithm) for f in findings]
    if not groups:
        groups = [_no_findings_group(series, model, algorithm)]
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
        referenced_images=_library(findings, series),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(series.datasets),
        content=report,
        series_instance_uid=result_uid(series.series_uid, model, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(series.series_uid, model, "sr-instance", revision),
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
) -> hd.sr.Comprehensive3DSR:
    """Build the report (see :func:`build_sr`) and write it to ``path`` as a Part 10 file."""
    sr = build_sr(findings, datasets, model, revision, previous_versions)
    save_atomically(sr, path)
    return sr


def _library(findings: Sequence[Finding], series: SourceSeries) -> list[Dataset]:
    return image_library([f.key_sop_instance_uid for f in findings], series)


def image_library(key_sop_instance_uids: Sequence[str], series: SourceSeries) -> list[Dataset]:
    """Images for the Image Library: the key slices, in volume order; the middle image if none.

    Only referenced images: a library of every slice costs about 17 ms per image to build.
    Without findings the middle image still names the series and its Frame of Reference for
    viewers that look the report's images up in the library.
    """
    ks = sorted({series.index[uid] for uid in key_sop_instance_uids})
    if not ks:
        ks = [len(series.datasets) // 2]
    return [series.datasets[k] for k in ks]


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
            ),
        ),
        hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([list(center_mm)], dtype=np.float64),
            frame_of_reference_uid=frame_of_reference_uid,
        ),
    ]


def _finding_group(
    finding: Finding,
    series: SourceSeries,
    model: ModelCard,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one finding."""
    key = series.dataset(finding.key_sop_instance_uid)
    what = f"finding {finding.id}"

    def coordinates() -> list[hd.sr.CoordinatesForMeasurement | hd.sr.CoordinatesForMeasurement3D]:
        return centre_coordinates(key, finding.center_mm, series.frame_of_reference_uid, what)

    measurements = [
        hd.sr.Measurement(name=name, value=value, unit=unit, referenced_coordinates=coordinates())
        for name, value, unit in (
            (LONG_AXIS, finding.diameter_mm, MILLIMETER),
            (VOLUME, finding.volume_mm3, CUBIC_MILLIMETER),
            (PROBABILITY, finding.probability, NO_UNITS),
        )
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(series.series_uid, model, finding.id),
            identifier=tracking_id(finding.id),
        ),
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _no_findings_group(
    series: SourceSeries, model: ModelCard, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group that states that the model found no nodule."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(series.series_uid, model, "tracking none"),
            identifier=NO_FINDINGS_TRACKING_ID,
        ),
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=NODULE, value=ABSENT)],
    )
