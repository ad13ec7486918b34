"""Access control of the storage SCP, with real associations.

Who may associate (called and calling AE titles, the peer's address), what each peer may do
(C-ECHO, C-STORE), and the node's refusal to listen beyond loopback without an allow-list.
Rejections are checked as the A-ASSOCIATE-RJ a peer sees (PS3.8 9.3.4: result, source, reason)
from pynetdicom and from DCMTK, and every test ends with a normal C-ECHO to show that the node
still serves. DICOM TLS is in test_tls.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.association import Association

from aidx.store.store import instances
from dicom_node.client import VERIFICATION
from dicom_node.policy import (
    REASON_CALLED_AE_NOT_RECOGNISED,
    REASON_CALLING_AE_NOT_RECOGNISED,
    REJECT_PERMANENT,
    SOURCE_SERVICE_USER,
    NodeStartError,
)
from dicom_node.service import NodeService
from tests.conftest import require_tool
from tests.dicom_node.conftest import NodeFactory, node_config
from tests.dicom_node.scu import (
    NODE_AE,
    assert_serving,
    associate,
    echo_status,
    one_file,
    output,
    storage_context,
)
from tests.peers import (
    DCMTK_PACKAGE,
    LOOPBACK,
    echoscu,
    free_port,
    port_open,
    storescu,
)

PERMANENT_BY_USER = (REJECT_PERMANENT, SOURCE_SERVICE_USER)


# ------------------------------------------------------------------------------ SCU helpers
def rejection(assoc: Association) -> tuple[int | None, int | None, int | None]:
    """(result, source, reason) of the A-ASSOCIATE-RJ the node answered (PS3.8 9.3.4)."""
    assert assoc.is_rejected, (
        f"expected a rejection; established={assoc.is_established}, aborted={assoc.is_aborted}"
    )
    rsp: Any = assoc.acceptor.primitive
    assert rsp is not None, "no A-ASSOCIATE response was recorded"
    return rsp.result, rsp.result_source, rsp.diagnostic


def study_uid(study: Path) -> str:
    return str(one_file(study)[1].StudyInstanceUID)


def stored_count(node: NodeService) -> int:
    return node.store.count(instances)


# ------------------------------------------------------------------------------ 1. default
def test_loopback_without_allow_list_accepts_any_calling_ae(
    start_node: NodeFactory, small_study: Path
) -> None:
    require_tool("echoscu", DCMTK_PACKAGE)
    node = start_node()
    for calling_ae in ("ANYONE", "CT_SCANNER_7", "X"):
        assert echo_status(associate(node.port, calling_ae=calling_ae)) == 0x0000
        result = echoscu(LOOPBACK, node.port, called_aet=NODE_AE, calling_aet=calling_ae)
        assert result.returncode == 0, output(result)
    result = storescu(LOOPBACK, node.port, [small_study], called_aet=NODE_AE, calling_aet="MR9")
    assert result.returncode == 0, output(result)
    assert stored_count(node) == len(list(small_study.glob("*.dcm")))


# ------------------------------------------------------------------------------ 2. called AE
def test_wrong_called_ae_title_is_rejected(start_node: NodeFactory, small_study: Path) -> None:
    require_tool("echoscu", DCMTK_PACKAGE)
    node = start_node()
    assoc = associate(node.port, called_ae="NOT_AIDX")
    assert rejection(assoc) == (*PERMANENT_BY_USER, REASON_CALLED_AE_NOT_RECOGNISED)

    result = echoscu(LOOPBACK, node.port, called_aet="NOT_AIDX", calling_aet="DCMTK")
    assert result.returncode != 0
    assert "association rejected" in output(result).lower(), output(result)
    assert "called ae title not recognized" in output(result).lower(), output(result)

    result = storescu(
        LOOPBACK, node.port, [small_study], called_aet="NOT_AIDX", calling_aet="CT1", check=False
    )
    assert result.returncode != 0
    assert stored_count(node) == 0
    assert list(node.spool.files()) == []
    assert_serving(node.port)


# ------------------------------------------------------------------------------ 3. allow-list
def test_allow_list_rejects_unlisted_calling_ae(start_node: NodeFactory, small_study: Path) -> None:
    require_tool("storescu", DCMTK_PACKAGE)
    node = start_node(node__allowed_peers=[{"ae_title": "CT1"}, {"ae_title": "AFTERWARDS"}])
    assoc = associate(node.port, calling_ae="INTRUDER")
    assert rejection(assoc) == (*PERMANENT_BY_USER, REASON_CALLING_AE_NOT_RECOGNISED)

    result = echoscu(LOOPBACK, node.port, called_aet=NODE_AE, calling_aet="INTRUDER")
    assert result.returncode != 0
    assert "calling ae title not recognized" in output(result).lower(), output(result)
    result = storescu(
        LOOPBACK, node.port, [small_study], called_aet=NODE_AE, calling_aet="INTRUDER", check=False
    )
    assert result.returncode != 0
    assert stored_count(node) == 0

    assert echo_status(associate(node.port, calling_ae="CT1")) == 0x0000
    result = storescu(LOOPBACK, node.port, [small_study], called_aet=NODE_AE, calling_aet="CT1")
    assert result.returncode == 0, output(result)
    assert stored_count(node) == len(list(small_study.glob("*.dcm")))
    assert {row["calling_ae"] for row in node.store.study_instances(study_uid(small_study))} == {
        "CT1"
    }
    assert_serving(node.port)


# ------------------------------------------------------------------------------ 4. hosts
@pytest.mark.parametrize(
    ("hosts", "accepted"),
    [
        (["127.0.0.1"], True),
        (["10.9.9.9"], False),
        (["127.0.0.0/8"], True),
        (["10.0.0.0/8", "192.168.0.0/16"], False),
        (["10.9.9.9", "127.0.0.1"], True),
        (["localhost"], True),  # a host name is resolved
    ],
)
def test_peer_bound_to_hosts(start_node: NodeFactory, hosts: list[str], accepted: bool) -> None:
    node = start_node(
        node__allowed_peers=[{"ae_title": "CT1", "hosts": hosts}, {"ae_title": "AFTERWARDS"}]
    )
    assoc = associate(node.port, calling_ae="CT1")
    if accepted:
        assert echo_status(assoc) == 0x0000
    else:
        assert rejection(assoc) == (*PERMANENT_BY_USER, REASON_CALLING_AE_NOT_RECOGNISED)
    assert_serving(node.port)


# ------------------------------------------------------------------------------ 5. rights
def test_echo_only_peer_cannot_store(start_node: NodeFactory, small_study: Path) -> None:
    require_tool("storescu", DCMTK_PACKAGE)
    node = start_node(
        node__allowed_peers=[
            {"ae_title": "PINGER", "echo": True, "store": False},
            {"ae_title": "AFTERWARDS"},
        ]
    )
    path, ds = one_file(small_study)
    assoc = associate(
        node.port, calling_ae="PINGER", contexts=[(VERIFICATION, None), storage_context(ds)]
    )
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {str(VERIFICATION)}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        assert rejected == {str(ds.SOPClassUID)}
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(path)
        rsp: Any = assoc.send_c_echo()
        assert int(rsp.Status) == 0x0000
    finally:
        assoc.release()

    result = echoscu(LOOPBACK, node.port, called_aet=NODE_AE, calling_aet="PINGER")
    assert result.returncode == 0, output(result)
    result = storescu(
        LOOPBACK, node.port, [small_study], called_aet=NODE_AE, calling_aet="PINGER", check=False
    )
    assert result.returncode != 0, output(result)
    assert "no acceptable presentation contexts" in output(result).lower(), output(result)
    assert stored_count(node) == 0
    assert list(node.spool.files()) == []
    assert_serving(node.port)


def test_store_only_peer_cannot_echo(start_node: NodeFactory, small_study: Path) -> None:
    require_tool("storescu", DCMTK_PACKAGE)
    node = start_node(
        node__allowed_peers=[
            {"ae_title": "SENDER", "echo": False, "store": True},
            {"ae_title": "AFTERWARDS"},
        ]
    )
    # Its only requested context (Verification) is refused, so the association cannot be used.
    assoc = associate(node.port, calling_ae="SENDER")
    assert not assoc.is_established
    assert not assoc.is_rejected  # not an A-ASSOCIATE-RJ: the context was refused
    assert assoc.is_aborted  # pynetdicom aborts an association with no usable context
    result = echoscu(LOOPBACK, node.port, called_aet=NODE_AE, calling_aet="SENDER")
    assert result.returncode != 0, output(result)
    assert "no acceptable presentation contexts" in output(result).lower(), output(result)

    path, ds = one_file(small_study)
    assoc = associate(
        node.port, calling_ae="SENDER", contexts=[(VERIFICATION, None), storage_context(ds)]
    )
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {str(ds.SOPClassUID)}
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_echo()
        rsp: Any = assoc.send_c_store(path)
        assert int(rsp.Status) == 0x0000
    finally:
        assoc.release()
    assert stored_count(node) == 1

    result = storescu(LOOPBACK, node.port, [small_study], called_aet=NODE_AE, calling_aet="SENDER")
    assert result.returncode == 0, output(result)
    assert stored_count(node) == len(list(small_study.glob("*.dcm")))
    assert_serving(node.port)


# ------------------------------------------------------------------------------ 6. startup
def test_beyond_loopback_without_allow_list_refuses_to_start(tmp_path: Path) -> None:
    config = node_config(tmp_path, node__host="0.0.0.0")
    service = NodeService(config)
    try:
        with pytest.raises(NodeStartError) as info:
            service.start()
    finally:
        service.stop()
        service.store.close()
    message = str(info.value)
    assert "node.allowed_peers" in message
    assert "node.accept_any_calling_ae" in message
    assert "0.0.0.0" in message
    assert not port_open(LOOPBACK, config.node.port)


@pytest.mark.parametrize(
    "overrides",
    [
        {"node__accept_any_calling_ae": True},
        {"node__allowed_peers": [{"ae_title": "CT1"}, {"ae_title": "AFTERWARDS"}]},
    ],
    ids=["accept_any_calling_ae", "allowed_peers"],
)
def test_beyond_loopback_starts_when_access_is_explicit(
    start_node: NodeFactory, overrides: dict[str, Any]
) -> None:
    node = start_node(node__host="0.0.0.0", **overrides)
    assert echo_status(associate(node.port, calling_ae="CT1")) == 0x0000
    if "node__allowed_peers" in overrides:
        assoc = associate(node.port, calling_ae="INTRUDER")
        assert rejection(assoc) == (*PERMANENT_BY_USER, REASON_CALLING_AE_NOT_RECOGNISED)
    else:
        assert echo_status(associate(node.port, calling_ae="INTRUDER")) == 0x0000
    assert_serving(node.port)


def test_cli_serve_beyond_loopback_without_allow_list_exits_with_reason(tmp_path: Path) -> None:
    script = shutil.which("aidx", path=str(Path(sys.executable).parent))
    assert script, "the aidx console script is not installed in this environment"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env["AIDX_NODE__MIN_FREE_DISK_MB"] = "0"
    env["AIDX_UI__ENABLED"] = "false"
    port = free_port()
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [
            *(script, "--data-dir", str(data_dir), "serve", "--single-process"),
            *("--host", "0.0.0.0", "--port", str(port)),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,  # it must exit on its own; a node that started would run until killed
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, output(result)
    assert "node.allowed_peers" in result.stderr
    assert "node.accept_any_calling_ae" in result.stderr
    assert not port_open(LOOPBACK, port)
