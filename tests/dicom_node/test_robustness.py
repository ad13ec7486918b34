"""Robustness of the storage SCP (PS3.4 Annex B, as SCP) against what real peers send.

Malformed data sets get a failure status and one log line (UIDs, never patient data); pydicom's
whole test corpus goes through DCMTK and pynetdicom without harming the node; the disk floor
refuses cleanly; and a kill -9 in mid-transfer loses no instance that was acknowledged.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MediaStorageDirectoryStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from aidx.config import AidxConfig
from aidx.store import Store, instances, jobs
from dicom_node import status
from dicom_node.parse import REQUIRED_UIDS
from dicom_node.service import NodeService
from tests.conftest import require_tool
from tests.dicom_node.conftest import NodeFactory
from tests.peers import (
    LOOPBACK,
    echoscu,
    free_port,
    peer_env,
    poll_until,
    start_process,
    stop_process,
    storescu,
    storescu_command,
)
from training.phantom import PhantomOptions, generate

NODE_AET = "AIDX"
VERIFICATION = "1.2.840.10008.1.1"
SECRET_NAME = "SECRET^PATIENT"
SECRET_ID = "SECRET123"
CORPUS = Path(pydicom.data.__file__).parent / "test_files"
AIDX = Path(sys.executable).with_name("aidx")

# DCMTK storescu proposes the file's own transfer syntax first with these options, so that it
# sends each file as it is instead of converting it.
STORESCU_PROPOSE = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}
# Big endian, deflated and compressed data sets: stored byte for byte, like any other.
ENCODED_SYNTAXES = frozenset(STORESCU_PROPOSE) - {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


# --------------------------------------------------------------------------------- helpers
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


def send_one(port: int, item: Instance, work: Path) -> int | None:
    (code,) = send_raw(port, [item], work)
    return code


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


def assert_no_patient_data_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = f"{record.getMessage()} {vars(record)}"
        assert "SECRET" not in text, f"patient data in a log record: {text}"
    assert "SECRET" not in caplog.text


def crafted_image() -> Dataset:
    """A small, valid CT image of a patient whose name and ID must never be logged."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * 2
    return ds


# ------------------------------------------------------------------------- 1. bad input
@dataclass(frozen=True)
class BadInput:
    """A malformed C-STORE: build(ds) gives the data set bytes and the request's SOP UID."""

    build: Callable[[Dataset], tuple[bytes, str]]
    status: int
    reason: str
    transfer_syntax: str = ExplicitVRLittleEndian


def _other_sop_uid(ds: Dataset) -> tuple[bytes, str]:
    return encode(ds), generate_uid()


def _no_study_uid(ds: Dataset) -> tuple[bytes, str]:
    del ds.StudyInstanceUID
    return encode(ds), str(ds.SOPInstanceUID)


def _invalid_study_uid(ds: Dataset) -> tuple[bytes, str]:
    ds["StudyInstanceUID"] = DataElement(
        0x0020000D, "UI", "1.2.abc", validation_mode=pydicom.config.IGNORE
    )
    return encode(ds), str(ds.SOPInstanceUID)


def _truncated_pixel_data(ds: Dataset) -> tuple[bytes, str]:
    return encode(ds)[:-100], str(ds.SOPInstanceUID)


def _no_pixel_data(ds: Dataset) -> tuple[bytes, str]:
    del ds.PixelData
    return encode(ds), str(ds.SOPInstanceUID)


def _header_cut_short(ds: Dataset) -> tuple[bytes, str]:
    # A last element (7FE1,0010) OB whose 4-byte length field has only 1 byte.
    return encode(ds) + b"\xe1\x7f\x10\x00OB\x00\x00\x01", str(ds.SOPInstanceUID)


def _not_deflated(ds: Dataset) -> tuple[bytes, str]:
    return encode(ds), str(ds.SOPInstanceUID)  # sent as Deflated Explicit VR Little Endian


