"""The signed report itself: a verified TID 1500 Comprehensive 3D SR built from a review's final
findings (ui/signoff.py signs, records and queues it; its docstring describes the document, the
codes and the UIDs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import aidx
from inference.results_common import (
    ACCEPTED,
    ADDED,
    AI_LONG_AXIS,
    CODING_SCHEME,
    DECISION,
    EDITED,
    LUNG,
    MANUFACTURER,
    NODULE,
    SourceSeries,
    tracking_id,
)
from inference.sr import (
    CT_OF_CHEST,
    CUBIC_MILLIMETER,
    LONG_AXIS,
    MILLIMETER,
    NO_FINDINGS_TRACKING_ID,
    PERCENT,
    PROBABILITY,
    VOLUME,
    algorithm_identification,
    centre_coordinates,
    finding_groups,
    image_library,
    library_slices,
    number_library_frames,
    state_no_findings,
)
from ui.review import ReviewCase, ReviewedFinding, ReviewError

PERSON = Code("121006", "DCM", "Person")  # CID 270 Observer Type
PHYSICIAN = Code("309343006", "SCT", "Physician")  # CID 7452 Organizational Roles
VERIFYING = Code("121098", "DCM", "Verifying")  # CID 7453 Performing Roles

SIGNED_SR_SERIES_NUMBER = 9004  # after the AI SR (9001), SEG (9002) and key images (9003)
SIGNED_SR_DESCRIPTION = "Radiologist-verified nodule findings"
UTF8 = "ISO_IR 192"
PN_MAX = 64  # characters of a PN component group
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\=]")  # not allowed in PN/LO ("=" separates PN groups)


def person_name(display_name: str, username: str = "") -> str:
    """A DICOM PN (alphabetic group) for a user's free-text display name.

    A name that already holds ``^`` is taken as a PN (``Smith^Anna``). Otherwise the last word
    is the family name and the words before it the given names: ``Anna Smith`` becomes
    ``Smith^Anna``, ``Anna Maria Smith`` ``Smith^Anna Maria``; a single word is a family name
    (``Smith^``: the trailing caret says so). An empty name falls back to ``username``.
    Backslashes, ``=`` and control characters are dropped; the result is cut to 64 characters.
    """
    text = " ".join(_clean(display_name).split())
    if "^" not in text:
        words = text.split(" ") if text else [_clean(username).strip() or "unknown"]
        text = f"{words[-1]}^{' '.join(words[:-1])}"
    return text[:PN_MAX]


@dataclass(frozen=True)
class Signer:
    """Who signs: the Verifying Observer and the person observer of the report."""

    name: str  # PN
    organisation: str
    username: str


def build_signed_sr(
    findings: Sequence[ReviewedFinding],
    series: SourceSeries,
    ai_sr: hd.sr.Comprehensive3DSR,
    case: ReviewCase,
    *,
    signer: Signer,
    sop_instance_uid: str,
    series_instance_uid: str,
    instance_number: int,
    previous_versions: Sequence[Dataset],
) -> hd.sr.Comprehensive3DSR:
    """The verified TID 1500 report of the included ``findings`` (module docstring)."""
    model = _Model(case.model_name, case.model_version)
    algorithm = algorithm_identification(model)
    tracking = _tracking_uids(ai_sr)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    keys: list[int] = []  # the key slices (k)
    for f in findings:
        if not f.included:
            continue
        if f.ai is not None:
            identifier = tracking_id(f.ai.id)
            if identifier not in tracking:
                raise ReviewError(
                    f"the AI SR {case.sr_sop_uid} has no group {identifier!r} for finding "
                    f"{f.key}; the result files do not match the review"
                )
            key = series.slice_of(f.ai.key_sop_instance_uid, f.ai.key_frame)
            uid = tracking[identifier]
        else:
            identifier = f"Added nodule {f.key.partition('-')[2]}"
            key = _nearest_image(f, series)
            uid = _uid(case.sr_sop_uid, "tracking", f.key)
        groups.append(_group(f, key, series, identifier, uid, algorithm))
        keys.append(key)
    placeholder = not groups
    if placeholder:  # built around one group, then stated as "no nodule" (inference.sr)
        groups = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid(case.sr_sop_uid, "tracking none"),
                    identifier=NO_FINDINGS_TRACKING_ID,
                ),
            )
        ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept.from_code(PERSON),
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name=signer.name,
                    login_name=signer.username,
                    organization_name=signer.organisation,
                    role_in_organization=PHYSICIAN,
                    role_in_procedure=VERIFYING,
                ),
            )
        ),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=groups,
        referenced_images=image_library(keys, series),
    )
    if placeholder:
        state_no_findings(report)
    number_library_frames(report, library_slices(keys, series), series)
    return hd.sr.Comprehensive3DSR(
        evidence=list({str(ds.SOPInstanceUID): ds for ds in series.datasets}.values()),
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=SIGNED_SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=signer.name,
        verifying_organization=signer.organisation,
        series_description=SIGNED_SR_DESCRIPTION,
        software_versions=aidx.__version__,
        previous_versions=list(previous_versions),
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=CODING_SCHEME,
                name="aidx review decisions",
                responsible_organization=MANUFACTURER,
            )
        ],
        specific_character_set=_character_set(
            series.datasets[0], (signer.name, signer.organisation)
        ),
    )


# ------------------------------------------------------------------------------- internals
def _group(
    f: ReviewedFinding,
    key: int,
    series: SourceSeries,
    identifier: str,
    uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one included finding (key slice ``key``), with its decision."""

    def measurement(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
        coordinates = centre_coordinates(
            series.datasets[key],
            f.center_mm,
            series.frame_of_reference_uid,
            f"finding {f.key}",
            series.frame(key),
        )
        return hd.sr.Measurement(
            name=name, value=value, unit=unit, referenced_coordinates=coordinates
        )

    measurements = [measurement(LONG_AXIS, f.diameter_mm, MILLIMETER)]
    if f.ai is not None:
        if f.status == "accepted":
            measurements.append(measurement(VOLUME, f.ai.volume_mm3, CUBIC_MILLIMETER))
        else:
            measurements.append(measurement(AI_LONG_AXIS, f.ai.diameter_mm, MILLIMETER))
        measurements.append(measurement(PROBABILITY, 100.0 * f.ai.probability, PERCENT))
    decision = {"accepted": ACCEPTED, "edited": EDITED, "added": ADDED}[f.status]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm if f.ai is not None else None,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=DECISION, value=decision)],
    )


