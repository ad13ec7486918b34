"""Export SCU against DCMTK storescp: files sent as stored (data sets bit for bit), the transfer
syntax fallback when the peer refuses a file's syntax, and the outbox giving up after its last
attempt and delivering after `aidx outbox retry`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from aidx.config import DestinationConfig
from aidx.store.store import Store
from dicom_node.export import ExportWorker, SendError, send_files
from tests.conftest import require_tool
from tests.dicom_node.aidx_process import AidxSetup, destination
from tests.dicom_node.conftest import wait_for
from tests.peers import LOOPBACK, Storescp, free_port

pytestmark = pytest.mark.external

PIXEL_DATA = 0x7FE00010


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_tool("storescp", "dcmtk")


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: what follows the preamble, "DICM" and the File
    Meta Information group (PS3.10 section 7.1), whose length its first element gives."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    # 128-byte preamble + "DICM" + the (0002,0000) element itself (tag, VR, length, UL value).
    return path.read_bytes()[128 + 4 + 12 + int(meta.FileMetaInformationGroupLength) :]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def to(scp: Storescp) -> DestinationConfig:
    return DestinationConfig(ae_title=scp.aet, host=LOOPBACK, port=scp.port)


def test_send_files_delivers_every_data_set_bit_for_bit(tmp_path: Path, small_study: Path) -> None:
    files = sorted(small_study.glob("*.dcm"))
    # +B: storescp writes each data set exactly as it came off the network.
    with Storescp(tmp_path / "received", extra_args=("+B",)) as scp:
        report = send_files(to(scp), "AIDX", files)
        received = scp.wait_for_files(len(files))
    assert (report.sent, report.converted, report.failures) == (len(files), 0, [])
    assert len(received) == len(files)
    by_uid = {sop_uid(p): p for p in received}
    assert set(by_uid) == {sop_uid(p) for p in files}
    for original in files:
        copy = by_uid[sop_uid(original)]
        assert dataset_bytes(copy) == dataset_bytes(original), original.name
        assert (
            pydicom.dcmread(copy).file_meta.TransferSyntaxUID
            == pydicom.dcmread(original).file_meta.TransferSyntaxUID
        )


def test_send_files_to_a_closed_port_names_the_destination(small_study: Path) -> None:
    port = free_port()
    unreachable = DestinationConfig(ae_title="NOBODY", host=LOOPBACK, port=port)
    with pytest.raises(SendError, match=rf"NOBODY@127\.0\.0\.1:{port} aborted or unreachable"):
        send_files(unreachable, "AIDX", sorted(small_study.glob("*.dcm")))


def test_a_refused_connection_is_one_warning_not_pynetdicom_errors(
    small_study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pynetdicom's own ERROR lines for a failed connection are dropped at INFO (aidx reports
    the failure with the destination) and kept at DEBUG."""
    import logging

    from aidx.logs import setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("pynetdicom").level)
    unreachable = DestinationConfig(ae_title="NOBODY", host=LOOPBACK, port=free_port())
    files = sorted(small_study.glob("*.dcm"))
    try:
        printed = {}
        for level in ("INFO", "DEBUG"):
            setup_logging(level)
            with pytest.raises(SendError, match="aborted or unreachable"):
                send_files(unreachable, "AIDX", files)
            printed[level] = capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("pynetdicom").setLevel(saved[2])
    assert "TCP Initialisation Error" not in printed["INFO"]
    assert "ERROR" not in printed["INFO"]
    assert "TCP Initialisation Error" in printed["DEBUG"]


