"""Access control and DICOM TLS of the storage SCP, with real associations.

Who may associate (called and calling AE titles, the peer's address), what each peer may do
(C-ECHO, C-STORE), the node's refusal to listen beyond loopback without an allow-list, and DICOM
TLS (PS3.15 B.1) with a throwaway CA. Rejections are checked as the A-ASSOCIATE-RJ a peer sees
(PS3.8 9.3.4: result, source, reason) from pynetdicom and from DCMTK, and every test ends with a
normal C-ECHO to show that the node still serves.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.association import Association

from aidx.config import DestinationConfig, TlsConfig
from aidx.store import instances
from dicom_node.client import VERIFICATION, echo
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
from tests.peers import (
    DCMTK_PACKAGE,
    ECHOSCU,
    LOOPBACK,
    echoscu,
    free_port,
    peer_env,
    port_open,
    storescu,
)

NODE_AE = "AIDX"
TIMEOUT_S = 10  # every association of these tests answers within milliseconds
PERMANENT_BY_USER = (REJECT_PERMANENT, SOURCE_SERVICE_USER)


# ------------------------------------------------------------------------------ SCU helpers
def associate(
    port: int,
    *,
    calling_ae: str = "TESTSCU",
    called_ae: str = NODE_AE,
    contexts: Sequence[tuple[str, str | None]] = ((VERIFICATION, None),),
    tls: ssl.SSLContext | None = None,
) -> Association:
    """A pynetdicom association request to the node on loopback (TLS when a context is given).

    ``contexts`` are (abstract syntax, transfer syntax or None for pynetdicom's defaults).
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT_S
    for abstract, transfer in contexts:
        if transfer is None:
            ae.add_requested_context(abstract)
        else:
            ae.add_requested_context(abstract, transfer)
    # "localhost" is what the node's certificate names; the connection still goes to 127.0.0.1.
    tls_args = (tls, "localhost") if tls is not None else None
    return ae.associate(LOOPBACK, port, ae_title=called_ae, tls_args=tls_args)


def echo_status(assoc: Association) -> int:
    """The C-ECHO status on an established association, which is then released."""
    assert assoc.is_established, "the association was not established"
    try:
        rsp: Any = assoc.send_c_echo()
    finally:
        assoc.release()
    assert rsp is not None and "Status" in rsp, "no C-ECHO response"
    return int(rsp.Status)


def rejection(assoc: Association) -> tuple[int | None, int | None, int | None]:
    """(result, source, reason) of the A-ASSOCIATE-RJ the node answered (PS3.8 9.3.4)."""
    assert assoc.is_rejected, (
        f"expected a rejection; established={assoc.is_established}, aborted={assoc.is_aborted}"
    )
    rsp: Any = assoc.acceptor.primitive
    assert rsp is not None, "no A-ASSOCIATE response was recorded"
    return rsp.result, rsp.result_source, rsp.diagnostic


def assert_serving(port: int, tls: ssl.SSLContext | None = None) -> None:
    """The node still accepts a well-formed association and answers C-ECHO with success."""
    assert echo_status(associate(port, calling_ae="AFTERWARDS", tls=tls)) == 0x0000


def one_file(study: Path) -> tuple[Path, pydicom.Dataset]:
    path = sorted(study.glob("*.dcm"))[0]
    return path, pydicom.dcmread(path, stop_before_pixels=True)


def study_uid(study: Path) -> str:
    return str(one_file(study)[1].StudyInstanceUID)


def storage_context(ds: pydicom.Dataset) -> tuple[str, str]:
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def stored_count(node: NodeService) -> int:
    return node.store.count(instances)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


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
    port = free_port()
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [script, "--data-dir", str(data_dir), "serve", "--host", "0.0.0.0", "--port", str(port)],
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


# ------------------------------------------------------------------------------ 7. TLS
@dataclass(frozen=True)
class Pki:
    """PEM files of a throwaway CA, the node's certificate and two client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aidx tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    san: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """A CA certificate (``issuer`` None: self-signed) or a leaf signed by ``issuer``."""
    now = datetime.datetime.now(datetime.UTC)
    is_ca = issuer is None
    issuer_name = _name(subject) if issuer is None else issuer[0].subject
    signing_key = key if issuer is None else issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, the node's certificate (127.0.0.1 and localhost), a client it signed, and a client
    signed by a second, unknown ("rogue") CA."""
    out = tmp_path_factory.mktemp("pki")

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, rogue_ca_key = key(), key()
    ca = _certificate("aidx test CA", ca_key, None)
    rogue_ca = _certificate("rogue CA", rogue_ca_key, None)
    server_key, client_key, rogue_key = key(), key(), key()
    server = _certificate(
        NODE_AE,
        server_key,
        (ca, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")],
    )
    client = _certificate("CT1", client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate(
        "ROGUE", rogue_key, (rogue_ca, rogue_ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(
        ca=_write_cert(ca, out / "ca.pem"),
        server_cert=_write_cert(server, out / "node.pem"),
        server_key=_write_key(server_key, out / "node.key"),
        client_cert=_write_cert(client, out / "client.pem"),
        client_key=_write_key(client_key, out / "client.key"),
        rogue_ca=_write_cert(rogue_ca, out / "rogue-ca.pem"),
        rogue_cert=_write_cert(rogue, out / "rogue.pem"),
        rogue_key=_write_key(rogue_key, out / "rogue.key"),
    )


def tls_node(start_node: NodeFactory, pki: Pki, *, require_client_cert: bool) -> NodeService:
    tls: dict[str, Any] = {
        "enabled": True,
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
    }
    if require_client_cert:
        tls |= {"require_client_certificate": True, "ca_certificates": str(pki.ca)}
    return start_node(node__tls=tls)


def client_tls(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the node against the test CA (host name included)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def echoscu_tls(
    port: int, tls_args: Sequence[str], calling_ae: str = "DCMTK"
) -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu over TLS (its default BCP 195 profile, the node's certificate verified)."""
    command = [
        require_tool("echoscu", DCMTK_PACKAGE),
        *tls_args,
        "-aet",
        calling_ae,
        "-aec",
        NODE_AE,
        LOOPBACK,
        str(port),
    ]
    assert command[0] == ECHOSCU, "DCMTK's echoscu, not pynetdicom's"
    return subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        env=peer_env(),
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_tls_node_serves_tls_peers_only(
    start_node: NodeFactory, pki: Pki, small_study: Path
) -> None:
    node = tls_node(start_node, pki, require_client_cert=False)
    tls = client_tls(pki)
    assert echo_status(associate(node.port, tls=tls)) == 0x0000

    path, ds = one_file(small_study)
    assoc = associate(node.port, contexts=[storage_context(ds)], tls=tls)
    assert assoc.is_established
    try:
        rsp: Any = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(rsp.Status) == 0x0000
    rows = node.store.study_instances(str(ds.StudyInstanceUID))
    assert [row["sop_uid"] for row in rows] == [str(ds.SOPInstanceUID)]
    assert pydicom.dcmread(rows[0]["path"]).SOPInstanceUID == ds.SOPInstanceUID

    # A plain DICOM peer cannot associate with a TLS node.
    plain = associate(node.port)
    assert not plain.is_established
    assert not plain.is_rejected  # there was no DICOM conversation at all
    result = echoscu(LOOPBACK, node.port, called_aet=NODE_AE, calling_aet="PLAIN")
    assert result.returncode != 0, output(result)

    # A client that does not trust the node's CA refuses it.
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.rogue_ca))
    assert not associate(node.port, tls=untrusting).is_established

    # aidx echo's own client: the destination's CA verifies the node.
    destination = DestinationConfig(
        ae_title=NODE_AE,
        host=LOOPBACK,
        port=node.port,
        tls=TlsConfig(enabled=True, ca_certificates=pki.ca),
    )
    assert echo(destination, "AIDXCLI") == (True, "success")

    # DCMTK over TLS, anonymous on its side, verifying the node's certificate.
    result = echoscu_tls(node.port, ["+tla", "+cf", str(pki.ca)])
    assert result.returncode == 0, output(result)
    assert_serving(node.port, tls=tls)


def test_silent_connection_does_not_block_a_tls_node(start_node: NodeFactory, pki: Pki) -> None:
    """A client that connects and never starts the handshake holds only its own connection."""
    node = tls_node(start_node, pki, require_client_cert=False)
    tls = client_tls(pki)
    with socket.create_connection((LOOPBACK, node.port), timeout=TIMEOUT_S):
        started = time.monotonic()
        assert echo_status(associate(node.port, tls=tls)) == 0x0000
        # Served at once, not after the silent client's handshake times out.
        assert time.monotonic() - started < TIMEOUT_S / 2
    assert_serving(node.port, tls=tls)


def test_tls_node_requiring_client_certificates(
    start_node: NodeFactory, pki: Pki, tmp_path: Path
) -> None:
    node = tls_node(start_node, pki, require_client_cert=True)
    with_cert = client_tls(pki, pki.client_cert, pki.client_key)
    assert echo_status(associate(node.port, calling_ae="CT1", tls=with_cert)) == 0x0000

    # No certificate, or one from a CA the node does not know: the handshake fails.
    assert not associate(node.port, tls=client_tls(pki)).is_established
    rogue = client_tls(pki, pki.rogue_cert, pki.rogue_key)
    assert not associate(node.port, tls=rogue).is_established

    base = TlsConfig(enabled=True, ca_certificates=pki.ca)
    good = base.model_copy(update={"certificate": pki.client_cert, "private_key": pki.client_key})
    bad = base.model_copy(update={"certificate": pki.rogue_cert, "private_key": pki.rogue_key})
    for tls, outcome in ((good, True), (base, False), (bad, False)):
        destination = DestinationConfig(ae_title=NODE_AE, host=LOOPBACK, port=node.port, tls=tls)
        assert echo(destination, "AIDXCLI")[0] is outcome

    # DCMTK, the real peer: its CA-signed certificate works, the rogue one and none do not.
    client = ["+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca)]
    result = echoscu_tls(node.port, client)
    assert result.returncode == 0, output(result)
    rogue_args = ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "-pw", "+cf", str(pki.ca)]
    assert echoscu_tls(node.port, rogue_args).returncode != 0
    assert echoscu_tls(node.port, ["+tla", "+cf", str(pki.ca)]).returncode != 0

    # The same through the command line, as a user configures it.
    config = tmp_path / "aidx.yaml"
    destination_tls = {
        "enabled": True,
        "ca_certificates": str(pki.ca),
        "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key),
    }
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "cli"),
                "destinations": {
                    "node": {
                        "ae_title": NODE_AE,
                        "host": LOOPBACK,
                        "port": node.port,
                        "tls": destination_tls,
                    },
                    "node_no_cert": {
                        "ae_title": NODE_AE,
                        "host": LOOPBACK,
                        "port": node.port,
                        "tls": {"enabled": True, "ca_certificates": str(pki.ca)},
                    },
                },
            }
        ),
        encoding="utf-8",
    )
    script = shutil.which("aidx", path=str(Path(sys.executable).parent))
    assert script
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    for name, code in (("node", 0), ("node_no_cert", 1)):
        result = subprocess.run(
            [script, "--config", str(config), "echo", name],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == code, output(result)
    assert_serving(node.port, tls=with_cert)
