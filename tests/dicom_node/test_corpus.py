"""pydicom's whole test corpus against the storage SCP (PS3.4 Annex B, as SCP).

Every DICOM file goes through DCMTK storescu (or pynetdicom, where storescu cannot send it)
without harming the node: each gets success or a failure status, the association ends
normally, and the node still takes a normal study afterwards. Big endian, deflated and
compressed files are stored byte for byte as received.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    UID,
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

from aidx.store.store import Store, instances
from dicom_node import status
from dicom_node.parse import REQUIRED_UIDS
from tests.conftest import require_tool
from tests.dicom_node.conftest import NodeFactory
from tests.dicom_node.senders import (
    NODE_AET,
    Instance,
    assert_spool_clean,
    dataset_bytes,
    echo_ok,
    encode,
    send_raw,
    storescu_responses,
)
from tests.peers import LOOPBACK, storescu

CORPUS = Path(pydicom.data.__file__).parent / "test_files"

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
