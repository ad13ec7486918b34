"""DICOM TLS (PS3.15 B.1) of the storage SCP with a throwaway CA, with real associations.

A TLS node serves TLS peers only, with and without client certificates, checked from pynetdicom,
from aidx's own client (and its command line) and from DCMTK; a silent client does not block it;
and every test ends with a normal C-ECHO over TLS to show that the node still serves. The
certificates are made here with `cryptography`.
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

from aidx.config import DestinationConfig, TlsConfig
from dicom_node.client import echo
from dicom_node.service import NodeService
from tests.conftest import require_tool
from tests.dicom_node.conftest import NodeFactory
from tests.dicom_node.scu import (
    NODE_AE,
    TIMEOUT_S,
    assert_serving,
    associate,
    echo_status,
    one_file,
    output,
    storage_context,
)
from tests.peers import (
    DCMTK_PACKAGE,
    ECHOSCU,
    LOOPBACK,
    echoscu,
    peer_env,
)


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
    """The key as a PEM file that only its owner reads: aidx refuses any other key."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
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
