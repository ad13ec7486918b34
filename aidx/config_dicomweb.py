"""The ``dicomweb`` section: the node's DICOMweb service (PS3.18 STOW-RS, QIDO-RS, WADO-RS);
and the DICOMweb destinations (``destinations.NAME.dicomweb``), to which the outbox sends by
STOW-RS.

Systems (a PACS, an archive, a viewer's back end) authenticate with a bearer token each, as
DIMSE peers are allowed by AE title: the configuration keeps only the token's SHA-256 (``aidx
dicomweb token NAME`` makes a token and prints the lines to add), so a copy of the
configuration lets nobody in.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from aidx.config_base import StrictModel, https_refusal

# A peer's name is recorded as the calling AE title of what it stores (16 characters).
PEER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$"
URL_PATTERN = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"


class DicomwebPeerConfig(StrictModel):
    """A system allowed to use the DICOMweb service, and what it may do."""

    name: str = Field(pattern=PEER_NAME_PATTERN)
    # Hex SHA-256 of the peer's bearer token (64 characters; `aidx dicomweb token NAME`).
    token_sha256: str
    store: bool = True  # STOW-RS
    read: bool = True  # QIDO-RS and WADO-RS
    # The study quiet period of what this peer stores (null: node.study_quiet_period_s).
    quiet_period_s: float | None = Field(default=None, gt=0, le=86400)

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(
                "not a hex SHA-256 (64 characters 0-9a-f): put the token's hash here, never the "
                "token; `aidx dicomweb token NAME` makes a token and prints its hash"
            )
        return value


class DicomwebConfig(StrictModel):
    """The DICOMweb service, run by the node beside its DIMSE listener (port 0: off)."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    # HTTPS: required when host is not a loopback address.
    certificate: Path | None = None
    private_key: Path | None = None
    # The largest STOW-RS request body accepted (413 beyond it); each part is also held to
    # node.max_dataset_mb.
    max_request_mb: int = Field(default=1024, ge=1, le=65536)
    # The service's address as clients reach it, for the URLs it returns (behind a proxy:
    # https://pacs-gw.hospital.example/dicomweb); null: as the request addressed it.
    public_url: str | None = Field(default=None, pattern=URL_PATTERN)
    peers: list[DicomwebPeerConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> DicomwebConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both dicomweb.certificate and dicomweb.private_key, or neither")
        names = [p.name for p in self.peers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"dicomweb.peers: the name {twice[0]!r} is given twice")
        hashes = [p.token_sha256 for p in self.peers]
        if len(set(hashes)) != len(hashes):
            raise ValueError(
                "dicomweb.peers: two peers have the same token_sha256; give each its own token"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.port != 0

    @property
    def https(self) -> bool:
        return self.certificate is not None

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mb * 1024 * 1024

    def refusal(self) -> str | None:
        """Why the service must not start as configured, or None."""
        if not self.peers:
            return (
                "dicomweb.port is set but dicomweb.peers is empty, so no system could sign in: "
                "add a peer (`aidx dicomweb token NAME` prints its lines), or set dicomweb.port "
                "to 0"
            )
        return https_refusal(
            "dicomweb",
            "DICOMweb service serves patient images",
            self.host,
            self.certificate,
            self.private_key,
        )


class DicomwebAuthConfig(StrictModel):
    """How aidx signs in to a DICOMweb destination: a bearer token, or a user name and password
    (HTTP Basic); neither: no Authorization header."""

    bearer_token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _one_way(self) -> DicomwebAuthConfig:
        if self.bearer_token is not None and (self.username or self.password):
            raise ValueError("give bearer_token, or username and password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password (HTTP Basic), or neither")
        return self


class DicomwebDestinationConfig(StrictModel):
    """A destination that takes results by STOW-RS (PS3.18 10.5): ``dicomweb`` is its DICOMweb
    root, e.g. https://pacs.hospital.example/dicom-web (aidx posts to <root>/studies)."""

    dicomweb: str
    auth: DicomwebAuthConfig = Field(default_factory=DicomwebAuthConfig)
    # CA certificates (PEM) that sign the destination's HTTPS certificate; null: the system's.
    ca_certificates: Path | None = None
    timeout_s: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("dicomweb")
    @classmethod
    def _root_url(cls, value: str) -> str:
        if not re.fullmatch(URL_PATTERN, value):
            raise ValueError(
                f"{value!r} is not a DICOMweb root URL: write http(s)://host[:port]/path, e.g. "
                "https://pacs.hospital.example/dicom-web"
            )
        return value

    @property
    def studies_url(self) -> str:
        return self.dicomweb.rstrip("/") + "/studies"
