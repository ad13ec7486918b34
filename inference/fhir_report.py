"""The AI result, and the radiologist's signed report, as an HL7 FHIR R4 ``DiagnosticReport``
for the EMR (issue 20; the profile is in docs/conformance.md, "FHIR DiagnosticReport").

The report renders the SR of record, not a second reading of the study: the preliminary report
is the AI SR (TID 1500, ``inference.sr``), the final one the signed SR (``ui.signed_sr``) plus
the AI SR's findings the radiologist rejected. Each measurement group becomes one contained
``Observation`` with the group's own codes (finding, finding site, Long Axis in mm,
Probability in %, Volume, the decision), translated from DICOM coding schemes to FHIR code
systems (:data:`CODE_SYSTEMS`); nothing is measured again.

Contained resources rather than a transaction Bundle: an EMR takes one resource in one request,
and a conditional update of that one resource replaces the report and its findings atomically
(a Bundle would leave a previous version's Observations behind, or need an identifier and a
conditional update per finding, which servers support unevenly). The findings have no identity
of their own outside the report; each still carries its SR group's Tracking UID as an identifier.

- identifier: ``urn:dicom:uid`` | ``urn:oid:<report UID>``, a UID derived from the AI SR's SOP
  Instance UID (:func:`report_uid`): the same for the preliminary, final and amended versions, so
  the conditional update ``PUT [base]/DiagnosticReport?identifier=...`` replaces one report; and,
  secondary, the SOP Instance UID of the SR this version renders.
- status: ``preliminary`` (AI SR), ``final`` (first signing), ``amended`` (signed again after
  the review was re-opened: the signed SR's Instance Number > 1).
- subject: Reference by identifier to the Patient: the DICOM Patient ID, with
  ``fhir.patient_identifier_system`` as its system; no name, no birth date.
- imagingStudy: Reference by identifier (``urn:dicom:uid`` | ``urn:oid:<Study Instance UID>``);
  presentedForm: the SR by WADO-RS (``application/dicom``) when the DICOMweb service is on.
- the model: a contained ``Device`` (``<name>@<version>``), the ``device`` of every Observation
  of an AI finding (R4 allows no Device as the report's performer); the radiologist: a contained
  ``Practitioner`` (the verifying observer's name, as the review app records it), the report's
  performer and resultsInterpreter and each Observation's performer.
- a rejected AI finding: status ``entered-in-error`` (withdrawn after the preliminary release),
  decision REJECTED; no finding at all: one Observation Nodule = Absent, as the SR says.

Every resource is validated with ``fhir.resources`` (R4B models: for DiagnosticReport,
Observation, Device and Practitioner R4B has the same elements as R4 4.0.1, and fhir.resources
has no R4 package that runs on pydantic 2) and against the R4 required value sets of the
statuses, which fhir.resources does not check, before it is written: an invalid one is a bug
(:class:`FhirReportError`).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import PersonName

from aidx.config_fhir import OUTBOX_KEY_PREFIX
from inference.results_common import (
    ADDED,
    ARTIFICIAL_INTELLIGENCE,
    CODING_SCHEME,
    DECISION,
    MANUFACTURER,
    NODULE,
    REJECTED,
    _uid,
    write_atomically,
)
from inference.sr import ABSENT

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.config_fhir import ReportKind

DICOM_UID = "urn:dicom:uid"
# The FHIR code system of each DICOM coding scheme the SRs use (FHIR R4 terminologies; the
# review decisions' private scheme 99AIDX has a UUID-derived OID of its own, ISO/IEC 9834-8).
DECISION_SYSTEM = "urn:oid:2.25.314014298354957930707507498547068291259"
CODE_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    CODING_SCHEME: DECISION_SYSTEM,
}
# LOINC 18748-4: the report of a diagnostic imaging study (what US Core and IHE use).
REPORT_CODE = Code("18748-4", "LN", "Diagnostic imaging study")
RADIOLOGY = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
            "code": "RAD",
            "display": "Radiology",
        }
    ]
}
IMAGING = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "imaging",
            "display": "Imaging",
        }
    ]
}
# The R4 required value sets of the statuses (fhir.resources checks neither).
REPORT_STATUSES = frozenset(
    [
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    ]
)
OBSERVATION_STATUSES = frozenset(
    [
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    ]
)
# Concept names of the SR content items a report reads (PS3.16 TID 1500, 1411, 1501, 4108).
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")
TRACKING_UID = Code("112040", "DCM", "Tracking Unique Identifier")
FINDING = Code("121071", "DCM", "Finding")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")
DEVICE_ID = "model"
PRACTITIONER_ID = "radiologist"


class FhirReportError(ValueError):
    """A resource aidx built is not valid FHIR R4: a bug, never the study's fault."""


