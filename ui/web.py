"""The review app's web server: login, sessions, the gate in front of every route, and the
Gradio app (ui/app.py) mounted behind it, one per interface language.

- Every request passes :class:`SessionGate` (pure ASGI, so Gradio's streaming routes work
  unchanged). It first refuses state-changing requests from other origins (CSRF, ui.web_guard),
  ``POST /login`` included; then, except for ``GET/POST /login``, requests without a session:
  an HTML page request is sent to the login page and anything else (Gradio's API, uploads,
  files, config) gets 401 with nothing of the app. Gradio also receives an
  ``auth_dependency`` that reads the gate's user, so its own routes would refuse an anonymous
  request even without the gate.
- The session is a cookie (``aidx_session``: HttpOnly, SameSite=Strict, Secure under HTTPS)
  holding a random token; the store keeps only its hash (ui.accounts). Passwords are checked on
  threads of their own, never on the event loop; failed logins are limited per client address
  (429) and per account (the lockout); every login, logout and failure is in the audit log.
- Gradio's CORS is off (no other origin may read its responses), its uploads are refused, and a
  page session (Gradio's ``session_hash``) serves only the user who opened it (ui.web_guard).
- ``/app/en/`` and ``/app/zh/``: the app in each language; ``/`` sends a user to theirs, and
  ``POST /language`` changes it. ``/admin/audit.csv``: the audit log for administrators.
- :class:`UiServer` runs it all in uvicorn (HTTPS when ``ui.certificate`` is set), in a thread
  for ``aidx serve`` or in the foreground for ``aidx ui``; its temporary files (Gradio's cache of
  the finding thumbnails) are under the data folder and removed when it stops (ui.temp_files).
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import quote, urlsplit

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from aidx.background import serve_uvicorn
from aidx.config import AidxConfig
from aidx.store.store import Store
from ui.accounts import LOGIN_RATE_LIMITED, REQUEST_REFUSED, Accounts, AuthError, User
from ui.app import build_app
from ui.i18n import LANGUAGES, text
from ui.review import Reviews
from ui.slice_route import ViewedReviews, add_slice_route
from ui.temp_files import UiTemp, tighten_umask, use_for_gradio
from ui.viewer_session import prewarm
from ui.volume_route import add_volume_routes
from ui.web_guard import (
    ASGIApp,
    GradioGuard,
    LoginBusy,
    LoginRateLimit,
    LoginWorkers,
    Message,
    OriginPolicy,
    Receive,
    RefusalNotes,
    Scope,
    Send,
    SessionOwners,
)

log = logging.getLogger("aidx.ui.web")
PREPARE_INTERVAL_S = 10.0  # how often new results are opened ahead for the viewer

COOKIE = "aidx_session"
OPEN_PATHS = ("/login",)  # the only routes served without a session
VALIDATE_CACHE_S = 5.0  # a token checked this recently is not checked against the store again
# On every response: no framing by other sites (clickjacking), no MIME sniffing, no referrer to
# other origins (URLs hold study identifiers; "same-origin" rather than "no-referrer", under which
# browsers send the app's own form posts with "Origin: null" and the origin check could not tell
# them from a sandboxed attacker's), and HSTS under HTTPS.
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000")


@dataclass
class UiContext:
    """What the app's handlers need: the store and the services on it."""

    config: AidxConfig
    store: Store
    accounts: Accounts
    reviews: Reviews
    session_owners: SessionOwners = field(default_factory=SessionOwners)
    temp: UiTemp = field(init=False)

    def __post_init__(self) -> None:
        self.temp = UiTemp(self.config.data_dir)


def client_of(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}" if client else None