@pytest.fixture(scope="module")
def slice_files(small_study: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[UID, Path]:
    """One phantom slice as stored (explicit VR little endian), RLE and JPEG 2000 lossless."""
    slices = sorted(small_study.glob("*.dcm"))
    original = slices[len(slices) // 2]  # a middle slice: body and lung in the pixels
    out = tmp_path_factory.mktemp("compressed")
    files = {ExplicitVRLittleEndian: original}
    for syntax in (RLELossless, JPEG2000Lossless):
        ds = pydicom.dcmread(original)
        ds.compress(syntax)  # pydicom's RLE encoder; pylibjpeg-openjpeg for JPEG 2000
        path = out / f"{syntax.keyword}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[syntax] = path
    return files


@pytest.mark.parametrize(
    ("stored", "scp_option", "arrives_as", "converted"),
    [
        pytest.param(RLELossless, "+xe", ExplicitVRLittleEndian, 1, id="rle-to-explicit"),
        pytest.param(JPEG2000Lossless, "+xe", ExplicitVRLittleEndian, 1, id="j2k-to-explicit"),
        pytest.param(RLELossless, "+xi", ImplicitVRLittleEndian, 1, id="rle-to-implicit"),
        pytest.param(
            ExplicitVRLittleEndian, "+xi", ImplicitVRLittleEndian, 1, id="explicit-to-implicit"
        ),
        pytest.param(RLELossless, "+xa", RLELossless, 0, id="rle-accepted-as-stored"),
    ],
)
def test_transfer_syntax_fallback(
    tmp_path: Path,
    slice_files: dict[UID, Path],
    stored: UID,
    scp_option: str,
    arrives_as: UID,
    converted: int,
) -> None:
    """+xe: storescp accepts only uncompressed syntaxes (explicit VR first); +xi: implicit VR
    little endian only; +xa: everything it knows."""
    source = slice_files[stored]
    reference = pydicom.dcmread(slice_files[ExplicitVRLittleEndian])
    with Storescp(tmp_path / "received", extra_args=(scp_option,)) as scp:
        report = send_files(to(scp), "AIDX", [source])
        [received] = scp.wait_for_files(1)
    assert (report.sent, report.converted, report.failures) == (1, converted, [])
    copy = pydicom.dcmread(received)
    assert copy.file_meta.TransferSyntaxUID == arrives_as
    assert np.array_equal(copy.pixel_array, reference.pixel_array)
    # Everything but the pixel data survives the re-encoding, sequences included.
    sent = pydicom.dcmread(source)
    assert [e for e in copy if e.tag != PIXEL_DATA] == [e for e in sent if e.tag != PIXEL_DATA]
    if not converted:
        assert copy.PixelData == sent.PixelData  # still RLE, as stored


def test_aidx_send_stores_the_study_now(tmp_path: Path, small_study: Path) -> None:
    files = sorted(small_study.glob("*.dcm"))
    with Storescp(tmp_path / "received") as scp:
        aidx = AidxSetup.create(
            tmp_path / "aidx", destinations={"PACS": destination(scp.aet, scp.port)}
        )
        sent = aidx.run("send", str(small_study), "--to", "PACS")
        received = scp.wait_for_files(len(files))
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(files)} files to PACS (0 converted)" in sent.stdout
    assert {sop_uid(p) for p in received} == {sop_uid(p) for p in files}


def test_outbox_gives_up_after_the_last_attempt_and_delivers_after_retry(
    tmp_path: Path, small_study: Path
) -> None:
    files = sorted(small_study.glob("*.dcm"))
    pacs_port = free_port()  # nothing listens here until the storescp below starts
    aidx = AidxSetup.create(
        tmp_path / "aidx",
        destinations={"PACS": destination("STORESCP", pacs_port)},
        outbox={
            "max_attempts": 2,
            "initial_backoff_s": 0.2,
            "max_backoff_s": 0.5,
            "poll_interval_s": 0.2,
        },
    )
    # Queued before any `aidx serve` created the data folder, with a path relative to another
    # working directory than the worker's: the outbox must hold absolute paths.
    queued = aidx.run("send", small_study.name, "--to", "PACS", "--queue", cwd=small_study.parent)
    assert queued.returncode == 0, queued.stderr
    assert f"outbox item 1 queued: {len(files)} files to PACS" in queued.stdout

    config = aidx.load()
    store = Store.for_config(config)
    try:
        [item] = store.outbox_items()
        assert all(Path(f).is_absolute() for f in item.files), item.files
        worker = ExportWorker(config, store)
        worker.start()
        try:
            wait_for(lambda: bool(store.outbox_items("failed")), "the item to fail for good")
        finally:
            worker.stop()
        [failed] = aidx.outbox()
        assert (failed.state, failed.tries, failed.files) == ("failed", 2, len(files))
        assert f"association to STORESCP@127.0.0.1:{pacs_port} aborted or unreachable" in (
            failed.detail
        )

        retried = aidx.run("outbox", "retry")
        assert retried.returncode == 0, retried.stderr
        assert "1 failed items queued again" in retried.stdout
        [pending] = aidx.outbox()
        assert (pending.state, pending.tries) == ("pending", 0)
        assert pending.detail.startswith("next ")

        with Storescp(tmp_path / "received", aet="STORESCP", port=pacs_port) as scp:
            worker = ExportWorker(config, store)
            worker.start()
            try:
                wait_for(lambda: bool(store.outbox_items("sent")), "delivery after retry")
            finally:
                worker.stop()
            received = scp.files()
    finally:
        store.close()
    # One association delivered each file once (storescp keeps re-sent files as extra files).
    assert len(received) == len(files)
    assert {sop_uid(p) for p in received} == {sop_uid(p) for p in files}
    [sent] = aidx.outbox()
    assert (sent.state, sent.tries, sent.files, sent.detail) == ("sent", 1, len(files), "")
    again = aidx.run("outbox", "retry")
    assert "0 failed items queued again" in again.stdout


def test_an_association_lost_mid_send_is_opened_again_for_the_rest(small_study: Path) -> None:
    """pynetdicom can lose a C-STORE response under load (then the association ends on its
    DIMSE timeout); here the peer aborts once on its third store: the file and the rest go on
    a new association, and every file arrives."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    files = sorted(small_study.glob("*.dcm"))
    received: list[str] = []
    aborted: list[bool] = []

    def on_store(event: evt.Event) -> int:
        if len(received) == 2 and not aborted:
            aborted.append(True)
            event.assoc.abort()
            return 0xA700
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="FLAKY")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        report = send_files(
            DestinationConfig(ae_title="FLAKY", host=LOOPBACK, port=port), "AIDX", files
        )
    finally:
        server.shutdown()
    assert aborted == [True]
    assert (report.sent, report.failures) == (len(files), [])
    assert sorted(received) == sorted(sop_uid(p) for p in files)