BAD_INPUTS = {
    "sop-uid-differs-from-request": BadInput(
        _other_sop_uid, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "differs from the request"
    ),
    "no-study-uid": BadInput(
        _no_study_uid, status.CANNOT_UNDERSTAND, "StudyInstanceUID is missing"
    ),
    "invalid-study-uid": BadInput(
        _invalid_study_uid, status.CANNOT_UNDERSTAND, "'1.2.abc' is not a valid UID"
    ),
    "truncated-pixel-data": BadInput(
        _truncated_pixel_data, status.CANNOT_UNDERSTAND, "truncated: element (7FE0,0010)"
    ),
    "image-without-pixel-data": BadInput(
        _no_pixel_data, status.CANNOT_UNDERSTAND, "an image without pixel data"
    ),
    "element-header-cut-short": BadInput(
        _header_cut_short, status.CANNOT_UNDERSTAND, "cannot parse the data set"
    ),
    "deflated-data-set-that-is-not": BadInput(
        _not_deflated,
        status.CANNOT_UNDERSTAND,
        "cannot parse the data set",
        DeflatedExplicitVRLittleEndian,
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_data_set_is_refused_with_one_log_line(
    case: BadInput,
    start_node: NodeFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, pynetdicom's too: none may leak patient data
    node = start_node()
    data, request_uid = case.build(crafted_image())

    got = send_one(
        node.port, Instance(data, CTImageStorage, request_uid, case.transfer_syntax), tmp_path
    )

    assert got == case.status, f"status 0x{got or 0:04X}, expected 0x{case.status:04X}"
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aidx") and request_uid in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert case.reason in lines[0], lines[0]
    assert f"status=0x{case.status:04X}" in lines[0], lines[0]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    # Nothing of the refused instance is kept.
    assert node.store.count(instances) == 0
    assert list(node.spool.files()) == []
    assert_spool_clean(node)
    # The node keeps serving: an echo and a valid instance on new associations.
    assert echo_ok(node.port)
    good = crafted_image()
    good_uid = str(good.SOPInstanceUID)
    assert send_one(node.port, Instance(encode(good), CTImageStorage, good_uid), tmp_path) == 0
    assert [row["sop_uid"] for row in node.store.study_instances(good.StudyInstanceUID)] == [
        good_uid
    ]
    assert_no_patient_data_logged(caplog)


def test_empty_element_with_unknown_vr_is_stored_as_received(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """An empty element with a VR pydicom does not know is kept, not a processing failure (the
    node used to convert empty values while checking completeness, and that raised)."""
    node = start_node()
    ds = crafted_image()
    data = encode(ds) + b"\xe1\x7f\x10\x00ZZ\x00\x00"  # (7FE1,0010), VR "ZZ", no value
    sop_uid = str(ds.SOPInstanceUID)
    assert send_one(node.port, Instance(data, CTImageStorage, sop_uid), tmp_path) == 0
    (row,) = node.store.study_instances(ds.StudyInstanceUID)
    assert dataset_bytes(Path(row["path"])) == data


# ------------------------------------------------------------------- 2. the corpus sweep
@dataclass(frozen=True)
class CorpusFile:
    """A DICOM file of pydicom's test corpus and what a C-STORE of it needs."""

    path: Path
    sop_class: str
    sop_uid: str
    transfer_syntax: str  # declared in the File Meta Information, else detected
    has_uids: bool  # the data set names its SOP class and instance, series and study

    def instance(self) -> Instance:
        """The file's data set as it is in the file."""
        return Instance(
            dataset_bytes(self.path), self.sop_class, self.sop_uid, self.transfer_syntax
        )


def _detected_syntax(ds: Dataset) -> str:
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def read_quietly(path: Path, *, force: bool = True, **kwargs: Any) -> Dataset:
    """Read a file of the corpus (or a stored copy of one, which must be valid Part 10: no
    ``force``) without pydicom's warnings about the oddities these files exist to have."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path, force=force, **kwargs)


def read_corpus() -> tuple[list[CorpusFile], list[Path]]:
    """The DICOM files of pydicom's test data (with a Part 10 header, or a data set that names
    its SOP class), and the other files, which are skipped."""
    files: list[CorpusFile] = []
    skipped: list[Path] = []
    for path in sorted(p for p in CORPUS.rglob("*") if p.is_file()):
        has_meta = path.read_bytes()[128:132] == b"DICM"
        try:
            ds = read_quietly(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, struct.error):
            ds = Dataset()
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        if not has_meta and "SOPClassUID" not in ds:
            skipped.append(path)
            continue
        # A C-STORE must name a class and an instance; a file that names none is still sent
        # (as Secondary Capture), and the node must refuse its data set.
        sop_class = str(
            ds.get("SOPClassUID")
            or meta.get("MediaStorageSOPClassUID")
            or SecondaryCaptureImageStorage
        )
        sop_uid = str(
            ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or generate_uid()
        )
        syntax = str(meta.get("TransferSyntaxUID") or _detected_syntax(ds))
        has_uids = all(ds.get(keyword) for keyword in REQUIRED_UIDS)
        files.append(CorpusFile(path, sop_class, sop_uid, syntax, has_uids))
    return files, skipped


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


@dataclass(frozen=True)
class Sent:
    file: CorpusFile
    tool: str  # "storescu" or "pynetdicom"
    outcome: str  # "success", "failure" or "not negotiated"
    detail: str  # the response as the tool reports it


# DCMTK's names for the failure statuses the node returns (PS3.4 B.2.3).
DCMTK_FAILURES = {
    "Error: CannotUnderstand",
    "Error: DataSetDoesNotMatchSOPClass",
    "Failed: OutOfResources",
}
NODE_FAILURES = {
    status.CANNOT_UNDERSTAND,
    status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    status.OUT_OF_RESOURCES,
}


def sweep(port: int, files: list[CorpusFile], work: Path) -> list[Sent]:
    """Send every file with DCMTK storescu (one association per transfer syntax, proposing the
    file's own first), then the ones storescu could not send with pynetdicom, as they are."""
    sent: list[Sent] = []
    by_syntax: dict[str, list[CorpusFile]] = {}
    for item in files:
        by_syntax.setdefault(item.transfer_syntax, []).append(item)
    for syntax, group in by_syntax.items():
        option = STORESCU_PROPOSE.get(UID(syntax))
        result = storescu(
            LOOPBACK,
            port,
            [item.path for item in group],
            called_aet=NODE_AET,
            calling_aet="SWEEP",
            extra_args=["-v", "-R", "-nh", *([option] if option else [])],
            check=False,
        )
        responses = storescu_responses(result.stderr)
        # The association ended normally: the node neither aborted nor dropped it.
        assert not re.search("abort", result.stderr, re.IGNORECASE), result.stderr[-3000:]
        assert not responses or "Releasing Association" in result.stderr, result.stderr[-3000:]
        for item in group:
            answer = responses.get(str(item.path))
            if answer is None:
                continue
            assert answer == "Success" or answer in DCMTK_FAILURES, f"{item.path}: {answer}"
            outcome = "success" if answer == "Success" else "failure"
            sent.append(Sent(item, "storescu", outcome, answer))
        assert echo_ok(port), f"the node stopped answering after the {syntax} files"
    done = {s.file.path for s in sent}
    rest = [item for item in files if item.path not in done]
    for item, code in zip(rest, send_raw(port, [i.instance() for i in rest], work), strict=True):
        if code is None:
            sent.append(Sent(item, "pynetdicom", "not negotiated", item.sop_class))
            continue
        assert code == status.SUCCESS or code in NODE_FAILURES, f"{item.path}: 0x{code:04X}"
        outcome = "success" if code == status.SUCCESS else "failure"
        sent.append(Sent(item, "pynetdicom", outcome, f"0x{code:04X}"))
    assert echo_ok(port), "the node stopped answering after the files sent with pynetdicom"
    return sent


# SC_rgb_jpeg.dcm declares JPEG Baseline (explicit VR) but its data set is implicit VR: the node
# stores it as received, and pydicom, reading it in the node, warns.
IMPLICIT_UNDER_EXPLICIT = "ignore:Expected explicit VR, but found implicit VR:UserWarning"


@pytest.mark.filterwarnings(IMPLICIT_UNDER_EXPLICIT)
def test_pydicom_corpus_sweep(
    start_node: NodeFactory, small_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tool("storescu", "dcmtk")
    node = start_node()
    files, skipped = read_corpus()
    assert len(files) > 150, f"pydicom's test data looks incomplete: {len(files)} files"

    sent = sweep(node.port, files, tmp_path)

    assert sorted(s.file.path for s in sent) == sorted(f.path for f in files)
    counts = Counter(s.outcome for s in sent)
    by_tool = Counter(f"{s.tool} {s.outcome}" for s in sent)
    with capsys.disabled():
        print(
            f"\ncorpus sweep: {len(files)} DICOM files: {counts['success']} success, "
            f"{counts['failure']} failure, {counts['not negotiated']} not negotiated "
            f"({dict(sorted(by_tool.items()))}); {len(skipped)} other files skipped: "
            f"{sorted(str(p.relative_to(CORPUS)) for p in skipped)}"
        )
        for s in sent:
            if s.outcome != "success" or s.tool != "storescu":
                where = s.file.path.relative_to(CORPUS)
                print(f"  {s.outcome:15} {s.tool:10} {s.detail:30} {where}")
    # A data set that names its study, series, class and instance is stored, unless it is
    # broken; one that does not is refused, never stored.
    for s in sent:
        if s.outcome == "success":
            assert s.file.has_uids, s.file.path
    assert counts["success"] > 140
    assert counts["failure"] > 10
    assert counts["success"] + counts["failure"] + counts["not negotiated"] == len(files)

    # The node still takes a normal study.
    result = storescu(LOOPBACK, node.port, [small_study], called_aet=NODE_AET, calling_aet="CT1")
    assert result.returncode == 0, result.stdout + result.stderr
    study_files = sorted(small_study.glob("*.dcm"))
    study_uid = str(dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
    assert len(node.store.study_instances(study_uid)) == len(study_files)

    # Every instance that got a success status is on disk, readable and indexed once; the
    # file kept is the last one that succeeded (the corpus repeats some SOP Instance UIDs).
    last_success: dict[str, Sent] = {}
    for s in sent:
        if s.outcome == "success":
            last_success[s.file.sop_uid] = s
    rows = {str(row["sop_uid"]): row for row in _all_instances(node.store)}
    study_uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study_files}
    assert set(rows) == set(last_success) | study_uids
    assert len(rows) == node.store.count(instances)
    for sop_uid, s in last_success.items():
        row = rows[sop_uid]
        stored = Path(str(row["path"]))
        ds = read_quietly(stored, force=False)  # the whole file, pixel data included
        assert str(ds.SOPInstanceUID) == sop_uid
        assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"] == s.file.transfer_syntax
        assert row["size"] == stored.stat().st_size
        # pynetdicom sent the data set undecoded, and DCMTK passes pixel data through when it
        # sends in the file's own transfer syntax: the pixel data is the file's.
        assert ds.get("PixelData") == read_quietly(s.file.path).get("PixelData"), s.file.path
    spool_files = {str(p) for p in node.spool.files()}
    assert spool_files == {str(row["path"]) for row in rows.values()}
    assert_spool_clean(node)


def _all_instances(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(instances.select())]


@pytest.mark.filterwarnings(IMPLICIT_UNDER_EXPLICIT)
def test_encoded_files_are_stored_byte_for_byte(start_node: NodeFactory, tmp_path: Path) -> None:
    """Big endian, deflated, JPEG, JPEG-LS, JPEG 2000 and RLE files of the corpus, sent as they
    are: the stored data set is the received one, byte for byte. Files whose data set lacks a
    required UID are sent once as they are (and refused) and once with the UIDs added."""
    node = start_node()
    files, _ = read_corpus()
    encoded = [
        f
        for f in files
        if UID(f.transfer_syntax) in ENCODED_SYNTAXES
        and f.sop_class != MediaStorageDirectoryStorage
    ]
    assert {UID(f.transfer_syntax) for f in encoded} == ENCODED_SYNTAXES
    complete = [f.instance() for f in encoded if f.has_uids]
    incomplete = [f for f in encoded if not f.has_uids]
    assert set(send_raw(node.port, [f.instance() for f in incomplete], tmp_path)) == {
        status.CANNOT_UNDERSTAND
    }
    repaired = [_with_uids(f) for f in incomplete]
    by_uid: dict[str, Instance] = {}
    for item, code in zip(
        complete + repaired, send_raw(node.port, complete + repaired, tmp_path), strict=True
    ):
        assert code == status.SUCCESS, item.sop_uid
        by_uid[item.sop_uid] = item  # the corpus repeats some UIDs: the last one is kept
    for row in _all_instances(node.store):
        item = by_uid.pop(str(row["sop_uid"]))
        stored = Path(str(row["path"]))
        assert dataset_bytes(stored) == item.dataset, stored
        assert read_quietly(stored, force=False).file_meta.TransferSyntaxUID == item.transfer_syntax
        assert row["transfer_syntax"] == item.transfer_syntax
    assert by_uid == {}


def _with_uids(item: CorpusFile) -> Instance:
    """The file's data set with the missing study, series and instance UIDs added (pixel data,
    compressed or not, is written back unchanged)."""
    assert UID(item.transfer_syntax) != DeflatedExplicitVRLittleEndian
    ds = read_quietly(item.path)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            setattr(ds, keyword, generate_uid())
    ds.SOPClassUID = item.sop_class
    ds.SOPInstanceUID = item.sop_uid
    return Instance(
        encode(ds, item.transfer_syntax), item.sop_class, item.sop_uid, item.transfer_syntax
    )


# ----------------------------------------------------------------------- 3. disk floor
def test_disk_floor_refuses_with_out_of_resources(
    start_node: NodeFactory,
    small_study: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    node = start_node(node__min_free_disk_mb=free_mb + 1024)
    study = []
    for path in sorted(small_study.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        study.append(
            Instance(
                dataset_bytes(path),
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
            )
        )

    assert send_raw(node.port, study, tmp_path) == [status.OUT_OF_RESOURCES] * len(study)

    for item in study:
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("aidx") and item.sop_uid in r.getMessage()
        ]
        assert len(lines) == 1, lines
        assert "status=0xA700" in lines[0] and "free disk space below" in lines[0], lines[0]
    assert list(node.spool.files()) == []
    assert_spool_clean(node)
    assert node.store.count(instances) == 0
    # Still serving: an echo now, and stores again once there is room.
    assert echo_ok(node.port)
    node.spool.min_free_bytes = 0
    assert send_raw(node.port, study, tmp_path) == [status.SUCCESS] * len(study)
    assert node.store.count(instances) == len(study)


# ---------------------------------------------------------------------- 4. crash safety
class NodeProcess:
    """``aidx serve`` in a subprocess on a data dir, ready once a C-ECHO succeeds."""

    def __init__(self, data_dir: Path, port: int, log_path: Path) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_path = log_path
        command = [str(AIDX), "--data-dir", str(data_dir), "serve", "--port", str(port)]
        self.process = start_process(command, log_path)
        poll_until(
            lambda: echoscu(LOOPBACK, port, called_aet=NODE_AET).returncode == 0,
            30.0,
            "aidx serve answering C-ECHO",
            process=self.process,
            log_path=log_path,
        )

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


def _acknowledged(lines: Iterable[str]) -> list[str]:
    """Files that got a success response, from ``storescu -v`` output lines."""
    return [
        path for path, answer in storescu_responses("\n".join(lines)).items() if answer == "Success"
    ]


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aidx serve`` killed with SIGKILL while DCMTK sends 300 slices: after a restart every
    instance that got a success status is stored whole and indexed once, no temporary file
    is left, and a full re-send completes the study once, with one job."""
    require_tool("storescu", "dcmtk")
    assert AIDX.is_file(), f"{AIDX} not found: install the project (pip install -e .)"
    phantom = tmp_path / "phantom"
    generate(phantom, PhantomOptions(seed=5, slices=300, matrix=128, nodules=0, workers=2))
    files = sorted((phantom / "dicom").glob("*.dcm"))
    assert len(files) == 300
    sop_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    data_dir = tmp_path / "data"
    port = free_port()
    for name in [n for n in os.environ if n.startswith("AIDX_")]:
        monkeypatch.delenv(name)  # only the settings below reach the node
    monkeypatch.setenv("AIDX_NODE__MIN_FREE_DISK_MB", "0")
    monkeypatch.setenv("AIDX_NODE__STUDY_QUIET_PERIOD_S", "60")

    node = NodeProcess(data_dir, port, tmp_path / "node1.log")
    lines: list[str] = []
    enough = threading.Event()
    sender = subprocess.Popen(
        storescu_command(
            LOOPBACK, port, [phantom / "dicom"], called_aet=NODE_AET, extra_args=["-v"]
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=peer_env(),
    )

    def read_output() -> None:
        assert sender.stderr is not None
        successes = 0
        for line in sender.stderr:
            lines.append(line.rstrip("\n"))
            if "Received Store Response (Success)" in line:
                successes += 1
                if successes >= 100:
                    enough.set()
        enough.set()  # storescu ended (it should not before the kill)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert enough.wait(60), "storescu got no 100 success responses within 60 s"
        # Aim the kill at a write in progress (a temporary file exists) if one shows up soon.
        catch_write_until = time.monotonic() + 2.0
        incoming = data_dir / "spool" / ".incoming"
        while time.monotonic() < catch_write_until and not any(incoming.glob("*.part")):
            pass
        node.kill()
        sender.wait(30)
        reader.join(10)
    finally:
        node.stop()
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
    acknowledged = {sop_of[path] for path in _acknowledged(lines)}
    assert 100 <= len(acknowledged) < 300, f"killed too late: {len(acknowledged)} acknowledged"
    spool = data_dir / "spool"
    partial = list((spool / ".incoming").glob("*.part"))
    on_disk = len(list(spool.glob("*/*/*.dcm")))
    store = Store(AidxConfig(data_dir=data_dir).store_url())
    indexed = store.count(instances)
    store.close()
    with capsys.disabled():
        print(
            f"\nkill -9 after {len(acknowledged)} success responses: {on_disk} files in the "
            f"spool, {indexed} indexed, {len(partial)} partial files"
        )

    # Restart on the same data dir: every acknowledged instance is there, whole and indexed.
    # Shorter now (the open study must follow), but longer than restart + checks + re-send
    # start, or a re-indexed instance could complete the study before the re-send reopens it.
    monkeypatch.setenv("AIDX_NODE__STUDY_QUIET_PERIOD_S", "8")
    node = NodeProcess(data_dir, port, tmp_path / "node2.log")
    store = Store(AidxConfig(data_dir=data_dir).store_url())
    try:
        assert list((spool / ".incoming").glob("*.part")) == []
        log = node.log_path.read_text()
        if partial:
            assert f"removed {len(partial)} partial files" in log, log
        if on_disk > indexed:
            assert f"re-indexed {on_disk - indexed} files" in log, log
        rows = {row["sop_uid"]: row for row in store.study_instances(study_uid)}
        assert len(rows) == store.count(instances) == on_disk
        missing = acknowledged - set(rows)
        assert missing == set(), f"{len(missing)} acknowledged instances lost"
        for sop_uid in acknowledged:
            ds = dcmread(rows[sop_uid]["path"])
            assert str(ds.SOPInstanceUID) == sop_uid
            assert ds.pixel_array.shape == (128, 128)
        stored = sorted(str(p) for p in spool.glob("*/*/*.dcm"))
        assert stored == sorted(str(row["path"]) for row in rows.values())
        study = store.study(study_uid)
        assert study is not None and study["instance_count"] == len(rows)

        # Re-send everything: 300 indexed once, one completion, one job.
        result = storescu(LOOPBACK, port, [phantom / "dicom"], called_aet=NODE_AET)
        assert result.returncode == 0, result.stdout + result.stderr
        poll_until(
            lambda: len(store.study_jobs(study_uid)) == 1,
            30.0,
            "the study completing",
            process=node.process,
            log_path=node.log_path,
        )
        study = store.study(study_uid)
        assert study is not None
        assert (study["state"], study["version"], study["instance_count"]) == (
            "complete",
            1,
            300,
        )
        assert store.count(instances) == 300
        assert len({row["sop_uid"] for row in store.study_instances(study_uid)}) == 300
        assert len(list(spool.glob("*/*/*.dcm"))) == 300
        assert store.next_completion() is None  # nothing left open: no further job
        assert store.count(jobs) == 1
    finally:
        store.close()
        node.stop()
    assert node.process.returncode == 0, (tmp_path / "node2.log").read_text()
