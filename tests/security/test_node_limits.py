"""No sender can stop, exhaust or corrupt the node (issue 14, items 1-4 and 12).

Slow and silent connections are closed at the association-request deadline and cannot take the
slots; one address cannot take them either; every refusal is logged once and counted. A deflate
bomb, an oversized data set and an oversized PDU are refused without being held in memory. A
re-used SOP Instance UID of another study or patient is refused and the stored one kept. A disk
that fills between the file and the index leaves nothing behind; deep sequences get 0xC000.
"""

from __future__ import annotations

import logging
import socket
import struct
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from aidx.deflate import InflateLimitError, inflated_size, read_header
from aidx.store.store import Store, instances, studies
from dicom_node import status
from dicom_node.service import NodeService
from inference.pipeline import within_inflate_limit
from tests.dicom_node.conftest import NodeFactory, wait_for
from tests.dicom_node.senders import (
    Instance,
    assert_spool_clean,
    echo_ok,
    encode,
    send_raw,
    write_part10,
)
from tests.dicom_node.test_bad_input import assert_no_patient_data_logged, crafted_image
from tests.peers import LOOPBACK

# Connections "from another host": Linux routes all of 127.0.0.0/8 to loopback.
ATTACKER = "127.0.0.2"
# How long a test waits for the node to close a connection (the node's deadline is 1 s).
CLOSE_WAIT_S = 15.0
# The deadline of the tests' slow peers. The test process hosts the node and its legitimate
# peer (echo_ok) too; at 1 s, a loaded CI run once closed that peer's own association request.
REQUEST_DEADLINE_S = 3.0


def connect(port: int, source: str = ATTACKER) -> socket.socket:
    sock = socket.create_connection(
        (LOOPBACK, port), timeout=CLOSE_WAIT_S, source_address=(source, 0)
    )
    sock.settimeout(CLOSE_WAIT_S)
    return sock


def closed_by_node(sock: socket.socket) -> bool:
    """Whether the node closes the connection (end of file, or a reset) within CLOSE_WAIT_S."""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def refused(node: NodeService, reason: str) -> int:
    for family in node.scp.guard.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("reason") == reason:
                return int(sample.value)
    return 0


# ------------------------------------------------------------------ 1. slow and idle peers
def test_a_slow_association_request_is_closed_at_its_deadline(
    start_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node__association_request_timeout_s=REQUEST_DEADLINE_S)
    caplog.set_level(logging.WARNING, logger="aidx.node")
    slow = connect(node.port)
    slow.sendall(b"\x01\x00")  # the first two bytes of an A-ASSOCIATE-RQ, then nothing
    silent = connect(node.port)
    try:
        assert closed_by_node(slow), "a dribbling association request was never closed"
        assert closed_by_node(silent), "a silent connection was never closed"
    finally:
        slow.close()
        silent.close()
    assert refused(node, "request_timeout") == 2
    lines = [
        r.getMessage() for r in caplog.records if "association_request_timeout_s" in r.getMessage()
    ]
    assert len(lines) == 2 and all(ATTACKER in line for line in lines), lines
    assert echo_ok(node.port)


def test_silent_connections_cannot_take_the_association_slots(start_node: NodeFactory) -> None:
    node = start_node(node__max_associations=4, node__association_request_timeout_s=30.0)
    held = [
        connect(node.port, source)
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    ]
    held += [connect(node.port, "127.0.0.6") for _ in range(4)]
    try:
        # Eight connections that never send a request: before, each one held a slot.
        assert echo_ok(node.port), "silent connections kept a legitimate peer out"
    finally:
        for sock in held:
            sock.close()