class SessionGate:
    """ASGI middleware: only requests with a valid session reach the app (see module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        accounts: Accounts,
        https: bool = False,
        origins: OriginPolicy | None = None,
    ) -> None:
        self.app = app
        self.accounts = accounts
        self.origins = origins or OriginPolicy()
        self.headers = [*SECURITY_HEADERS, *([HSTS] if https else [])]
        self._checked: dict[str, tuple[User, float]] = {}
        self._lock = threading.Lock()
        self.refusals = RefusalNotes()

    def user(self, token: str | None, client: str | None) -> User | None:
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._checked.get(token)
        if hit is not None and now - hit[1] < VALIDATE_CACHE_S:
            return hit[0]
        user = self.accounts.validate(token, client)
        with self._lock:
            if user is None:
                self._checked.pop(token, None)
            else:
                if len(self._checked) > 10_000:
                    self._checked.clear()
                self._checked[token] = (user, now)
        return user

    def forget(self, token: str | None) -> None:
        with self._lock:
            self._checked.pop(token or "", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            send = self._with_headers(send)
        if self.origins.applies(scope):
            refusal = self.origins.refusal(scope)
            if refusal is not None:
                method, address = scope.get("method", "websocket"), client_of(scope) or "unknown"
                log.warning("%s %s from %s: %s", method, scope["path"], address, refusal)
                if self.refusals.first(REQUEST_REFUSED, address):
                    detail = {"method": method, "path": str(scope["path"])[:200], "why": refusal}
                    record = self.accounts.audit.record
                    await run_in_threadpool(
                        record, "-", None, REQUEST_REFUSED, detail=detail, client=address
                    )
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4403})
                    return
                await PlainTextResponse(refusal, status_code=403)(scope, _no_receive, send)
                return
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        user = self.user(cookie_token(scope), client_of(scope))
        if user is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401})
                return
            await _refuse(scope, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)

    def _with_headers(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        return sending


def cookie_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed cookie header is no session
                return None
            morsel = jar.get(COOKIE)
            return morsel.value if morsel else None
    return None


async def _refuse(scope: Scope, send: Send) -> None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    wants_page = scope.get("method") == "GET" and "text/html" in headers.get("accept", "")
    if wants_page:
        target = scope.get("path", "/")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        response: Response = RedirectResponse(f"/login?next={quote(target)}", status_code=303)
    else:
        response = Response(
            '{"detail": "login required"}', status_code=401, media_type="application/json"
        )
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _safe_next(target: str | None, lang: str) -> str:
    """Only a local path (no scheme, no host): never an open redirect."""
    default = f"/app/{lang}/"
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return default
    if target.startswith("/login") or target.startswith("/logout"):
        return default
    return target


def login_page(lang: str, message: str = "", next_path: str = "", status: int = 200) -> Response:
    def t(key: str) -> str:
        return html.escape(text(lang, key))

    other = "zh" if lang == "en" else "en"
    body = f"""<!doctype html>
<html lang="{"zh-Hans" if lang == "zh" else "en"}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t("login_title")}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #111827; color: #e5e7eb;
       display: flex; justify-content: center; align-items: center; min-height: 100vh; margin: 0; }}
