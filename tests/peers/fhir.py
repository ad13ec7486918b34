"""A small FHIR R4 server for the tests: the EMR's endpoint aidx sends DiagnosticReports to.

No real FHIR server installs here in seconds (HAPI and Blaze are Java, fetched as jars or
images; Medplum needs PostgreSQL and Redis; the PyPI ones are toys that neither validate nor
search by identifier), so this peer implements what aidx relies on, as R4's RESTful API says:

- conditional update, ``PUT [base]/[type]?identifier=system|value`` (3.1.0.4.3): no match,
  the resource is created (201, new id, version 1); one match, it is updated (200, same id,
  next version); several, 412;
- read ``GET [base]/[type]/[id]``, search ``GET [base]/[type]?identifier=system|value``
  (a searchset Bundle) and history ``GET [base]/[type]/[id]/_history``;
- every body is validated with fhir.resources (its R4B models: the same elements as R4 for the
  resources aidx sends) and the R4 status value sets (required bindings fhir.resources does not
  check); an invalid one is refused with 400 and an OperationOutcome saying why;
- with a ``token``, requests without ``Authorization: Bearer <token>`` get 401 and an
  OperationOutcome.

It runs in the test's process (uvicorn in a thread, a free loopback port), one per test module.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn
from fhir.resources.R4B import get_fhir_model_class
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aidx.background import serve_uvicorn
from inference.fhir_report import OBSERVATION_STATUSES, REPORT_STATUSES

from .process import LOOPBACK, poll_until

FHIR_JSON = "application/fhir+json"
# R4's required status value sets (which fhir.resources does not check): the same fact the
# report builder checks against, kept in one place.
STATUSES = {"DiagnosticReport": REPORT_STATUSES, "Observation": OBSERVATION_STATUSES}


@dataclass
class Stored:
    id: str
    versions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current(self) -> dict[str, Any]:
        return self.versions[-1]


class FhirPeer:
    """The server; ``url`` is its base. ``requests`` logs (method, path and query, status)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.resources: dict[str, dict[str, Stored]] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -------------------------------------------------------------------------- life cycle
    def __enter__(self) -> Self:
        base = "/fhir-r4"  # a base with a path, as real servers have
        app = Starlette(
            routes=[
                Route(base + "/{kind}", self._conditional_update, methods=["PUT"]),
                Route(base + "/{kind}", self._search, methods=["GET"]),
                Route(base + "/{kind}/{id}", self._read, methods=["GET"]),
                Route(base + "/{kind}/{id}/_history", self._history, methods=["GET"]),
            ]
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{sock.getsockname()[1]}{base}"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._server = server
        self._thread = serve_uvicorn(server, sock, "fhir-peer")
        poll_until(lambda: bool(server.started), 10.0, "the FHIR test peer")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    # --------------------------------------------------------------------------- queries
    def find(self, kind: str, system: str, value: str) -> list[Stored]:
        with self._lock:
            return [
                s
                for s in self.resources.get(kind, {}).values()
                if any(
                    i.get("system") == system and i.get("value") == value
                    for i in s.current.get("identifier", [])
                )
            ]

    # ---------------------------------------------------------------------------- routes
    def _refused(self, request: Request) -> Response | None:
        if self.token is None:
            return None
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _outcome(401, "security", "no valid bearer token given")
        return None

    def _logged(self, request: Request, response: Response) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        with self._lock:
            self.requests.append((request.method, path, response.status_code))
        return response

    async def _conditional_update(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return self._logged(request, refused)
        kind = request.path_params["kind"]
        criteria = request.query_params.get("identifier", "")
        if "|" not in criteria:
            answer = _outcome(400, "not-supported", "conditional update needs identifier=s|v")
            return self._logged(request, answer)
        if request.headers.get("content-type", "").split(";")[0] != FHIR_JSON:
            answer = _outcome(415, "not-supported", f"send {FHIR_JSON}")
            return self._logged(request, answer)
        try:
            body = json.loads(await request.body())
            problem = validation_problem(kind, body)
        except ValueError as exc:
            problem = f"not JSON: {exc}"
        if problem is not None:
            return self._logged(request, _outcome(400, "invalid", problem))
        system, value = criteria.split("|", 1)
        matches = self.find(kind, system, value)
        if len(matches) > 1:
            answer = _outcome(412, "multiple-matches", f"{len(matches)} {kind} match {criteria}")
            return self._logged(request, answer)
        with self._lock:
            stored = matches[0] if matches else Stored(uuid.uuid4().hex)
            if "id" in body and body["id"] != stored.id:
                answer = _outcome(400, "invalid", "the body's id is not the matching resource's")
                return self._logged(request, answer)
            version = len(stored.versions) + 1
            body = {**body, "id": stored.id, "meta": {"versionId": str(version)}}
            stored.versions.append(body)
            self.resources.setdefault(kind, {})[stored.id] = stored
        status = 200 if matches else 201
        headers = {"Location": f"{self.url}/{kind}/{stored.id}/_history/{version}"}
        return self._logged(request, _json(body, status, headers))

    async def _search(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return self._logged(request, refused)
        kind = request.path_params["kind"]
        system, _, value = request.query_params.get("identifier", "").partition("|")
        found = self.find(kind, system, value)
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [{"resource": s.current} for s in found],
        }
        return self._logged(request, _json(bundle))

    async def _read(self, request: Request) -> Response:
        stored = self.resources.get(request.path_params["kind"], {}).get(request.path_params["id"])
        if stored is None:
            return self._logged(request, _outcome(404, "not-found", "no such resource"))
        return self._logged(request, _json(stored.current))

    async def _history(self, request: Request) -> Response:
        stored = self.resources.get(request.path_params["kind"], {}).get(request.path_params["id"])
        if stored is None:
            return self._logged(request, _outcome(404, "not-found", "no such resource"))
        bundle = {
            "resourceType": "Bundle",
            "type": "history",
            "total": len(stored.versions),
            "entry": [{"resource": v} for v in reversed(stored.versions)],
        }
        return self._logged(request, _json(bundle))


def validation_problem(kind: str, body: Any) -> str | None:
    """Why ``body`` is not a valid R4 ``kind``, or None."""
    if not isinstance(body, dict) or body.get("resourceType") != kind:
        return f"the body is not a {kind}"
    try:
        get_fhir_model_class(kind).model_validate(body)
    except (ValueError, KeyError) as exc:
        return f"invalid {kind}: {exc}"
    for item in [body, *body.get("contained", [])]:
        allowed = STATUSES.get(str(item.get("resourceType")))
        if allowed is not None and item.get("status") not in allowed:
            return f"{item['resourceType']}.status {item.get('status')!r} is not an R4 status"
    return None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status, headers=headers, media_type=FHIR_JSON)


def _outcome(status: int, code: str, text: str) -> Response:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "details": {"text": text}}],
    }
    return _json(outcome, status)
