"""DICOM TLS (PS3.15 B.1, the BCP 195 profile): SSL contexts for the node and for exports."""

from __future__ import annotations

import ssl

from aidx.config import TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The node's context: its certificate, and client certificates verified if required."""
    assert tls.certificate is not None and tls.private_key is not None  # checked by the config
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
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context
