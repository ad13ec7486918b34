"""How the robustness tests of the storage SCP send: C-STORE of data sets exactly as given
(pynetdicom, chunked), a pynetdicom C-ECHO, the data set bytes of a file, the spool check
after a refusal, and the responses in ``storescu -v`` output."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from dicom_node import status
from dicom_node.service import NodeService
from tests.peers import LOOPBACK

NODE_AET = "AIDX"
VERIFICATION = "1.2.840.10008.1.1"


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set encoded as it travels in a C-STORE (no File Meta Information)."""
    syntax = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = syntax.is_little_endian
    fp.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def write_part10(
    path: Path, sop_class: str, sop_uid: str, transfer_syntax: str, dataset: bytes
) -> None:
    """A Part 10 file whose data set is ``dataset``, byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + fp.getvalue() + dataset)


@dataclass(frozen=True)
class Instance:
    """What one C-STORE request carries: the data set bytes and the request's UIDs."""

    dataset: bytes
    sop_class: str
    sop_uid: str
    transfer_syntax: str = ExplicitVRLittleEndian


def send_raw(
    port: int, items: Sequence[Instance], work: Path, calling_aet: str = "RAWSCU"
) -> list[int | None]:
    """C-STORE each data set exactly as given, on one association (pynetdicom sends a file's
    data set undecoded in chunked mode). Returns the response statuses, None where the node
    refused the presentation context."""
    ae = AE(ae_title=calling_aet)
    for sop_class, syntax in dict.fromkeys((i.sop_class, i.transfer_syntax) for i in items):
        ae.add_requested_context(sop_class, [syntax])
    # Verification too, so that the association stands even if every storage context is refused.
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AET)
    assert assoc.is_established, f"the node did not accept an association on port {port}"
    _no_delay(assoc)
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    statuses: list[int | None] = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for item in items:
            if (item.sop_class, item.transfer_syntax) not in accepted:
                statuses.append(None)
                continue
            path = work / f"raw-{uuid.uuid4().hex}.dcm"
            write_part10(path, item.sop_class, item.sop_uid, item.transfer_syntax, item.dataset)
            response = assoc.send_c_store(path)
            path.unlink()
            assert "Status" in response, f"no response for {item.sop_uid} (association aborted?)"
            statuses.append(int(response.Status))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return statuses


def _no_delay(assoc: Association) -> None:
    """pynetdicom writes a C-STORE as several PDUs: without TCP_NODELAY each one waits about
    40 ms on loopback (Nagle + delayed ACK), as DCMTK does without TCP_NODELAY=1."""
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo_ok(port: int) -> bool:
    """A C-ECHO with pynetdicom; True if the node answered success."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AET)
    if not assoc.is_established:
        return False
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    return "Status" in response and int(response.Status) == status.SUCCESS


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a file after its File Meta Information (all of it if there is none)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    _meta, offset = split_dataset(path)
    return data[offset:]


def assert_spool_clean(node: NodeService) -> None:
    leftovers = list(node.spool.incoming.iterdir())
    assert leftovers == [], f"temporary files left in the spool: {leftovers}"


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)$")


def storescu_responses(output: str) -> dict[str, str]:
    """File path -> C-STORE response text, from ``storescu -v`` output (files that got none,
    because storescu could not read or send them, are absent)."""
    responses: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        if sending := _SENDING.search(line):
            current = sending.group(1)
        elif (response := _RESPONSE.search(line)) and current is not None:
            responses[current] = response.group(1)
            current = None
    return responses
