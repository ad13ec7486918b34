"""SCU helpers shared by the access-control and TLS tests of the storage SCP: pynetdicom
associations to the node on loopback, C-ECHO status, and the files of a study to send."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.client import VERIFICATION
from tests.peers import LOOPBACK

NODE_AE = "AIDX"
TIMEOUT_S = 10  # every association of these tests answers within milliseconds


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


def assert_serving(port: int, tls: ssl.SSLContext | None = None) -> None:
    """The node still accepts a well-formed association and answers C-ECHO with success."""
    assert echo_status(associate(port, calling_ae="AFTERWARDS", tls=tls)) == 0x0000


def one_file(study: Path) -> tuple[Path, pydicom.Dataset]:
    path = sorted(study.glob("*.dcm"))[0]
    return path, pydicom.dcmread(path, stop_before_pixels=True)


def storage_context(ds: pydicom.Dataset) -> tuple[str, str]:
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr
