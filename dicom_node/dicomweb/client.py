"""STOW-RS as a user agent (PS3.18 10.5): the outbox's sender for DICOMweb destinations
(``destinations.NAME.dicomweb``).

One request per outbox item, as one association is for C-STORE: the item's files, as stored,
in one ``multipart/related; type="application/dicom"`` body posted to ``<root>/studies``. The
item is delivered when the origin server stored every instance (no FailedSOPSequence); any
failure raises :class:`StowError` with the reason, and the outbox tries again with back-off
(the instances already stored come again with the same UIDs, which the server keeps once).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from aidx.config_dicomweb import DicomwebAuthConfig, DicomwebDestinationConfig

from .multipart import multipart_stream, new_boundary
from .stow import DICOM

if TYPE_CHECKING:
    import httpx

ACCEPT = "application/dicom+json"


class StowError(RuntimeError):
    """The destination could not be reached, refused the request, or did not store every
    instance."""


def stow_files(destination: DicomwebDestinationConfig, name: str, files: Sequence[Path]) -> int:
    """Post ``files`` to the destination ``name``; returns how many it stored (all of them), or
    raises StowError."""
    import httpx  # noqa: PLC0415 - only for DICOMweb destinations: it costs every node's start

    boundary = new_boundary()
    body = b"".join(multipart_stream(((DICOM, [Path(f).read_bytes()]) for f in files), boundary))
    headers = {
        "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
        "Accept": ACCEPT,
    }
    basic, verify = sign_in(destination.auth, destination.ca_certificates, headers)
    url = destination.studies_url
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            auth=basic,
            verify=verify,
            timeout=destination.timeout_s,
        )
    except httpx.HTTPError as exc:
        raise StowError(f"STOW-RS to {name} ({url}) failed: {exc}") from exc
    if response.status_code in (401, 403):
        raise StowError(
            f"{name} ({url}) refused the credentials (HTTP {response.status_code}): check "
            f"destinations.{name}.auth"
        )
    failed = _failures(response)
    if response.status_code not in (200, 202) and not failed:
        raise StowError(f"{name} ({url}) answered HTTP {response.status_code}: {_text(response)}")
    if failed:
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise StowError(
            f"{name} stored {len(files) - len(failed)} of {len(files)} instances; "
            + "; ".join(failed[:5])
            + more
        )
    return len(files)


def sign_in(
    auth: DicomwebAuthConfig, ca_certificates: Path | None, headers: dict[str, str]
) -> tuple[httpx.BasicAuth | None, str | bool]:
    """How to sign in to an HTTP peer (a DICOMweb destination, the FHIR endpoint): adds a
    bearer token to ``headers``, or returns HTTP Basic credentials; and what verifies the
    peer's certificate (its CA file, else the system's)."""
    import httpx  # noqa: PLC0415 - see stow_files

    basic = None
    if auth.bearer_token is not None:
        headers["Authorization"] = f"Bearer {auth.bearer_token.get_secret_value()}"
    elif auth.username is not None and auth.password is not None:
        basic = httpx.BasicAuth(auth.username, auth.password.get_secret_value())
    return basic, str(ca_certificates) if ca_certificates else True


def _failures(response: httpx.Response) -> list[str]:
    """The instances the response lists as failed, each with its reason (and the server's
    words from its Warning headers)."""
    try:
        answer = Dataset.from_json(response.json())
    except (json.JSONDecodeError, ValueError, TypeError, KeyError):
        return []
    words = response.headers.get_list("warning")
    out = []
    for index, item in enumerate(answer.get("FailedSOPSequence", [])):
        reason = item.get("FailureReason")
        code = f"0x{int(reason):04X}" if reason is not None else "no reason given"
        text = f" ({words[index]})" if index < len(words) else ""
        out.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: FailureReason {code}{text}")
    return out


def _text(response: httpx.Response) -> str:
    return " ".join(response.text.split())[:300] or "(no body)"
