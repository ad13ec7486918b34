"""What the configuration's sections share: the strict model every section is, and the rule
that an HTTP service beyond this machine needs HTTPS (the review app's ``ui`` section and the
DICOMweb service's ``dicomweb`` section apply it alike)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aidx.permissions import private_key_problem

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, and values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def https_refusal(
    section: str, what: str, host: str, certificate: Path | None, private_key: Path | None
) -> str | None:
    """Why the HTTP service of config ``section`` (``what`` it serves, for the message) must
    not start on ``host`` with these files, or None: beyond loopback it needs a certificate,
    and the files must be readable, the key by aidx's user only."""
    if host not in LOOPBACK_HOSTS and certificate is None:
        return (
            f"{section}.host is {host!r}, beyond this machine: the {what} and needs HTTPS "
            f"there. Set {section}.certificate and {section}.private_key (PEM files), or keep "
            f"{section}.host at 127.0.0.1 behind your own TLS proxy"
        )
    for name, path in (("certificate", certificate), ("private_key", private_key)):
        if path is not None and not Path(path).is_file():
            return f"{section}.{name}: {path} is not a readable file"
    if private_key is not None:
        problem = private_key_problem(private_key)
        if problem is not None:
            return f"{section}.private_key: {problem}"
    return None
