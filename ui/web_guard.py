"""The review app's request guards, used by ui/web.py: same-origin checks (CSRF), the sign-in
rate limit and thread pool, Gradio page sessions bound to their user, and no uploads.

- :class:`OriginPolicy`: a state-changing request (any method but GET/HEAD/OPTIONS, ``GET
  /logout``, a WebSocket) whose ``Origin`` (else ``Referer``, else ``Sec-Fetch-Site``) is not
  the app's own origin (scheme, host and port of the request's ``Host``) nor one of
  ``ui.trusted_origins`` is refused with 403. SameSite=Strict cookies do not stop another port
  or a sibling subdomain: those are the same *site*. A request with none of the three headers
  (not a browser) passes: it cannot carry a victim's cookie.
- :class:`LoginRateLimit`: failed (and still running) sign-ins per client address in a sliding
  window (``ui.login_rate_limit`` per ``ui.login_rate_window_s``); past it, 429 and
  ``Retry-After``. The account lockout (ui.accounts) still applies per account.
- :class:`LoginWorkers`: scrypt (about 50 ms and 16 MiB) runs on a few threads of its own, never
  on the event loop, with a bounded queue.
- :class:`SessionOwners` and :class:`GradioGuard`: Gradio keeps each page's state under the
  ``session_hash`` the browser picks; the first signed-in user to use one owns it, and any other
  user's request naming it (query, path or JSON body) is refused with 403. Gradio's upload
  routes and multipart bodies are refused (the app has no upload field).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("aidx.ui.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
R = TypeVar("R")

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
STATE_CHANGING_GETS: Final = ("/logout",)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_WS_SCHEMES: Final = {"ws": "http", "wss": "https"}
_SHOWN_CHARS: Final = 200  # of a refused origin, in the refusal

LOGIN_THREADS: Final = 2  # concurrent scrypt checks (16 MiB each)
LOGIN_QUEUE_MAX: Final = 32  # sign-ins waiting for those threads; more get 503
RATE_LIMIT_ADDRESSES: Final = 10_000  # client addresses remembered by the rate limit
SESSION_OWNERS: Final = 100_000  # page sessions remembered (Gradio keeps 10,000 per app)
GRADIO_BODY_MAX: Final = 1 << 20  # bytes of a Gradio API request body (events are small JSON)
REFUSAL_AUDIT_S: Final = 60.0  # one audit entry per client address and kind of refusal per window

Origin = tuple[str, str, int]


def origin_of(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) URL or origin, or None when it is not one."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def request_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def own_origin(scope: Scope) -> Origin | None:
    """The origin the browser used for this request: the scheme uvicorn saw (behind a proxy on
    loopback, its X-Forwarded-Proto) and the ``Host`` header."""
    host = request_headers(scope).get("host")
    if not host:
        return None
    scheme = str(scope.get("scheme", "http"))
    return origin_of(f"{_WS_SCHEMES.get(scheme, scheme)}://{host}")


def _show(origin: Origin | None) -> str:
    if origin is None:
        return "unknown"
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if _DEFAULT_PORTS[scheme] == port else f":{port}")


class OriginPolicy:
    """Which origins may send state-changing requests: the app's own and ``trusted``."""

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self.trusted = {o for o in map(origin_of, trusted) if o is not None}

    @staticmethod
    def applies(scope: Scope) -> bool:
        if scope["type"] == "websocket":
            return True
        return scope.get("method") not in SAFE_METHODS or scope.get("path") in STATE_CHANGING_GETS

    def refusal(self, scope: Scope) -> str | None:
        """Why the request must be refused (403), or None."""
        headers = request_headers(scope)
        own = own_origin(scope)
        allowed = self.trusted | ({own} if own is not None else set())
        hint = (
            f"this app is served at {_show(own)}: a page of another origin may not act here "
            "(if a reverse proxy serves the app at that origin, add it to ui.trusted_origins)"
        )
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            if origin_of(origin) in allowed:
                return None
            return f"refused: the request comes from {origin[:_SHOWN_CHARS]!r}; {hint}"
        referer = headers.get("referer")
        if referer:
            source = origin_of(referer)
            if source in allowed:
                return None
            return f"refused: the request comes from a page of {_show(source)}; {hint}"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"refused: the browser reports a {site[:_SHOWN_CHARS]} request; {hint}"
        if origin == "null" and site is None:
            return f"refused: the request comes from an opaque origin (null); {hint}"
        return None