@dataclass(frozen=True)
class FhirSettings:
    """What a report needs from the configuration (:func:`fhir_settings`)."""

    patient_identifier_system: str | None = None
    # The DICOMweb service's root as the EMR reaches it (WADO-RS links to the SR); None: off.
    wado_root: str | None = None


def fhir_settings(config: AidxConfig, kind: ReportKind) -> FhirSettings | None:
    """The settings for a ``kind`` report, or None when ``fhir`` does not send that kind."""
    if not config.fhir.sends(kind):
        return None
    web = config.dicomweb
    root = None
    if web.enabled:
        if web.public_url:
            root = web.public_url.rstrip("/")
        else:
            host = _host_name() if web.host in ("0.0.0.0", "::") else web.host
            host = f"[{host}]" if ":" in host else host
            root = f"{'https' if web.https else 'http'}://{host}:{web.port}/dicomweb"
    return FhirSettings(config.fhir.patient_identifier_system, root)


@cache
def _host_name() -> str:
    """This host's name, for the URLs of a service listening on every interface (looked up
    once: a reverse DNS lookup can take seconds)."""
    return socket.getfqdn()


def report_uid(ai_sr_uid: str) -> str:
    """The report's UID (its identifier's value): one per AI result, whatever its status."""
    return _uid("aidx-fhir-report", ai_sr_uid)


def item_key(report: dict[str, Any]) -> str:
    """The outbox key of one version of a report: ``fhir:<report UID>:<SR UID>``. A later item
    whose key starts the same is a newer version (dicom_node.fhir sends only the newest)."""
    official, rendered = report["identifier"][:2]
    return f"{OUTBOX_KEY_PREFIX}{_oid(official['value'])}:{_oid(rendered['value'])}"


def report_file_name(report: dict[str, Any]) -> str:
    return f"fhir-{_oid(report['identifier'][1]['value'])}.json"


def build_report(
    ai_sr: Dataset,
    model: str,
    settings: FhirSettings,
    issued: datetime,
    signed_sr: Dataset | None = None,
) -> dict[str, Any]:
    """The DiagnosticReport (JSON) of the AI SR ``ai_sr`` by ``model`` (name@version), final
    (or amended) when ``signed_sr`` is given; both read with ``hd.sr.srread``. Validated."""
    ai_groups = _groups(ai_sr)
    subject = _subject(ai_sr, settings)
    effective = _study_time(ai_sr)
    source = signed_sr if signed_sr is not None else ai_sr
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": DEVICE_ID,
        "manufacturer": MANUFACTURER,
        "deviceName": [{"name": model, "type": "model-name"}],
        "type": _concept(ARTIFICIAL_INTELLIGENCE),
        "version": [{"value": model.rpartition("@")[2]}],
    }
    contained: list[dict[str, Any]] = [device]
    common: dict[str, Any] = {"category": [IMAGING], **subject, **effective}
    observations: list[dict[str, Any]] = []
    if signed_sr is None:
        status = "preliminary"
        for group in ai_groups:
            observations.append(_observation(group, "preliminary", common, device=True))
        conclusion = (
            f"{len(ai_groups)} nodule finding(s) by {model}, not yet verified by a radiologist"
        )
    else:
        status = "final" if int(signed_sr.get("InstanceNumber", 1) or 1) <= 1 else "amended"
        contained.append(_practitioner(signed_sr))
        reader = {"performer": [{"reference": f"#{PRACTITIONER_ID}"}]}
        signed_groups = _groups(signed_sr)
        kept = {g.tracking_uid for g in signed_groups}
        for group in signed_groups:
            decision = _decision(group)
            ai = decision != ADDED
            observations.append(_observation(group, "final", common | reader, ai, decision))
        rejected = [g for g in ai_groups if g.tracking_uid not in kept]
        for group in rejected:
            observations.append(
                _observation(group, "entered-in-error", common | reader, True, REJECTED)
            )
        conclusion = (
            f"{len(signed_groups)} nodule finding(s) verified by the radiologist; "
            f"{len(rejected)} of the {len(ai_groups)} AI finding(s) rejected"
        )
    if not any(o["status"] != "entered-in-error" for o in observations):
        # The SR's "searched, none found": Nodule = Absent (TID 1500 Qualitative Evaluations).
        absent = {
            "resourceType": "Observation",
            "status": "preliminary" if signed_sr is None else "final",
            "code": _concept(NODULE),
            "valueCodeableConcept": _concept(ABSENT),
            **common,
            **({"device": {"reference": f"#{DEVICE_ID}"}} if signed_sr is None else {}),
            **({} if signed_sr is None else reader),
        }
        observations.append(absent)
    for n, observation in enumerate(observations, start=1):
        observation["id"] = f"finding-{n}"
    contained.extend(observations)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "contained": contained,
        "identifier": [
            {
                "use": "official",
                "system": DICOM_UID,
                "value": f"urn:oid:{report_uid(str(ai_sr.SOPInstanceUID))}",
            },
            {
                "use": "secondary",
                "type": {"text": "SOP Instance UID of the DICOM SR this version renders"},
                "system": DICOM_UID,
                "value": f"urn:oid:{source.SOPInstanceUID}",
            },
        ],
        "status": status,
        "category": [RADIOLOGY],
        "code": _concept(REPORT_CODE),
        **subject,
        **effective,
        "issued": _instant(issued),
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "imagingStudy": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{ai_sr.StudyInstanceUID}"},
            }
        ],
        "conclusion": conclusion,
    }
    if signed_sr is not None:
        report["performer"] = [{"reference": f"#{PRACTITIONER_ID}"}]
        report["resultsInterpreter"] = [{"reference": f"#{PRACTITIONER_ID}"}]
    if settings.wado_root is not None:
        report["presentedForm"] = [
            {
                "contentType": "application/dicom",
                "url": (
                    f"{settings.wado_root}/studies/{source.StudyInstanceUID}/series/"
                    f"{source.SeriesInstanceUID}/instances/{source.SOPInstanceUID}"
                ),
                "title": "Signed DICOM SR" if signed_sr is not None else "AI DICOM SR",
            }
        ]
    validate(report)
    return report