def test_one_address_cannot_take_every_slot(
    start_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(
        node__max_pending_per_address=2,
        node__max_connections_per_address=3,
        node__association_request_timeout_s=30.0,
    )
    caplog.set_level(logging.WARNING, logger="aidx.node")
    held = [connect(node.port) for _ in range(2)]
    try:
        wait_for(lambda: node.scp.guard.open_counts()[0] == 2, "two pending connections")
        third = connect(node.port)
        assert closed_by_node(third), "a third pending connection from one address was kept"
        third.close()
        assert refused(node, "pending_address_limit") == 1
        assert any(
            ATTACKER in r.getMessage() and "max_pending_per_address" in r.getMessage()
            for r in caplog.records
        )
        assert echo_ok(node.port), "another address was kept out"
    finally:
        for sock in held:
            sock.close()


def test_the_refusals_are_served_in_metrics(start_node: NodeFactory) -> None:
    from aidx.pipeline.metrics import MetricsServer

    node = start_node(node__association_request_timeout_s=REQUEST_DEADLINE_S)
    silent = connect(node.port)
    assert closed_by_node(silent)
    silent.close()
    server = MetricsServer(LOOPBACK, 0, node.store, lambda: {}, [node.scp.guard])
    text = server.metrics().decode()
    assert 'aidx_node_connections_refused_total{reason="request_timeout"} 1.0' in text
    assert 'aidx_node_connections_open{state="pending"}' in text


def test_a_pdu_longer_than_the_node_reads_aborts_before_it_is_read(start_node: NodeFactory) -> None:
    node = start_node(node__max_dataset_mb=1)
    sock = connect(node.port, LOOPBACK)
    try:
        # An A-ASSOCIATE-RQ header declaring 3 GB: pynetdicom would read until it had them all.
        sock.sendall(struct.pack(">BBL", 0x01, 0, 3_000_000_000) + b"\x00" * 1024)
        assert closed_by_node(sock)
    finally:
        sock.close()
    assert echo_ok(node.port)


# -------------------------------------------------------- 2, 4. bombs and oversized data sets
def big_image(pixel_bytes: int) -> Dataset:
    ds = crafted_image()
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = b"\x00" * (side * side * 2)
    return ds


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def test_a_deflate_bomb_is_refused_without_inflating_it(
    start_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node__max_dataset_mb=2)
    ds = big_image(40 * 1024 * 1024)  # 40 MB of zeros: about 40 KB deflated
    bomb = deflate(encode(ds))
    assert len(bomb) < 200_000
    small = crafted_image()
    codes = send_raw(
        node.port,
        [
            Instance(
                bomb, str(ds.SOPClassUID), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian
            ),
            Instance(
                deflate(encode(small)),
                str(small.SOPClassUID),
                str(small.SOPInstanceUID),
                DeflatedExplicitVRLittleEndian,
            ),
        ],
        tmp_path,
    )
    assert codes == [status.OUT_OF_RESOURCES, status.SUCCESS]
    assert node.store.count(instances) == 1
    assert not node.spool.path_for(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    ).exists()
    assert_spool_clean(node)
    assert any(
        "max_dataset_mb" in r.getMessage() and str(ds.SOPInstanceUID) in r.getMessage()
        for r in caplog.records
    )
    assert_no_patient_data_logged(caplog)


def test_an_oversized_data_set_is_refused_and_the_association_goes_on(
    start_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node__max_dataset_mb=1)
    big, small = big_image(3 * 1024 * 1024), crafted_image()
    codes = send_raw(
        node.port,
        [
            Instance(encode(big), str(big.SOPClassUID), str(big.SOPInstanceUID)),
            Instance(encode(small), str(small.SOPClassUID), str(small.SOPInstanceUID)),
        ],
        tmp_path,
    )
    assert codes == [status.OUT_OF_RESOURCES, status.SUCCESS]
    assert node.store.count(instances) == 1
    assert_spool_clean(node)
    assert any("exceeds node.max_dataset_mb" in r.getMessage() for r in caplog.records)


def test_a_worker_never_inflates_a_stored_bomb(tmp_path: Path) -> None:
    ds = big_image(8 * 1024 * 1024)
    bomb = tmp_path / "bomb.dcm"
    write_part10(
        bomb,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        DeflatedExplicitVRLittleEndian,
        deflate(encode(ds)),
    )
    plain = tmp_path / "plain.dcm"
    write_part10(
        plain, str(ds.SOPClassUID), generate_uid(), "1.2.840.10008.1.2.1", encode(crafted_image())
    )
    with pytest.raises(InflateLimitError):
        inflated_size(bomb, 1024 * 1024)
    assert inflated_size(bomb, 16 * 1024 * 1024) == len(encode(ds))
    assert inflated_size(plain, 1024) is None
    assert within_inflate_limit([bomb, plain], 1024 * 1024) == [plain]
    with pytest.raises(InflateLimitError):  # the header readers of routing and the worker
        read_header(bomb, 1024 * 1024)
    assert str(read_header(plain, 1024).SOPClassUID) == str(ds.SOPClassUID)


def test_the_viewer_leaves_out_a_stored_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ui import viewer

    ds = big_image(4 * 1024 * 1024)
    bomb = tmp_path / "bomb.dcm"
    write_part10(
        bomb,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        DeflatedExplicitVRLittleEndian,
        deflate(encode(ds)),
    )
    monkeypatch.setattr(viewer, "MAX_INFLATED_BYTES", 1024 * 1024)
    with pytest.raises(ValueError, match="none of the 1 files"):
        viewer._series_files(tmp_path, str(ds.SeriesInstanceUID))


# ------------------------------------------------------------------- 3. re-used SOP UIDs
def test_a_reused_sop_instance_uid_of_another_study_is_refused(
    start_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    first = crafted_image()
    other = crafted_image()
    other.SOPInstanceUID = first.SOPInstanceUID  # same UID, another study and patient
    other.PatientID = "SECRET-OTHER"
    same_study_other_patient = crafted_image()
    same_study_other_patient.SOPInstanceUID = first.SOPInstanceUID
    same_study_other_patient.StudyInstanceUID = first.StudyInstanceUID
    same_study_other_patient.SeriesInstanceUID = first.SeriesInstanceUID
    same_study_other_patient.PatientID = "SECRET-THIRD"
    items = [
        Instance(encode(d), str(d.SOPClassUID), str(d.SOPInstanceUID))
        for d in (first, other, same_study_other_patient, first)
    ]
    codes = send_raw(node.port, items, tmp_path)
    assert codes == [
        status.SUCCESS,
        status.DUPLICATE_SOP_INSTANCE,
        status.DUPLICATE_SOP_INSTANCE,
        status.SUCCESS,
    ]
    with node.store.engine.connect() as conn:
        rows = conn.execute(select(instances.c.study_uid, instances.c.path)).all()
        known = {r[0] for r in conn.execute(select(studies.c.study_uid))}
    assert [r[0] for r in rows] == [str(first.StudyInstanceUID)]
    assert known == {str(first.StudyInstanceUID)}
    stored = Path(rows[0][1])
    assert stored.read_bytes().endswith(encode(first)), "the stored file was replaced"
    assert not (node.spool.root / str(other.StudyInstanceUID)).exists()
    lines = [r.getMessage() for r in caplog.records if "0x0111" in r.getMessage()]
    assert len(lines) == 2
    assert str(first.StudyInstanceUID) in lines[0] and str(other.StudyInstanceUID) in lines[0]
    assert_no_patient_data_logged(caplog)


def test_a_series_uid_of_another_study_is_refused(start_node: NodeFactory, tmp_path: Path) -> None:
    node = start_node()
    first, second = crafted_image(), crafted_image()
    second.SeriesInstanceUID = first.SeriesInstanceUID
    items = [
        Instance(encode(d), str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in (first, second)
    ]
    assert send_raw(node.port, items, tmp_path) == [status.SUCCESS, status.DUPLICATE_SOP_INSTANCE]
    assert node.store.count(instances) == 1


def test_the_index_refuses_a_conflict_even_past_the_node_check(tmp_path: Path) -> None:
    """Two nodes on one store may check at the same time: the index decides under its lock."""
    from dicom_node.parse import parse_dataset, read_record

    store = Store(f"sqlite:///{tmp_path / 'aidx.db'}")
    try:
        first, other = crafted_image(), crafted_image()
        other.SOPInstanceUID = first.SOPInstanceUID
        records = [
            read_record(
                parse_dataset(encode(d), "1.2.840.10008.1.2.1"),
                str(d.SOPInstanceUID),
                str(d.SOPClassUID),
                "1.2.840.10008.1.2.1",
                "X",
                1,
            )
            for d in (first, other)
        ]
        assert store.index_instance(records[0], 1.0, 30).outcome == "new"
        result = store.index_instance(records[1], 2.0, 30)
        assert result.outcome == "conflict"
        assert (
            str(first.StudyInstanceUID) in result.conflict
            and str(other.StudyInstanceUID) in result.conflict
        )
        assert "SECRET" not in result.conflict
    finally:
        store.close()


# ----------------------------------------------------------------- 12. disk full, deep nesting
def test_a_disk_that_fills_before_the_index_leaves_nothing_behind(
    start_node: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()

    def full(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(node.store, "index_instance", full)
    ds = crafted_image()
    codes = send_raw(
        node.port, [Instance(encode(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID))], tmp_path
    )
    assert codes == [status.OUT_OF_RESOURCES]
    assert list(node.spool.files()) == []
    assert_spool_clean(node)


@pytest.mark.parametrize("where", ["writing", "flushing the folder"])
def test_a_disk_that_fills_while_writing_the_file_leaves_nothing_behind(
    start_node: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC writing the temporary file, or flushing the series folder after the rename (the
    complete file stayed in the spool, unindexed, though the store was refused)."""
    import errno
    import os

    from dicom_node import spool

    node = start_node()
    ds = crafted_image()
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "writing":
        write = os.write

        def write_part(fd: int, data: bytes) -> int:
            if Path(f"/proc/self/fd/{fd}").readlink().name.endswith(".part"):
                raise full
            return write(fd, data)

        monkeypatch.setattr(spool.os, "write", write_part)
    else:
        fsync_dir = spool._fsync_dir

        def fsync_series(path: Path) -> None:
            if path.name == str(ds.SeriesInstanceUID):
                raise full
            fsync_dir(path)

        monkeypatch.setattr(spool, "_fsync_dir", fsync_series)
    codes = send_raw(
        node.port, [Instance(encode(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID))], tmp_path
    )
    assert codes == [status.OUT_OF_RESOURCES]
    assert list(node.spool.files()) == []
    assert node.store.count(instances) == 0
    assert_spool_clean(node)


def nested(depth: int) -> Dataset:
    ds = crafted_image()
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(depth - 1):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner])
    return ds


@pytest.mark.parametrize("depth", [40, 3000])
def test_deeply_nested_sequences_get_cannot_understand(
    start_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    node = start_node()
    ds = nested(depth)
    data = _encode_nested(ds) if depth > 200 else encode(ds)
    codes = send_raw(
        node.port, [Instance(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID))], tmp_path
    )
    assert codes == [status.CANNOT_UNDERSTAND]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and "max_sequence_depth" in problems[0], problems
    assert echo_ok(node.port)


def _encode_nested(ds: Dataset) -> bytes:
    """pydicom's writer recurses too; undefined-length items and sequences written by hand."""
    top = crafted_image()
    depth = 0
    inner: Dataset = ds.ContentSequence[0]
    while "ContentSequence" in inner:
        depth += 1
        inner = inner.ContentSequence[0]
    item_open, seq_open = (
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
        b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff",
    )
    item_close, seq_close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    leaf = b"\x08\x00\x00\x01SH\x02\x001 "
    body = (seq_open + item_open) * (depth + 1) + leaf + (item_close + seq_close) * (depth + 1)
    head = encode(top)
    # (0040,A730) sorts after the image's attributes up to (0028,xxxx) and before PixelData.
    pixel = head.index(b"\xe0\x7f\x10\x00")
    return head[:pixel] + body + head[pixel:]


def test_when_pending_requests_are_full_the_oldest_goes_not_the_newcomer(
    start_node: NodeFactory,
) -> None:
    node = start_node(node__max_pending_connections=3, node__association_request_timeout_s=60.0)
    held = [connect(node.port, f"127.0.0.{n}") for n in (2, 3, 4)]
    try:
        wait_for(lambda: node.scp.guard.open_counts()[0] == 3, "three pending connections")
        assert echo_ok(node.port), "a full set of pending requests kept a new peer out"
        assert closed_by_node(held[0]), "the oldest pending connection was kept"
        assert refused(node, "pending_limit") >= 1
    finally:
        for sock in held:
            sock.close()


def test_a_closed_slow_connection_is_one_line_not_pynetdicom_errors(
    start_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With aidx's logging, the node's line (address, reason) is the only one: pynetdicom's
    "PDU is shorter than expected" ERROR, which names no peer, is dropped at INFO."""
    from aidx.logs import setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("pynetdicom").level)
    node = start_node(node__association_request_timeout_s=REQUEST_DEADLINE_S)
    try:
        setup_logging("INFO")  # the filters of every aidx command
        root.addHandler(caplog.handler)  # setup_logging replaced the root's handlers
        slow = connect(node.port)
        slow.sendall(b"\x01\x00\x00\x00\x00\xce\x00")  # a header and a byte, then nothing
        assert closed_by_node(slow)
        slow.close()
        wait_for(lambda: not any(node.scp.guard.open_counts()), "the closed connection gone")
        assert echo_ok(node.port)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("pynetdicom").setLevel(saved[2])
    lines = [f"{r.name}: {r.getMessage()}" for r in caplog.records]
    assert sum("association_request_timeout_s" in line for line in lines) == 1, lines
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom")], lines


def test_a_pending_request_is_awaited_in_the_kernel_and_left_for_pynetdicom() -> None:
    """await_request peeks: the request's bytes stay in the socket for pynetdicom to read."""
    import time

    from aidx.config import NodeConfig
    from dicom_node.guard import Connection, ConnectionGuard, await_request

    guard = ConnectionGuard(NodeConfig())
    left, right = socket.socketpair()
    try:
        connection = Connection("peer", left, time.monotonic() + 30.0)
        request = struct.pack(">BBL", 0x01, 0, 4) + b"ABCD"
        right.sendall(request)
        assert await_request(left, connection, guard)
        assert left.recv(64) == request
        # A request cut short is never reported complete: False once the deadline has passed.
        right.sendall(request[:7])
        connection.deadline = time.monotonic() + 0.2
        assert not await_request(left, connection, guard)
        # Its own thread saw the deadline first: it is counted as the reaper would count it.
        assert guard.refused["request_timeout"] == 1 and connection.closed
    finally:
        left.close()
        right.close()
