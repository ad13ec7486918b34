"""DICOM TLS (PS3.15 B.1, the BCP 195 profile): SSL contexts for the node and for exports.

A private key that other users can read is refused (``aidx.permissions.private_key_problem``):
ValueError naming the file, its mode and the fix, before the key is loaded.
"""

from __future__ import annotations

import ssl

from aidx.config import TlsConfig
from aidx.permissions import check_private_key


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The node's context: its certificate, and client certificates verified if required."""
    assert tls.certificate is not None and tls.private_key is not None  # checked by the config
    check_private_key(tls.private_key, "node.tls.private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def client_context(tls: TlsConfig, server_hostname_check: bool = False) -> ssl.SSLContext:
    """A context for sending to a destination: its CA verified, our certificate if set.

    DICOM peers are usually addressed by IP and their certificates name the AE, not the host, so
    the host name is not checked unless asked; the chain always is.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(tls.ca_certificates) if tls.ca_certificates else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = server_hostname_check
    if tls.certificate is not None and tls.private_key is not None:
        check_private_key(tls.private_key, "tls.private_key")
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context
