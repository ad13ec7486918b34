"""Who may use the DICOMweb service: peer systems by bearer token (``dicomweb.peers``), people by
the review app's session.

A system names itself with ``Authorization: Bearer <token>``; the token's SHA-256 is compared
with each configured peer's, in constant time. A person signed in to the review app reads with
the same session (its cookie, which a browser sends to every port of the host): radiologists and
engineers may search and retrieve; nobody stores as a person. The session is checked by the
caller's ``sessions`` (the review app's accounts, wired by ``aidx serve``: a revoked, idle or
expired session, or a disabled user, is refused as in the review app). No credentials or unknown
ones: 401; a peer or person without the right: 403.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.requests import Request

from aidx.config_dicomweb import DicomwebPeerConfig

log = logging.getLogger("aidx.dicomweb")

# The review app's session cookie (ui.web.COOKIE; tests/dicom_node keep the two equal).
SESSION_COOKIE = "aidx_session"
# The roles of people who may search and retrieve (ui.accounts.ROLES: not admin).
READER_ROLES = ("radiologist", "engineer")


@dataclass(frozen=True)
class Person:
    """A person signed in to the review app, reading through DICOMweb with that session."""

    username: str
    role: str


# (session token, client address) -> the session's person, or None when it is not live.
SessionCheck = Callable[[str, str], Person | None]


class RefusalError(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Access:
    """The peers' token digests and the session check; :meth:`check` for each request."""

    def __init__(
        self, peers: Sequence[DicomwebPeerConfig], sessions: SessionCheck | None = None
    ) -> None:
        self._peers = [(bytes.fromhex(p.token_sha256), p) for p in peers]
        self.sessions = sessions

    def check(self, request: Request, right: str) -> DicomwebPeerConfig | Person:
        """The peer or person sending ``request``, if it holds ``right`` (``read`` or
        ``store``); else RefusalError (401, 403)."""
        reader = self.reader(request)
        if isinstance(reader, Person):
            _person_may(reader, right)
            log.info(
                "DICOMweb %s by user %s (%s): %s",
                verb(right),
                reader.username,
                reader.role,
                request.url.path,  # UIDs only; the query string is never logged
            )
        elif not getattr(reader, right):
            raise RefusalError(403, f"peer {reader.name} may not {verb(right)} (dicomweb.peers)")
        return reader

    def reader(self, request: Request) -> DicomwebPeerConfig | Person:
        """Who sends the request: a peer system (its bearer token) or a person (the review
        app's session cookie); RefusalError (401) when neither is live."""
        if "authorization" in request.headers or self.sessions is None:
            return self.peer(request)
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            raise RefusalError(
                401,
                "send Authorization: Bearer <token> (dicomweb.peers), or sign in to the review "
                "app first (its session reads here too)",
                _CHALLENGE,
            )
        person = self.sessions(token, client_address(request))
        if person is None:
            raise RefusalError(401, "the review app's session has ended: sign in again", _CHALLENGE)
        return person

    def peer(self, request: Request) -> DicomwebPeerConfig:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = _CHALLENGE
        if scheme.lower() != "bearer" or not token.strip():
            raise RefusalError(
                401, "send Authorization: Bearer <token> (dicomweb.peers)", challenge
            )
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        found = None
        for known, peer in self._peers:  # every comparison made: no timing hint
            if hmac.compare_digest(known, digest):
                found = peer
        if found is None:
            log.warning(
                "DICOMweb request with an unknown token refused (%s)", client_address(request)
            )
            raise RefusalError(401, "the bearer token is not one of dicomweb.peers", challenge)
        return found


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown client"


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aidx dicomweb"'}


def _person_may(person: Person, right: str) -> None:
    """People search and retrieve (radiologists, engineers); systems store."""
    if right != "read":
        raise RefusalError(
            403,
            f"user {person.username} may not {verb(right)}: people search and retrieve; "
            "systems store with a token of dicomweb.peers",
        )
    if person.role not in READER_ROLES:
        raise RefusalError(
            403,
            f"user {person.username} is {person.role}: {verb(right)} needs the role "
            f"{' or '.join(READER_ROLES)}",
        )


def verb(right: str) -> str:
    return "store (STOW-RS)" if right == "store" else "search or retrieve (QIDO-RS, WADO-RS)"