def _nearest_image(f: ReviewedFinding, series: SourceSeries) -> int:
    """The slice (k) nearest an added finding's centre along the slice normal; ReviewError when
    the centre lies beyond the series (more than half a slice past either end) or beside it."""
    first = series.datasets[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    along = (
        np.array(
            [[float(v) for v in ds.ImagePositionPatient] for ds in series.datasets],
            dtype=np.float64,
        )
        @ normal
    )
    centre = float(np.asarray(f.center_mm, dtype=np.float64) @ normal)
    half = float(np.median(np.diff(along))) / 2 if len(along) > 1 else 0.5
    k = int(np.argmin(np.abs(along - centre)))
    where = f"added finding {f.key} at {tuple(round(v, 1) for v in f.center_mm)} mm"
    if not along[0] - half - 1e-3 <= centre <= along[-1] + half + 1e-3:
        raise ReviewError(f"{where} lies beyond the series' images; remove it and add it again")
    key = series.datasets[k]
    try:
        centre_coordinates(key, f.center_mm, series.frame_of_reference_uid, where)
    except ValueError:
        raise ReviewError(
            f"{where} lies beside the images (outside slice {key.SOPInstanceUID}); remove it "
            "and add it again"
        ) from None
    return k


def _character_set(source: Dataset, texts: Sequence[str]) -> str | list[str] | None:
    """The source images' Specific Character Set when it can carry ``texts`` (the names the
    sign-off adds), else UTF-8 (pydicom re-encodes the patient's name), so no name becomes "?"."""
    value = source.get("SpecificCharacterSet")
    charset = None if value is None else (value if isinstance(value, str) else list(value))
    codecs = convert_encodings(charset) if charset else ["ascii"]
    for text in texts:
        if not any(_encodes(text, codec) for codec in codecs):
            return UTF8
    return charset


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def _clean(text: str) -> str:
    return _CONTROL.sub("", text or "")


@dataclass(frozen=True)
class _Model:
    name: str
    version: str


def _tracking_uids(ai_sr: hd.sr.Comprehensive3DSR) -> dict[str, str]:
    """Tracking Identifier -> Tracking Unique Identifier of the AI SR's groups."""
    content = ai_sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ReviewError(f"the AI SR {ai_sr.SOPInstanceUID} is not a TID 1500 report")
    return {
        str(g.tracking_identifier): str(g.tracking_uid)
        for g in finding_groups(content)
        if g.tracking_identifier is not None and g.tracking_uid is not None
    }


def _uid(*parts: str) -> str:
    # As inference.results_common: one JSON string as the entropy, so parts cannot run together.
    return str(generate_uid(entropy_srcs=[json.dumps(["aidx-signed", *parts])]))