def validate(resource: dict[str, Any]) -> None:
    """Check ``resource`` with fhir.resources (R4B models) and the R4 status value sets;
    raises FhirReportError naming what is wrong."""
    from fhir.resources.R4B import get_fhir_model_class  # noqa: PLC0415 - the [fhir] extra

    kind = str(resource.get("resourceType"))
    try:
        get_fhir_model_class(kind).model_validate(resource)
    except (ValueError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
        raise FhirReportError(f"aidx built an invalid FHIR {kind}: {exc}") from exc
    allowed = {"DiagnosticReport": REPORT_STATUSES, "Observation": OBSERVATION_STATUSES}
    for item in [resource, *resource.get("contained", [])]:
        name = str(item.get("resourceType"))
        if name in allowed and item.get("status") not in allowed[name]:
            raise FhirReportError(
                f"aidx built a {name} with status {item.get('status')!r}, not in R4's value set"
            )


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """Write ``report`` (built, so valid) as ``folder/fhir-<SR UID>.json``; returns the path."""
    path = Path(folder) / report_file_name(report)
    write_atomically(json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8"), path)
    return path


def read_sr(path: Path) -> Dataset:
    """An SR aidx wrote, for :func:`build_report` (headers and content tree)."""
    return dcmread(path)


# ------------------------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Group:
    """What a report takes from one TID 1411/1501 measurement group."""

    tracking_identifier: str
    tracking_uid: str
    finding: Code
    site: Code | None
    measurements: tuple[tuple[Code, float, Code], ...]  # (concept, value, unit)
    decision: Code | None


def _groups(sr: Dataset) -> list[_Group]:
    """The measurement groups of an SR aidx wrote (none for "no nodule"), read with pydicom
    from the content tree (highdicom's parsers take seconds for a few dozen groups)."""
    if "ContentSequence" not in sr:
        raise FhirReportError(f"SR {sr.SOPInstanceUID} has no content tree")
    containers = [
        item
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and _code(item) == IMAGING_MEASUREMENTS
    ]
    if len(containers) != 1:
        raise FhirReportError(f"SR {sr.SOPInstanceUID} holds no TID 1500 Imaging Measurements")
    return [_group(sr, g) for g in containers[0].get("ContentSequence", [])]


def _group(sr: Dataset, container: Dataset) -> _Group:
    texts: dict[Code, str] = {}
    codes: dict[Code, Code] = {}
    measurements = []
    for item in container.get("ContentSequence", []):
        name = _code(item)
        if item.ValueType in ("TEXT", "UIDREF"):
            texts[name] = str(item.get("TextValue") or item.get("UID") or "")
        elif item.ValueType == "CODE":
            codes.setdefault(name, _code(item, "ConceptCodeSequence"))
        elif item.ValueType == "NUM" and item.get("MeasuredValueSequence"):
            value = item.MeasuredValueSequence[0]
            unit = _code(value, "MeasurementUnitsCodeSequence")
            measurements.append((name, float(value.NumericValue), unit))
    uid, finding = texts.get(TRACKING_UID), codes.get(FINDING)
    if not uid or finding is None:
        raise FhirReportError(f"SR {sr.SOPInstanceUID}: a group without tracking UID or finding")
    return _Group(
        texts.get(TRACKING_IDENTIFIER, ""),
        uid,
        finding,
        codes.get(FINDING_SITE),
        tuple(measurements),
        codes.get(DECISION),
    )


def _code(item: Dataset, sequence: str = "ConceptNameCodeSequence") -> Code:
    coded = item[sequence][0]
    return Code(str(coded.CodeValue), str(coded.CodingSchemeDesignator), str(coded.CodeMeaning))


def _observation(
    group: _Group,
    status: str,
    common: dict[str, Any],
    device: bool,
    decision: Code | None = None,
) -> dict[str, Any]:
    """One measurement group: its finding, site, tracking UID and every NUM of it."""
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{group.tracking_uid}"}],
        "status": status,
        "code": _concept(group.finding, text=group.tracking_identifier),
        **common,
    }
    if group.site is not None:
        observation["bodySite"] = _concept(group.site)
    if device:
        observation["device"] = {"reference": f"#{DEVICE_ID}"}
    components = [
        {
            "code": _concept(name),
            "valueQuantity": {
                "value": round(value, 4),
                "unit": unit.value,
                "system": CODE_SYSTEMS["UCUM"],
                "code": unit.value,
            },
        }
        for name, value, unit in group.measurements
    ]
    if decision is not None:
        components.append({"code": _concept(DECISION), "valueCodeableConcept": _concept(decision)})
    if components:
        observation["component"] = components
    return observation


def _decision(group: _Group) -> Code:
    if group.decision is None:
        raise FhirReportError(f"signed SR group {group.tracking_identifier} has no decision")
    return group.decision


def _concept(code: Code, text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept of a DICOM code."""
    scheme = str(code.scheme_designator)
    if scheme not in CODE_SYSTEMS:
        raise FhirReportError(f"no FHIR code system known for DICOM coding scheme {scheme!r}")
    coding = {"system": CODE_SYSTEMS[scheme], "code": str(code.value), "display": code.meaning}
    return {"coding": [coding], "text": text or str(code.meaning)}


def _subject(sr: Dataset, settings: FhirSettings) -> dict[str, Any]:
    patient_id = str(sr.get("PatientID", "") or "").strip()
    if not patient_id:
        return {}
    identifier = {"value": patient_id}
    if settings.patient_identifier_system:
        identifier = {"system": settings.patient_identifier_system, **identifier}
    return {"subject": {"type": "Patient", "identifier": identifier}}


def _study_time(sr: Dataset) -> dict[str, Any]:
    """effectiveDateTime: the study's date and time (FHIR wants a zone with a time: the
    study's Timezone Offset From UTC, else this host's, where the modality's clock is taken to
    be)."""
    date = str(sr.get("StudyDate", "") or "")
    if len(date) != 8 or not date.isdigit():
        return {}
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    time_text = str(sr.get("StudyTime", "") or "").split(".")[0]
    if len(time_text) < 4 or not time_text.isdigit():
        return {"effectiveDateTime": day}
    hh, mm, ss = time_text[:2], time_text[2:4], (time_text[4:6] or "00")
    try:
        local = datetime.fromisoformat(f"{day}T{hh}:{mm}:{ss}")
    except ValueError:
        return {"effectiveDateTime": day}
    zone = _zone(str(sr.get("TimezoneOffsetFromUTC", "") or ""))
    stamped = local.replace(tzinfo=zone) if zone else local.astimezone()
    return {"effectiveDateTime": stamped.isoformat()}


def _zone(offset: str) -> timezone | None:
    if len(offset) != 5 or offset[0] not in "+-" or not offset[1:].isdigit():
        return None
    sign = 1 if offset[0] == "+" else -1
    return timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))


def _instant(moment: datetime) -> str:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.isoformat(timespec="seconds")


def _practitioner(signed_sr: Dataset) -> dict[str, Any]:
    """The verifying observer: the name the review app recorded (PN family^given)."""
    observers = signed_sr.get("VerifyingObserverSequence", [])
    if not observers:
        raise FhirReportError(f"signed SR {signed_sr.SOPInstanceUID} names no verifying observer")
    name = PersonName(str(observers[0].VerifyingObserverName))
    human: dict[str, Any] = {"use": "official", "text": _text_name(name) or str(name)}
    if name.family_name:
        human["family"] = name.family_name
    given = [g for g in [name.given_name, *name.middle_name.split()] if g]
    if given:
        human["given"] = given
    return {"resourceType": "Practitioner", "id": PRACTITIONER_ID, "name": [human]}


def _text_name(name: PersonName) -> str:
    parts = [name.name_prefix, name.given_name, name.middle_name, name.family_name]
    return " ".join(p for p in parts if p) + (f", {name.name_suffix}" if name.name_suffix else "")


def _oid(value: str) -> str:
    return value.removeprefix("urn:oid:")
