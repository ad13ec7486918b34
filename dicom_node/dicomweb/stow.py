"""STOW-RS (PS3.18 10.5): the parts of a ``multipart/related; type="application/dicom"``
request, each a DICOM Part 10 file, stored by the node's one receive path
(:class:`dicom_node.receive.Receiver`), and the Store Instances response.

A part is stored exactly as a C-STORE of the same data set would be: its data set bytes as they
came (the File Meta header is the node's own, as for DIMSE), checked within the node's limits,
fsync'd and indexed before the response. A part that cannot be stored is listed in the
FailedSOPSequence with its FailureReason (the DIMSE status C-STORE would have answered) and the
reason in words in a ``Warning`` header (PS3.18 8.6.3); the other parts are stored. The
response's status: 200 all stored, 202 some failed, 409 none stored.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node import status
from dicom_node.parse import InstanceError
from dicom_node.receive import Receiver

from .multipart import Part

log = logging.getLogger("aidx.dicomweb")

DICOM = "application/dicom"
PREAMBLE = 128
# A part over this many bytes past the data set limit is refused before it is read.
META_SLACK = 64 * 1024


@dataclass(frozen=True)
class PartOutcome:
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    failure: int | None  # the FailureReason, None when stored
    reason: str = ""


@dataclass(frozen=True)
class Part10:
    """The File Meta values of a Part 10 file, and where its data set starts."""

    sop_class_uid: str
    sop_uid: str
    transfer_syntax: str
    dataset_offset: int


def read_part10(data: memoryview) -> Part10:
    """Read the File Meta Information (PS3.10 7.1) of a Part 10 file; raises InstanceError
    (cannot understand) when the part is not one."""
    if len(data) < PREAMBLE + 4 or bytes(data[PREAMBLE : PREAMBLE + 4]) != b"DICM":
        raise InstanceError(
            status.CANNOT_UNDERSTAND,
            "not a DICOM Part 10 file (no preamble and 'DICM' prefix); STOW-RS takes whole "
            "files, as written by dcmwrite or sent by a PACS",
        )
    position = PREAMBLE + 4
    values: dict[int, str] = {}
    try:
        while position + 8 <= len(data):
            group, element = struct.unpack_from("<HH", data, position)
            if group != 0x0002:
                break
            vr = bytes(data[position + 4 : position + 6])
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                (length,) = struct.unpack_from("<I", data, position + 8)
                start = position + 12
            else:
                (length,) = struct.unpack_from("<H", data, position + 6)
                start = position + 8
            if length == 0xFFFFFFFF or start + length > len(data):
                raise InstanceError(
                    status.CANNOT_UNDERSTAND, "the File Meta Information is cut short"
                )
            if element in (0x0002, 0x0003, 0x0010):
                raw = bytes(data[start : start + length])
                values[element] = raw.decode("ascii", errors="replace").strip("\x00 ")
            position = start + length
    except struct.error as exc:
        raise InstanceError(
            status.CANNOT_UNDERSTAND, f"the File Meta Information is cut short: {exc}"
        ) from exc
    missing = [
        name
        for element, name in (
            (0x0002, "MediaStorageSOPClassUID"),
            (0x0003, "MediaStorageSOPInstanceUID"),
            (0x0010, "TransferSyntaxUID"),
        )
        if not values.get(element)
    ]
    if missing:
        raise InstanceError(
            status.CANNOT_UNDERSTAND, f"the File Meta Information lacks {', '.join(missing)}"
        )
    return Part10(values[0x0002], values[0x0003], values[0x0010], position)


def store_part(
    receiver: Receiver,
    part: Part,
    peer: str,
    quiet_period_s: float,
    study_uid: str | None,
) -> PartOutcome:
    """Store one part; never raises for what the part holds (the outcome says why it failed)."""
    meta: Part10 | None = None
    try:
        media = part.media_type
        if media.type not in (DICOM, ""):
            raise InstanceError(
                status.CANNOT_UNDERSTAND,
                f"the part is {media.type}, not {DICOM} (metadata and bulk data parts are not "
                "accepted)",
            )
        if len(part.body) > receiver.limits.max_dataset_bytes + META_SLACK:
            raise InstanceError(
                status.OUT_OF_RESOURCES,
                f"the part of {len(part.body)} bytes exceeds node.max_dataset_mb "
                f"({receiver.limits.max_dataset_bytes} bytes); nothing was stored",
            )
        meta = read_part10(part.body)
        record = receiver.store_dataset(
            part.body[meta.dataset_offset :],
            meta.transfer_syntax,
            meta.sop_uid,
            meta.sop_class_uid,
            peer,
            quiet_period_s,
            expect_study_uid=study_uid,
        ).record
    except InstanceError as exc:
        log.warning(
            "STOW-RS part refused: sop_uid=%s peer=%s status=0x%04X: %s",
            meta.sop_uid if meta else "(unknown)",
            peer,
            exc.code,
            exc,
        )
        return _failed(meta, exc.code, str(exc))
    except Exception:  # one part's unexpected failure must not fail the others
        log.exception("STOW-RS part failed: sop_uid=%s peer=%s", meta and meta.sop_uid, peer)
        return _failed(
            meta, status.PROCESSING_FAILURE, "an unexpected error in the node (logged there)"
        )
    return PartOutcome(
        record.sop_class_uid, record.sop_uid, record.study_uid, record.series_uid, None
    )


def _failed(meta: Part10 | None, code: int, reason: str) -> PartOutcome:
    """A part's failure, with its UIDs when its File Meta could be read."""
    sop_class_uid, sop_uid = (meta.sop_class_uid, meta.sop_uid) if meta else ("", "")
    return PartOutcome(sop_class_uid, sop_uid, "", "", code, reason)


def response_dataset(outcomes: list[PartOutcome], base_url: str, study_uid: str | None) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1)."""
    ds = Dataset()
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    studies = {o.study_uid for o in stored}
    target = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    ds.RetrieveURL = f"{base_url}/studies/{target}" if target else ""
    if failed:
        ds.FailedSOPSequence = [_failed_item(o) for o in failed]
    if stored:
        ds.ReferencedSOPSequence = [_stored_item(o, base_url) for o in stored]
    return ds


def _failed_item(outcome: PartOutcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_uid
    item.FailureReason = outcome.failure
    return item


def _stored_item(outcome: PartOutcome, base_url: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_uid
    item.RetrieveURL = (
        f"{base_url}/studies/{outcome.study_uid}/series/{outcome.series_uid}"
        f"/instances/{outcome.sop_uid}"
    )
    return item


def warning_header(outcome: PartOutcome, index: int) -> str:
    """A ``Warning`` header value (RFC 7234 5.5, as PS3.18 8.6.3 uses it) for a failed part:
    ASCII only, one line."""
    who = outcome.sop_uid or f"part {index + 1}"
    text = f"{who}: {outcome.reason}".encode("ascii", errors="replace").decode("ascii")
    text = " ".join(text.split()).replace('"', "'")[:400]
    return f'299 aidx "{text}"'
