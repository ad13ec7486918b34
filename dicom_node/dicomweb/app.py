"""The DICOMweb service's HTTP side: routes under ``/dicomweb``, bearer-token access per
peer system, and the uvicorn server the node runs beside its DIMSE listener.

Who may do what (peer systems by bearer token, people by the review app's session) is
decided in :mod:`dicom_node.dicomweb.access`. Refusals are one line of text saying why; the log
names the peer or user and UIDs only (a query string may hold patient data: it is never logged).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from aidx.background import serve_uvicorn
from aidx.config import AidxConfig
from aidx.config_dicomweb import DicomwebPeerConfig
from aidx.store.store import Store
from dicom_node.receive import Receiver

from . import qido, stow, wado
from .access import Access, RefusalError, SessionCheck
from .catalog import Catalog, Entry
from .multipart import (
    MediaType,
    MultipartError,
    Part,
    PartReader,
    multipart_stream,
    new_boundary,
    split_accept,
)

log = logging.getLogger("aidx.dicomweb")

DICOM_JSON = "application/dicom+json"
STORE_QUEUE = 4  # complete STOW-RS parts waiting to be stored
PREFIX = "/dicomweb"

Handler = Callable[[Request], Awaitable[Response]]


class DicomwebApp:
    """The routes and what they need: the peers, the receive path and the catalogue."""

    def __init__(
        self,
        config: AidxConfig,
        receiver: Receiver,
        store: Store,
        sessions: SessionCheck | None = None,
    ) -> None:
        self.config = config
        self.web = config.dicomweb
        self.access = Access(self.web.peers, sessions)
        self.receiver = receiver
        self.catalog = Catalog(store)
        routes = [
            Route("/studies", self._guard(self.stow, "store"), methods=["POST"]),
            Route("/studies/{study}", self._guard(self.stow, "store"), methods=["POST"]),
            Route("/studies", self._guard(self.search_studies)),
            Route("/series", self._guard(self.search_series)),
            Route("/instances", self._guard(self.search_instances)),
            Route("/studies/{study}/series", self._guard(self.search_series)),
            Route("/studies/{study}/instances", self._guard(self.search_instances)),
            Route("/studies/{study}/series/{series}/instances", self._guard(self.search_instances)),
            Route("/studies/{study}", self._guard(self.retrieve)),
            Route("/studies/{study}/metadata", self._guard(self.retrieve_metadata)),
            Route("/studies/{study}/series/{series}", self._guard(self.retrieve)),
            Route("/studies/{study}/series/{series}/metadata", self._guard(self.retrieve_metadata)),
            Route("/studies/{study}/series/{series}/instances/{sop}", self._guard(self.retrieve)),
            Route(
                "/studies/{study}/series/{series}/instances/{sop}/metadata",
                self._guard(self.retrieve_metadata),
            ),
            Route(
                "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
                self._guard(self.retrieve_frames),
            ),
        ]
        inner = Starlette(routes=routes)
        self.app = Starlette()
        self.app.mount(PREFIX, inner)

    def _guard(self, handler: Handler, right: str = "read") -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                request.state.peer = self.access.check(request, right)
                return await handler(request)
            except RefusalError as refusal:
                return PlainTextResponse(
                    str(refusal) + "\n", refusal.status, headers=refusal.headers
                )
            except Exception:
                log.exception("DICOMweb %s %s failed", request.method, request.url.path)
                return PlainTextResponse("internal error; see the node's log\n", 500)

        return guarded

    def base_url(self, request: Request) -> str:
        """The service's address in the URLs it returns (RetrieveURL): dicomweb.public_url,
        else as the client addressed it, with this server's port when its Host header has
        none (dicomweb-client sends the host alone)."""
        if self.web.public_url:
            return self.web.public_url.rstrip("/")
        host = request.headers.get("host", "") or request.url.netloc
        if not re.search(r":[0-9]+$", host):
            host = f"{host}:{request.scope['server'][1]}"
        return f"{request.url.scheme}://{host}{PREFIX}"

    # ------------------------------------------------------------------------------- STOW-RS
    async def stow(self, request: Request) -> Response:
        peer: DicomwebPeerConfig = request.state.peer
        study_uid = request.path_params.get("study")
        media = MediaType.parse(request.headers.get("content-type", ""))
        part_type = media.params.get("type", "").lower()
        if media.type != "multipart/related" or part_type != stow.DICOM:
            raise RefusalError(
                415,
                'STOW-RS takes Content-Type: multipart/related; type="application/dicom" '
                f"(got {media.type or 'none'}"
                + (f'; type="{part_type}"' if part_type else "")
                + ")",
            )
        started = time.monotonic()
        try:
            reader = PartReader(media.params.get("boundary", ""))
        except MultipartError as exc:
            raise RefusalError(400, f"the multipart body cannot be read: {exc}") from exc
        quiet = peer.quiet_period_s or self.config.node.study_quiet_period_s
        outcomes: list[stow.PartOutcome] = []
        # Each complete part is stored (in a thread) while the next ones arrive; a few waiting
        # parts at most, so a fast sender waits for the disk instead of filling the memory.
        waiting: asyncio.Queue[Part | None] = asyncio.Queue(maxsize=STORE_QUEUE)

        async def store_parts() -> None:
            while (part := await waiting.get()) is not None:
                outcome = await run_in_threadpool(
                    stow.store_part, self.receiver, part, peer.name, quiet, study_uid
                )
                outcomes.append(outcome)

        storing = asyncio.create_task(store_parts())
        try:
            size = await self._read_parts(request, reader, waiting)
        except RefusalError as refusal:
            # Parts received whole are stored even when the body then fails: nothing that
            # arrived complete is lost (a client that sends again makes duplicates, kept once).
            await waiting.put(None)
            await storing
            if not outcomes:
                raise
            stored = sum(o.failure is None for o in outcomes)
            raise RefusalError(
                refusal.status,
                f"{refusal}; of the {len(outcomes)} complete parts before that, {stored} were "
                "stored",
            ) from refusal
        except BaseException:
            storing.cancel()  # the request itself was cancelled
            raise
        await waiting.put(None)
        await storing
        stored = sum(o.failure is None for o in outcomes)
        log.info(
            "STOW-RS from %s: %d stored, %d failed in %.2f s (%.0f MB)",
            peer.name,
            stored,
            len(outcomes) - stored,
            time.monotonic() - started,
            size / 1e6,
        )
        answer = stow.response_dataset(outcomes, self.base_url(request), study_uid)
        status = 200 if stored == len(outcomes) else 202 if stored else 409
        response = _json(answer.to_json_dict(), status)
        for index, outcome in enumerate(outcomes):
            if outcome.failure is not None:
                response.headers.append("Warning", stow.warning_header(outcome, index))
        return response

    async def _read_parts(
        self, request: Request, reader: PartReader, waiting: asyncio.Queue[Part | None]
    ) -> int:
        """Read the body, handing each complete part to ``waiting``; returns its size. Raises
        RefusalError for a body over the limit (413) or not the multipart message announced."""
        limit = self.web.max_request_bytes
        too_large = RefusalError(
            413,
            f"the request is larger than dicomweb.max_request_mb ({self.web.max_request_mb} "
            "MiB); send the study in several requests",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large  # before anything is read or stored
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                for part in reader.feed(chunk):
                    await waiting.put(part)
            reader.close()
        except ClientDisconnect as exc:
            raise RefusalError(
                400, "the client closed the connection before the body ended"
            ) from exc
        except MultipartError as exc:
            raise RefusalError(400, f"the multipart body cannot be read: {exc}") from exc
        return size

    # ------------------------------------------------------------------------------- QIDO-RS
    async def search_studies(self, request: Request) -> Response:
        return await self._search(request, "study")

    async def search_series(self, request: Request) -> Response:
        return await self._search(request, "series")

    async def search_instances(self, request: Request) -> Response:
        return await self._search(request, "instance")

    async def _search(self, request: Request, level: str) -> Response:
        _accept_json(request)
        study_uid = request.path_params.get("study")
        series_uid = request.path_params.get("series")
        keys = {
            "study": qido.STUDY_KEYS,
            "series": qido.SERIES_KEYS + (() if study_uid else qido.STUDY_KEYS),
            "instance": qido.INSTANCE_KEYS
            + (() if series_uid else qido.SERIES_KEYS)
            + (() if study_uid else qido.STUDY_KEYS),
        }[level]
        try:
            query = qido.Query.parse(list(request.query_params.multi_items()), keys)
        except qido.QueryError as exc:
            raise RefusalError(400, str(exc)) from exc
        if study_uid is not None and not await run_in_threadpool(
            self.catalog.study_exists, study_uid
        ):
            raise RefusalError(404, f"no study {study_uid}")
        base = self.base_url(request)

        def run() -> tuple[list[dict[str, Any]], bool]:
            if level == "study" and not set(query.filters) & qido.FROM_SERIES:
                # Paged on the index rows: only the answers' series are read.
                rows, capped = qido.page(self._study_rows(study_uid, query), query)
                page = [self._study_match(row, base) for row in rows]
            else:
                candidates = self._candidates(level, base, study_uid, series_uid, query)
                page, capped = qido.select_page(candidates, query)
            level_keys = {
                "study": qido.STUDY_KEYS,
                "series": qido.SERIES_KEYS,
                "instance": qido.INSTANCE_KEYS,
            }[level]
            return [qido.to_json(m, level_keys, query) for m in page], capped

        answers, capped = await run_in_threadpool(run)
        response = _json(answers, 200)
        if query.ignored:
            names = ", ".join(sorted(set(query.ignored)))
            response.headers.append(
                "Warning", f'299 aidx "The following attributes are not supported: {names}"'
            )
        if capped:
            response.headers.append(
                "Warning",
                f'299 aidx "The number of results exceeded the maximum of {qido.MAX_RESULTS}; '
                'use limit and offset"',
            )
        return response

    def _candidates(
        self,
        level: str,
        base: str,
        study_uid: str | None,
        series_uid: str | None,
        query: qido.Query,
    ) -> list[qido.Match]:
        out: list[qido.Match] = []
        for row in self._study_rows(study_uid, query):
            uid = str(row["study_uid"])
            series_list = self.catalog.series(uid)
            study_attrs = qido.study_attributes(row, series_list)
            study_url = f"{base}/studies/{uid}"
            if level == "study":
                out.append(qido.Match(study_attrs, study_url, _first_path(self.catalog, uid)))
                continue
            if level == "series":
                for summary in series_list:
                    attrs = {**study_attrs, **qido.series_attributes(summary)}
                    out.append(
                        qido.Match(
                            attrs,
                            f"{study_url}/series/{summary.series_uid}",
                            _first_path(self.catalog, uid, summary.series_uid),
                        )
                    )
                continue
            summaries = {s.series_uid: s for s in series_list}
            for entry in self.catalog.instances(uid, series_uid):
                attrs = {
                    **study_attrs,
                    **qido.series_attributes(summaries[entry.series_uid]),
                    **qido.instance_attributes(entry),
                }
                url = f"{study_url}/series/{entry.series_uid}/instances/{entry.sop_uid}"
                out.append(qido.Match(attrs, url, _path_of(entry)))
        return out

    def _study_rows(self, study_uid: str | None, query: qido.Query) -> list[dict[str, Any]]:
        """The index rows of the studies that can match (the path's study, the UIDs asked
        for, and the filters the row answers)."""
        wanted = [study_uid] if study_uid else _uid_list(query.filters)
        return [
            row
            for row in self.catalog.studies(wanted)
            if qido.row_matches(qido.study_attributes(row, None), query)
        ]

    def _study_match(self, row: dict[str, Any], base: str) -> qido.Match:
        uid = str(row["study_uid"])
        attributes = qido.study_attributes(row, self.catalog.series(uid))
        return qido.Match(attributes, f"{base}/studies/{uid}", _first_path(self.catalog, uid))

    # ------------------------------------------------------------------------------- WADO-RS
    def _entries(self, request: Request) -> list[Entry]:
        study_uid = request.path_params["study"]
        series_uid = request.path_params.get("series")
        sop_uid = request.path_params.get("sop")
        if not self.catalog.study_exists(study_uid):
            raise RefusalError(404, f"no study {study_uid}")
        entries = self.catalog.instances(study_uid, series_uid)
        if sop_uid is not None:
            entries = [e for e in entries if e.sop_uid == sop_uid]
        if not entries:
            what = f"instance {sop_uid}" if sop_uid else f"series {series_uid}"
            raise RefusalError(404, f"no {what} in study {study_uid}")
        return entries

    async def retrieve(self, request: Request) -> Response:
        entries = await run_in_threadpool(self._entries, request)
        try:
            wado.check_accept(split_accept(request.headers.get("accept", "")), entries)
        except wado.NotAcceptableError as exc:
            raise RefusalError(406, str(exc)) from exc
        boundary = new_boundary()

        def body() -> Iterator[bytes]:
            yield from multipart_stream(
                (
                    (f"{wado.DICOM}; transfer-syntax={e.transfer_syntax}", wado.file_chunks(e.path))
                    for e in entries
                ),
                boundary,
            )

        return StreamingResponse(
            body(),
            media_type=f'multipart/related; type="{wado.DICOM}"; boundary={boundary}',
        )

    async def retrieve_metadata(self, request: Request) -> Response:
        _accept_json(request)

        def run() -> list[dict[str, Any]]:
            return [wado.metadata(e) for e in self._entries(request)]

        return _json(await run_in_threadpool(run), 200)

    async def retrieve_frames(self, request: Request) -> Response:
        try:
            numbers = [int(n) for n in request.path_params["frames"].split(",")]
        except ValueError as exc:
            raise RefusalError(400, "frames are numbers from 1, separated by commas") from exc

        def run() -> list[wado.Frame]:
            (entry,) = self._entries(request)
            return wado.frames(entry, numbers)

        try:
            found = await run_in_threadpool(run)
        except wado.FrameError as exc:
            raise RefusalError(exc.status, str(exc)) from exc
        boundary = new_boundary()
        part_type = found[0].content_type.split(";")[0]
        body = b"".join(multipart_stream(((f.content_type, [f.data]) for f in found), boundary))
        return Response(
            body, media_type=f'multipart/related; type="{part_type}"; boundary={boundary}'
        )


def _first_path(catalog: Catalog, study_uid: str, series_uid: str | None = None) -> Any:
    def find() -> str | None:
        entries = catalog.instances(study_uid, series_uid)
        return entries[0].path if entries else None

    return find


def _path_of(entry: Entry) -> Callable[[], str | None]:
    return lambda: entry.path


def _uid_list(filters: dict[str, str]) -> list[str] | None:
    value = filters.get("StudyInstanceUID")
    if not value:
        return None
    return [u.strip() for u in value.replace("\\", ",").split(",") if u.strip()]


def _accept_json(request: Request) -> None:
    accept = split_accept(request.headers.get("accept", ""))
    ok = ("application/dicom+json", "application/json", "*/*", "application/*")
    if accept and not any(m.type in ok for m in accept):
        raise RefusalError(406, "aidx answers in application/dicom+json (DICOM JSON) only")


def _json(content: Any, status: int) -> Response:
    # Exactly "application/dicom+json" (no charset parameter): clients compare it whole.
    return JSONResponse(content, status, media_type=DICOM_JSON)


class DicomwebServer:
    """uvicorn serving :class:`DicomwebApp` on ``dicomweb.host:port`` (HTTPS with a
    certificate), in a thread of the node's process."""

    def __init__(
        self,
        config: AidxConfig,
        receiver: Receiver,
        store: Store,
        sessions: SessionCheck | None = None,
    ) -> None:
        web = config.dicomweb
        refusal = web.refusal()
        if refusal:
            raise ValueError(refusal)
        self.config = config
        self.dicomweb = DicomwebApp(config, receiver, store, sessions)
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((web.host, web.port))
        except OSError as exc:
            self._socket.close()
            raise OSError(
                f"dicomweb: cannot listen on {web.host}:{web.port}: {exc.strerror or exc}; set "
                "dicomweb.port to a free port, or to 0 to turn the service off"
            ) from exc
        self.port = int(self._socket.getsockname()[1])
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """The server thread is serving (for the node's health check)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        web = self.config.dicomweb
        host = f"[{web.host}]" if ":" in web.host else web.host
        return f"{'https' if web.https else 'http'}://{host}:{self.port}{PREFIX}"

    def start(self) -> None:
        web = self.config.dicomweb
        server_config = uvicorn.Config(
            self.dicomweb.app,
            log_level="warning",
            access_log=False,  # request lines hold query strings: patient data
            ssl_certfile=str(web.certificate) if web.certificate else None,
            ssl_keyfile=str(web.private_key) if web.private_key else None,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(server_config)
        self._thread = serve_uvicorn(self._server, self._socket, "aidx-dicomweb")
        log.info("DICOMweb service on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._socket.close()