class LoginRateLimit:
    """Failed and still-running sign-ins per client address in a sliding window.

    :meth:`begin` counts an attempt before its password is checked (so that concurrent attempts
    count too); :meth:`succeeded` takes a successful one back off. ``clock`` is monotonic
    seconds; tests pass their own.
    """

    def __init__(
        self,
        attempts: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_refused(address, wait_s)``: told once per address each time it is refused
        (with the log line), for the audit log."""
        if attempts < 1 or window_s <= 0:
            raise ValueError("the login rate limit needs attempts >= 1 and a positive window")
        self.on_refused = on_refused
        self.attempts = attempts
        self.window_s = window_s
        self.clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._announced: set[str] = set()
        self._lock = threading.Lock()

    def begin(self, address: str) -> int | None:
        """Count an attempt from ``address``; or, when it has used up the window, the whole
        seconds until it may try again (the attempt is then not counted)."""
        now = self.clock()
        with self._lock:
            stamps = self._seen.get(address)
            if stamps is None:
                stamps = self._seen[address] = deque()
                self._forget_some(now)
            self._seen.move_to_end(address)
            while stamps and stamps[0] <= now - self.window_s:
                stamps.popleft()
            if len(stamps) < self.attempts:
                stamps.append(now)
                self._announced.discard(address)
                return None
            first = address not in self._announced
            self._announced.add(address)
            wait = max(math.ceil(stamps[0] + self.window_s - now), 1)
        if first:
            log.warning(
                "sign-ins from %s refused for %d s: %d failed in %g s (ui.login_rate_limit)",
                address,
                wait,
                self.attempts,
                self.window_s,
            )
            if self.on_refused is not None:
                self.on_refused(address, wait)
        return wait

    def succeeded(self, address: str) -> None:
        with self._lock:
            stamps = self._seen.get(address)
            if stamps:
                stamps.pop()

    def _forget_some(self, now: float) -> None:
        """Bound the memory: addresses whose attempts all left the window go first."""
        if len(self._seen) <= RATE_LIMIT_ADDRESSES:
            return
        for address in [a for a, s in self._seen.items() if not s or s[-1] <= now - self.window_s]:
            del self._seen[address]
        while len(self._seen) > RATE_LIMIT_ADDRESSES:
            self._seen.popitem(last=False)


class RefusalNotes:
    """Which refusals go to the audit log: the first of each kind from each client address in
    every ``window_s`` (a flood of refused requests is one entry a minute per address)."""

    def __init__(
        self, window_s: float = REFUSAL_AUDIT_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, kind: str, address: str) -> bool:
        now = self.clock()
        with self._lock:
            last = self._last.get((kind, address))
            if last is not None and now - last < self.window_s:
                return False
            self._last[(kind, address)] = now
            self._last.move_to_end((kind, address))
            while len(self._last) > RATE_LIMIT_ADDRESSES:
                self._last.popitem(last=False)
        return True


class LoginBusy(Exception):  # noqa: N818  (a state, not an error of the caller)
    """More sign-ins wait for a password check than :data:`LOGIN_QUEUE_MAX`."""


class LoginWorkers:
    """The threads that check sign-in passwords, so that scrypt never blocks the event loop."""

    def __init__(self, threads: int = LOGIN_THREADS, queue_max: int = LOGIN_QUEUE_MAX) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aidx-login")
        self._queue_max = queue_max
        self._pending = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], R]) -> R:
        with self._lock:
            if self._pending >= self._queue_max:
                raise LoginBusy
            self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SessionOwners:
    """The signed-in user of each Gradio page session (``session_hash``): the first to use it."""

    def __init__(self, capacity: int = SESSION_OWNERS) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def claim(self, session_hash: str, username: str) -> bool:
        """Whether ``username`` may use the page session (it then owns it, if nobody did)."""
        with self._lock:
            owner = self._owners.setdefault(session_hash, username)
            self._owners.move_to_end(session_hash)
            while len(self._owners) > self._capacity:
                self._owners.popitem(last=False)
        if owner != username:
            log.warning(
                "user %s sent the page session %s… of user %s: refused",
                username,
                session_hash[:4],
                owner,
            )
            return False
        return True


class GradioGuard:
    """ASGI middleware in front of the mounted Gradio apps (behind the session gate, which put
    the user in ``scope["state"]``): no uploads, and page sessions only for their owner."""

    def __init__(self, app: ASGIApp, owners: SessionOwners, api_prefix: str = "/app/") -> None:
        self.app = app
        self.owners = owners
        self.api_prefix = api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not path.startswith(self.api_prefix):
            await self.app(scope, receive, send)
            return
        _, _, rest = path.partition("/gradio_api/")
        if not rest:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        headers = request_headers(scope)
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        if rest.strip("/") == "upload" or (multipart and method not in SAFE_METHODS):
            await _json_refusal(send, 403, "this app takes no file uploads")
            return
        hashes = list(_hashes_in_url(rest, scope.get("query_string", b""), method))
        if method not in SAFE_METHODS:
            if int(headers.get("content-length") or 0) > GRADIO_BODY_MAX:
                await _json_refusal(send, 413, f"request body over {GRADIO_BODY_MAX} bytes")
                return
            body = await _read_body(receive, GRADIO_BODY_MAX)
            if body is None:
                await _json_refusal(send, 413, f"request body over {GRADIO_BODY_MAX} bytes")
                return
            hashes.extend(_hash_in_json(body))
            receive = _replay(body, receive)
        username = scope["state"]["user"].username
        if not all(self.owners.claim(h, username) for h in hashes):
            await _json_refusal(
                send, 403, "this page session belongs to another sign-in: reload the page"
            )
            return
        await self.app(scope, receive, send)


def _hashes_in_url(rest: str, query: bytes, method: str) -> Iterator[str]:
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == "session_hash":
            yield value
    parts = rest.split("/")
    # /heartbeat/{session_hash}; GET /stream/{session_hash}/{run}/{component}/{file}
    if parts[0] == "heartbeat" and len(parts) >= 2:
        yield parts[1]
    if parts[0] == "stream" and method == "GET" and len(parts) >= 5:
        yield parts[1]


def _hash_in_json(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except ValueError:  # not JSON: Gradio answers it (400 or 422)
        return []
    value = data.get("session_hash") if isinstance(data, dict) else None
    return [value] if isinstance(value, str) else []


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then the client's own (disconnects)."""
    sent = False

    async def replaying() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying


async def _json_refusal(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
