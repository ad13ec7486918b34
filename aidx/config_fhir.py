"""The ``fhir`` section: the EMR's HL7 FHIR R4 endpoint, to which the outbox sends an R4
``DiagnosticReport`` when the AI results are ready (``preliminary``) and when a radiologist
signs (``final``; ``amended`` after a re-opened report is signed again).

The report is sent by a conditional update (``PUT [url]/DiagnosticReport?identifier=...``), so
a retry replaces the report and never makes a second one (inference/fhir_report.py builds it,
dicom_node/fhir.py sends it; docs/conformance.md has the profile). aidx signs in as it does to
a DICOMweb destination: a bearer token, or a user name and password (HTTP Basic); put the
secret in the environment (``AIDX_FHIR__AUTH__BEARER_TOKEN``) rather than in the file.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from aidx.config_base import LOOPBACK_HOSTS, StrictModel
from aidx.config_dicomweb import URL_PATTERN, DicomwebAuthConfig

ReportKind = Literal["preliminary", "final"]
REPORT_KINDS: tuple[ReportKind, ...] = ("preliminary", "final")
# An outbox item of a FHIR report: its destination column, and how its key starts
# (``fhir:<report UID>:<SR UID>``; dicom_node.fhir sends it).
OUTBOX_DESTINATION = "fhir"
OUTBOX_KEY_PREFIX = "fhir:"
# An absolute URI (RFC 3986 scheme ":" ...): what FHIR's Identifier.system must be.
URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$"


class FhirConfig(StrictModel):
    """Where and which DiagnosticReports go; ``url`` null: none are sent."""

    # The FHIR server's base URL, e.g. https://emr.hospital.example/fhir (R4).
    url: str | None = None
    auth: DicomwebAuthConfig = Field(default_factory=DicomwebAuthConfig)
    # CA certificates (PEM) that sign the server's HTTPS certificate; null: the system's.
    ca_certificates: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Which reports to send: the AI's (preliminary) and the radiologist's (final, amended).
    send: list[ReportKind] = Field(default_factory=lambda: list(REPORT_KINDS))
    # Identifier.system of the patient (the DICOM Patient ID is its value): the URI of the
    # hospital's medical record numbers as the EMR knows them; null: the value alone.
    patient_identifier_system: str | None = Field(default=None, pattern=URI_PATTERN)

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(URL_PATTERN, value):
            raise ValueError(
                f"{value!r} is not a FHIR base URL: write http(s)://host[:port]/path, e.g. "
                "https://emr.hospital.example/fhir"
            )
        parts = urlsplit(value)
        if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError(
                f"{value!r} is plain HTTP to {parts.hostname}, beyond this machine: the reports "
                "name the patient and need HTTPS there. Write https://..., or a loopback address "
                "behind your own TLS proxy"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _validator_installed(self) -> FhirConfig:
        # Every report is validated before it is queued (inference.fhir_report).
        if self.url is not None and not _installed("fhir.resources"):
            raise ValueError(
                "fhir.url is set but the package fhir.resources is not installed: "
                "pip install 'aidx[fhir]', or leave fhir.url out"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def sends(self, kind: ReportKind) -> bool:
        return self.url is not None and kind in self.send


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False
