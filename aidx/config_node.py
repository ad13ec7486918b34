"""The node's DIMSE side (``node``: listener, limits, allowed peers, TLS) and where results go
(``destinations``: an AE by C-STORE or a DICOMweb root by STOW-RS; ``outbox``: retries)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from aidx.config_base import StrictModel
from aidx.config_dicomweb import DicomwebDestinationConfig

AE_TITLE_PATTERN = r"^[ -\[\]-~]{1,16}$"  # 16 printable ASCII characters, no backslash


class TlsConfig(StrictModel):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _files_together(self) -> TlsConfig:
        # A client (a destination) needs no certificate of its own unless its peer asks for one;
        # the node, a TLS server, always does (NodeConfig checks that).
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both certificate and private_key, or neither")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate needs ca_certificates (the CA that signs clients)"
            )
        return self


class PeerConfig(StrictModel):
    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    hosts: list[str] = Field(default_factory=list)
    echo: bool = True
    store: bool = True
    quiet_period_s: float | None = Field(default=None, gt=0, le=86400)


class NodeConfig(StrictModel):
    ae_title: str = Field(default="AIDX", pattern=AE_TITLE_PATTERN)
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    # The Maximum Length negotiated (PS3.8 D.1); 0: unlimited (the largest data set).
    max_pdu: int = Field(default=1024 * 1024, ge=0)
    max_associations: int = Field(default=16, ge=1, le=1000)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # The whole A-ASSOCIATE-RQ (and TLS handshake) must arrive within this many seconds.
    association_request_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Connections of one peer address, pending or associated; no address can take every slot.
    max_connections_per_address: int = Field(default=8, ge=1, le=1000)
    # Connections whose association request has not arrived yet: per address, and in all.
    max_pending_per_address: int = Field(default=4, ge=1, le=1000)
    max_pending_connections: int = Field(default=32, ge=1, le=10000)
    # The largest data set accepted, as received and as inflated (Deflated transfer syntax).
    max_dataset_mb: int = Field(default=512, ge=1, le=65536)
    # Sequences nested deeper than this are refused (0xC000).
    max_sequence_depth: int = Field(default=32, ge=1, le=256)
    study_quiet_period_s: float = Field(default=30.0, gt=0, le=86400)
    min_free_disk_mb: int = Field(default=1024, ge=0)
    accept_any_calling_ae: bool = False
    allowed_peers: list[PeerConfig] = Field(default_factory=list)
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @property
    def max_dataset_bytes(self) -> int:
        return self.max_dataset_mb * 1024 * 1024

    @model_validator(mode="after")
    def _tls_server_files(self) -> NodeConfig:
        if self.tls.enabled and self.tls.certificate is None:
            raise ValueError("tls.enabled is true: set tls.certificate and tls.private_key")
        return self


class DestinationConfig(StrictModel):
    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(default=None, pattern=AE_TITLE_PATTERN)
    tls: TlsConfig = Field(default_factory=TlsConfig)


def _destination_kind(value: Any) -> str:
    """Which form a destination takes: DICOMweb when it has a ``dicomweb`` URL, else DIMSE."""
    if isinstance(value, Mapping):
        return "stow-rs" if "dicomweb" in value else "c-store"
    return "stow-rs" if isinstance(value, DicomwebDestinationConfig) else "c-store"


_DESTINATION_FORMS: dict[str, type[StrictModel]] = {
    "c-store": DestinationConfig,
    "stow-rs": DicomwebDestinationConfig,
}
# A destination: an AE (C-STORE) or a DICOMweb root (STOW-RS).
Destination = Annotated[
    Annotated[DestinationConfig, Tag("c-store")]
    | Annotated[DicomwebDestinationConfig, Tag("stow-rs")],
    Discriminator(_destination_kind),
]


class OutboxConfig(StrictModel):
    max_attempts: int = Field(default=12, ge=1)
    initial_backoff_s: float = Field(default=5.0, gt=0)
    max_backoff_s: float = Field(default=900.0, gt=0)
    poll_interval_s: float = Field(default=2.0, gt=0)
    # Niceness of the outbox process under `aidx serve` (0-19).
    nice: int = Field(default=5, ge=0, le=19)