form {{ background: #1f2937; padding: 2rem 2.5rem; border-radius: 8px; width: 22rem; }}
h1 {{ font-size: 1.3rem; margin-top: 0; }}
label {{ display: block; margin-top: 1rem; }}
input {{ width: 100%; padding: .5rem; margin-top: .3rem; box-sizing: border-box;
         border-radius: 4px; border: 1px solid #4b5563; background: #111827; color: #e5e7eb; }}
button {{ margin-top: 1.5rem; width: 100%; padding: .6rem; background: #2563eb; color: white;
          border: 0; border-radius: 4px; font-size: 1rem; cursor: pointer; }}
.msg {{ color: #fca5a5; margin-top: 1rem; }}
.foot {{ margin-top: 1.2rem; font-size: .85rem; color: #9ca3af; }}
a {{ color: #93c5fd; }}
</style></head><body>
<form method="post" action="/login" autocomplete="off">
<h1>{t("login_title")}</h1>
<input type="hidden" name="next" value="{html.escape(next_path)}">
<input type="hidden" name="lang" value="{lang}">
<label>{t("username")}<input id="username" name="username" autocomplete="username" required></label>
<label>{t("password")}<input id="password" name="password" type="password"
  autocomplete="current-password" required></label>
<button id="sign-in" type="submit">{t("sign_in")}</button>
{f'<p class="msg" role="alert">{html.escape(message)}</p>' if message else ""}
<p class="foot"><a href="/login?lang={other}">{t("switch_language")}</a> ·
{t("not_clinical")}</p>
</form></body></html>"""
    response = HTMLResponse(body, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


def create_app(ctx: UiContext) -> tuple[FastAPI, SessionGate]:
    """The whole web app (routes + Gradio apps), wrapped in the session gate."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # No origin may read the app's responses: with the parent's CORS middleware present (and
    # allowing nothing), Gradio's own, which reflects the Origin with credentials, stands aside.
    api.add_middleware(CORSMiddleware, allow_origins=[])
    https = ctx.config.ui.https
    gate_holder: dict[str, SessionGate] = {}

    def rate_limited(address: str, wait_s: int) -> None:
        detail = {"retry_after_s": wait_s}
        ctx.accounts.audit.record("-", None, LOGIN_RATE_LIMITED, detail=detail, client=address)

    login_limit = LoginRateLimit(
        ctx.config.ui.login_rate_limit, ctx.config.ui.login_rate_window_s, on_refused=rate_limited
    )
    login_workers = LoginWorkers()
    api.state.login_limit, api.state.login_workers = login_limit, login_workers

    @api.get("/login")
    def get_login(request: Request) -> Response:
        lang = request.query_params.get("lang", "en")
        lang = lang if lang in LANGUAGES else "en"
        return login_page(lang, next_path=request.query_params.get("next", ""))

    @api.post("/login")
    async def post_login(request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username", ""))
        password = str(form.get("password", ""))
        lang = str(form.get("lang", "en"))
        lang = lang if lang in LANGUAGES else "en"
        client = request.client.host if request.client else None
        address = client or "unknown"
        next_path = str(form.get("next", ""))
        wait = login_limit.begin(address)
        if wait is not None:
            page = login_page(lang, text(lang, "login_rate_limited", seconds=wait), next_path, 429)
            page.headers["Retry-After"] = str(wait)
            return page
        try:  # scrypt on the login threads: the event loop goes on serving everyone else
            session = await login_workers.run(
                partial(ctx.accounts.authenticate, username, password, client)
            )
        except AuthError:
            return login_page(lang, text(lang, "login_failed"), next_path, 401)
        except LoginBusy:
            login_limit.succeeded(address)  # not this address's failure
            page = login_page(lang, text(lang, "login_busy"), next_path, 503)
            page.headers["Retry-After"] = "1"
            return page
        login_limit.succeeded(address)
        target = _safe_next(next_path, session.user.language)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            session.token,
            max_age=int(ctx.accounts.max_age_s),
            httponly=True,
            secure=https,
            samesite="strict",
            path="/",
        )
        return response

    @api.get("/logout")
    def logout(request: Request) -> Response:
        user: User = request.state.user
        token = request.cookies.get(COOKIE)
        ctx.accounts.revoke(token, request.client.host if request.client else None)
        gate_holder["gate"].forget(token)
        response = RedirectResponse(f"/login?lang={user.language}", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @api.get("/")
    def home(request: Request) -> Response:
        return RedirectResponse(f"/app/{request.state.user.language}/", status_code=303)

    @api.post("/language")
    async def language(request: Request) -> Response:
        form = await request.form()
        lang = str(form.get("lang", ""))
        if lang not in LANGUAGES:
            return Response("unknown language", status_code=400)
        user: User = request.state.user
        ctx.accounts.set_language(user.username, lang, actor=user)
        gate_holder["gate"].forget(request.cookies.get(COOKIE))
        return RedirectResponse(f"/app/{lang}/", status_code=303)

    @api.get("/admin/audit.csv")
    def audit_csv(request: Request) -> Response:
        user: User = request.state.user
        if user.role != "admin":
            return Response("administrators only", status_code=403)
        buffer = io.StringIO()
        count = ctx.accounts.audit.export_csv(buffer)
        ctx.accounts.audit.record(
            user.username,
            user.role,
            "audit_export",
            detail={"entries": count},
            client=request.client.host if request.client else None,
        )
        return Response(
            buffer.getvalue().encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="aidx-audit.csv"'},
        )

    viewed = ViewedReviews(ctx)
    add_slice_route(api, ctx, viewed)
    add_volume_routes(api, ctx, viewed)

    def gradio_user(request: Request) -> str | None:
        user = getattr(request.state, "user", None)
        return user.username if isinstance(user, User) else None

    use_for_gradio(ctx.temp)  # before the Blocks are made: each component reads it then
    for lang in LANGUAGES:
        blocks, head = build_app(ctx, lang)
        gr.mount_gradio_app(
            api,
            blocks,
            path=f"/app/{lang}",
            auth_dependency=gradio_user,
            footer_links=[],
            head=head,
            ssr_mode=False,
        )
    gate = SessionGate(
        GradioGuard(api, ctx.session_owners),
        ctx.accounts,
        https,
        OriginPolicy(ctx.config.ui.trusted_origins),
    )
    gate_holder["gate"] = gate
    return api, gate


class UiServer:
    """uvicorn serving :func:`create_app` on ``ui.host:ui.port`` (HTTPS with a certificate)."""

    def __init__(self, config: AidxConfig, store: Store) -> None:
        refusal = config.ui.refusal()
        if refusal:
            raise ValueError(refusal)
        accounts = Accounts(
            store,
            idle_timeout_s=config.ui.session_idle_timeout_s,
            max_age_s=config.ui.session_max_age_s,
            lockout_threshold=config.ui.lockout_threshold,
            lockout_base_s=config.ui.lockout_base_s,
            lockout_max_s=config.ui.lockout_max_s,
        )
        # Gradio writes its cache with the process umask: 027 gives 0640 files, 0750 folders.
        self._umask_before = tighten_umask()
        self.ctx = UiContext(config, store, accounts, Reviews(store, accounts.audit))
        self.app, self.gate = create_app(self.ctx)
        self._socket = socket.socket(
            socket.AF_INET6 if ":" in config.ui.host else socket.AF_INET, socket.SOCK_STREAM
        )
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((config.ui.host, config.ui.port))
        self.port = int(self._socket.getsockname()[1])
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._preparer: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        scheme = "https" if self.ctx.config.ui.https else "http"
        host = self.ctx.config.ui.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}/"

    def _make_server(self) -> Any:
        _quiet_shutdown()
        ui = self.ctx.config.ui
        config = uvicorn.Config(
            self.gate,
            log_level="warning",
            ssl_certfile=str(ui.certificate) if ui.certificate else None,
            ssl_keyfile=str(ui.private_key) if ui.private_key else None,
            timeout_graceful_shutdown=2,
        )
        return uvicorn.Server(config)

    def _prepare_results(self) -> None:
        """Prepare the viewer at result time: every PREPARE_INTERVAL_S, open the worklist's
        next unsigned studies ahead (ui.viewer_session.prewarm), so that a reader's first click
        on a new result opens from memory."""
        while not self._stopping.wait(PREPARE_INTERVAL_S):
            try:
                rows = self.ctx.reviews.worklist()
                prewarm(self.ctx, [w.review_id for w in rows if w.status != "signed"])
            except Exception:  # a store hiccup: logged, and tried again next round
                log.warning("preparing new results for the viewer failed", exc_info=True)

    def _start_preparing(self) -> None:
        self._stopping.clear()
        self._preparer = threading.Thread(
            target=self._prepare_results, name="aidx-ui-prepare", daemon=True
        )
        self._preparer.start()

    def run(self) -> None:
        """Serve in this thread until :meth:`stop` (or a signal, for ``aidx ui``)."""
        self._server = self._make_server()
        self._start_preparing()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._clean_up()

    def start(self) -> None:
        self._server = self._make_server()
        self._thread = serve_uvicorn(self._server, self._socket, "aidx-ui")
        self._start_preparing()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._socket.close()
        self._clean_up()

    def _clean_up(self) -> None:
        """After serving: no threads, temporary files (patient images) or umask left behind."""
        self._stopping.set()
        if self._preparer is not None:
            self._preparer.join(timeout=5)
        self.app.state.login_workers.close()
        self.ctx.temp.remove()
        os.umask(self._umask_before)


class _ShutdownCancellation(logging.Filter):
    """At shutdown uvicorn waits ``timeout_graceful_shutdown`` for open requests, then cancels
    them; a browser's open event stream is such a request, and uvicorn logs its cancellation
    as an 80-line "Exception in ASGI application" traceback. That is the expected end of an
    open page, not an error: one line says so instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError):
            log.info("review app stopped: an open browser page's connection was closed")
            return False
        # "Cancel N running task(s), timeout graceful shutdown exceeded": said by the line above
        message = record.getMessage()
        return not (message.startswith("Cancel ") and "graceful shutdown" in message)


_SHUTDOWN_FILTER = _ShutdownCancellation()


def _quiet_shutdown() -> None:
    """Install :class:`_ShutdownCancellation` on uvicorn's error log (once)."""
    logger = logging.getLogger("uvicorn.error")
    if _SHUTDOWN_FILTER not in logger.filters:
        logger.addFilter(_SHUTDOWN_FILTER)
