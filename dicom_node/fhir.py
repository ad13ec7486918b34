"""The outbox's sender to the EMR's FHIR endpoint (``fhir``; issue 20): one outbox item is one
version of a DiagnosticReport (inference/fhir_report.py wrote and validated it), sent by a
conditional update, ``PUT [base]/DiagnosticReport?identifier=urn:dicom:uid|urn:oid:<UID>``
(FHIR R4 RESTful API 3.1.0.4.3): the server updates the one report with that identifier, or
creates it, so a retry, or the final report after the preliminary one, never makes a second.

An outbox item holds a FHIR report when its key starts with ``fhir:`` (:func:`is_fhir_item`);
its destination is shown as ``fhir``. Any failure raises :class:`FhirSendError` with the HTTP
status and the text of the OperationOutcome the server answered with, and the outbox tries
again with back-off. The patient's identifier is redacted from that text (it goes to the log
and to ``aidx outbox list``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aidx.config_fhir import OUTBOX_KEY_PREFIX, FhirConfig
from aidx.logs import patient_values, redact

from .dicomweb.client import sign_in

if TYPE_CHECKING:
    import httpx

FHIR_JSON = "application/fhir+json"


class FhirSendError(RuntimeError):
    """The FHIR server could not be reached or did not accept the report."""


def is_fhir_item(item_key: str) -> bool:
    return item_key.startswith(OUTBOX_KEY_PREFIX)


def report_prefix(item_key: str) -> str:
    """``fhir:<report UID>:``: what every version of the same report's key starts with."""
    return item_key[: item_key.index(":", len(OUTBOX_KEY_PREFIX)) + 1]


def put_report(config: FhirConfig, path: Path) -> int:
    """Send the report in ``path`` by conditional update; returns the HTTP status (200 updated,
    201 created) or raises FhirSendError."""
    import httpx  # noqa: PLC0415 - only with a FHIR endpoint: it costs every process's start

    if config.url is None:
        raise FhirSendError("fhir.url is not set: the report cannot be sent; set fhir.url")
    body = Path(path).read_bytes()
    report: dict[str, Any] = json.loads(body)
    official = report["identifier"][0]
    query = quote(f"{official['system']}|{official['value']}", safe="")
    url = f"{config.url}/DiagnosticReport?identifier={query}"
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    basic, verify = sign_in(config.auth, config.ca_certificates, headers)
    patient = report.get("subject", {}).get("identifier", {}).get("value")
    with patient_values([patient] if patient else []):
        try:
            response = httpx.put(
                url,
                content=body,
                headers=headers,
                auth=basic,
                verify=verify,
                timeout=config.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise FhirSendError(redact(f"PUT to {config.url} failed: {exc}")) from exc
        if response.status_code in (200, 201):
            return response.status_code
        hint = ""
        if response.status_code in (401, 403):
            hint = "; check fhir.auth"
        elif response.status_code == 412:
            hint = "; more than one report has this identifier at the server"
        raise FhirSendError(
            redact(
                f"{config.url} answered HTTP {response.status_code} to the DiagnosticReport "
                f"{official['value']}: {outcome_text(response)}{hint}"
            )
        )


def outcome_text(response: httpx.Response) -> str:
    """The issues of the OperationOutcome in ``response`` (severity, code, text), else the
    body's start."""
    try:
        outcome = response.json()
    except ValueError:
        outcome = None
    if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
        issues = []
        for issue in outcome.get("issue", []):
            text = issue.get("details", {}).get("text") or issue.get("diagnostics") or ""
            issues.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}".strip())
        if issues:
            return "OperationOutcome: " + "; ".join(issues)[:500]
    return " ".join(response.text.split())[:300] or "(no body)"
