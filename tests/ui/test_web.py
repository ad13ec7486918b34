"""The review app's web layer in-process (FastAPI TestClient): no route without a session,
Gradio's own API included; login, logout, language, roles; HTTPS refusal beyond loopback."""

from __future__ import annotations

import io
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from aidx.config import load_config
from aidx.store.store import Store
from tests.dicom_node.test_tls import Pki, pki  # noqa: F401  (the throwaway CA fixture)
from tests.peers import poll_until
from tests.ui.reviewed_study import PASSWORD, ReviewedStudy, reviewed_study
from ui.i18n import missing, text
from ui.viewer_session import study_view
from ui.web import COOKIE, UiContext, UiServer, create_app

# Routes of the app and of Gradio's mounted apps (pages, config, API, files, queue, uploads).
PROTECTED = [
    ("GET", "/"),
    ("GET", "/app/en/"),
    ("GET", "/app/zh/"),
    ("GET", "/app/en/config"),
    ("GET", "/app/en/gradio_api/info"),
    ("GET", "/app/en/gradio_api/info?all_endpoints=true"),
    ("POST", "/app/en/gradio_api/queue/join"),
    ("GET", "/app/en/gradio_api/queue/data?session_hash=x"),
    ("POST", "/app/en/gradio_api/upload"),
    ("GET", "/app/en/gradio_api/file=/etc/passwd"),
    ("GET", "/app/en/theme.css"),
    ("GET", "/app/en/gradio_api/startup-events"),
    ("POST", "/app/en/gradio_api/run/predict"),
    ("GET", "/admin/audit.csv"),
    ("GET", "/viewer/slice.png?review=1&pos=0&w=1500&l=-600"),
    ("POST", "/language"),
    ("GET", "/logout"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/nonexistent"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, ReviewedStudy]:
    study = reviewed_study(tmp_path_factory.mktemp("web"))
    ctx = UiContext(study.config, study.store, study.accounts, study.reviews)
    _, gate = create_app(ctx)
    return TestClient(gate, base_url="http://127.0.0.1"), study


def login(client: TestClient, user: str, password: str = PASSWORD) -> None:
    client.cookies.clear()
    response = client.post(
        "/login", data={"username": user, "password": password}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    assert COOKIE in response.cookies


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_nothing_without_a_session(
    app: tuple[TestClient, ReviewedStudy], method: str, path: str
) -> None:
    client, _ = app
    client.cookies.clear()
    response = client.request(method, path, follow_redirects=False)
    assert response.status_code == 401, (path, response.status_code)
    assert response.json() == {"detail": "login required"}
    assert "gradio" not in response.text.lower()
    page = client.request(method, path, headers={"Accept": "text/html"}, follow_redirects=False)
    if method == "GET":
        assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    else:
        assert page.status_code == 401
    client.cookies.set(COOKIE, "forged")
    forged = client.request(method, path, follow_redirects=False)
    assert forged.status_code == 401
    assert forged.headers["x-frame-options"] == "DENY"
    assert forged.headers["referrer-policy"] == "same-origin"
    client.cookies.clear()


def test_login_page_is_open_and_failures_are_generic_and_audited(
    app: tuple[TestClient, ReviewedStudy],
) -> None:
    client, study = app
    client.cookies.clear()
    page = client.get("/login")
    assert page.status_code == 200 and 'name="password"' in page.text
    assert page.headers["cache-control"] == "no-store"
    zh = client.get("/login?lang=zh")
    assert "登录" in zh.text
    for user in ("rad", "nobody"):
        bad = client.post("/login", data={"username": user, "password": "wrong password"})
        assert bad.status_code == 401 and "Sign-in failed" in bad.text
        assert COOKIE not in bad.cookies
    failures = study.accounts.audit.query(action="login_failed")
    assert len(failures) >= 2


def test_a_session_opens_the_app_and_logout_ends_it(
    app: tuple[TestClient, ReviewedStudy],
) -> None:
    client, study = app
    response = client.post(
        "/login",
        data={"username": "rad", "password": PASSWORD, "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/app/en/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    token = response.cookies[COOKIE]
    client.cookies.set(COOKIE, token)
    assert client.get("/app/en/", follow_redirects=False).status_code == 200
    app_page = client.get("/app/en/")
    assert app_page.status_code == 200
    assert app_page.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert "strict-transport-security" not in app_page.headers  # plain HTTP here
    assert client.get("/app/en/config").status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/app/en/"
    assert client.get("/logout", follow_redirects=False).status_code == 303
    client.cookies.set(COOKIE, token)  # the old token no longer works, even if kept
    assert client.get("/app/en/config").status_code == 401
    actions = [e.action for e in study.accounts.audit.query(username="rad")]
    assert "login" in actions and "logout" in actions


def test_roles_admin_pages_and_language(app: tuple[TestClient, ReviewedStudy]) -> None:
    client, study = app
    login(client, "rad")
    assert client.get("/admin/audit.csv").status_code == 403
    login(client, "admin")
    csv = client.get("/admin/audit.csv")
    assert (csv.status_code == 200 and csv.text.startswith("\ufeff")) or "action" in csv.text
    assert "login" in csv.text
    login(client, "eng")
    changed = client.post("/language", data={"lang": "zh"}, follow_redirects=False)
    assert changed.headers["location"] == "/app/zh/"
    assert study.accounts.get_user("eng").language == "zh"  # type: ignore[union-attr]
    assert client.get("/", follow_redirects=False).headers["location"] == "/app/zh/"
    assert client.post("/language", data={"lang": "fr"}).status_code == 400


def test_slice_route_serves_the_viewer_picture_for_studies_the_user_opened(
    app: tuple[TestClient, ReviewedStudy],
) -> None:
    client, study = app
    review = study.review_id()
    route = "/viewer/slice.png?review={}&pos={}&w={}&l=-600&pt={}"
    login(client, "eng")  # has not opened the study: every image access follows a view
    assert client.get(route.format(review, 0, 1500, "-1,0,0")).status_code == 403
    study.reviews.open(review, study.engineer)  # what opening it in the viewer records
    first = client.get(route.format(review, 0, 1500, "-1,0,0"))
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["cache-control"] == "private, no-store"
    with Image.open(io.BytesIO(first.content)) as png:
        assert png.size == (96, 96)  # the series' matrix
    view = study_view(UiContext(study.config, study.store, study.accounts, study.reviews), review)
    info = urllib.parse.unquote(first.headers["x-aidx-slice-info"])
    top = view.slice_at(0)
    assert info.startswith(f"Image {view.instance_number(top)} · 1 of {view.slice_count}")
    # Past the end: the last slice. Another window: another picture. A marked point: a cross.
    last = client.get(route.format(review, 10_000, 1500, "-1,0,0"))
    assert last.headers["x-aidx-slice-position"] == str(view.slice_count)
    narrow = client.get(route.format(review, 0, 350, "-1,0,0"))
    assert narrow.status_code == 200 and narrow.content != first.content
    marked = client.get(route.format(review, 0, 1500, f"{top},48,48"))
    assert marked.content != first.content
    assert client.get(route.format(review, 0, 0, "-1,0,0")).status_code == 400  # window 0 HU
    assert client.get(route.format(review, 0, 1500, "x")).status_code == 400
    assert client.get(route.format(review + 99, 0, 1500, "-1,0,0")).status_code == 404


def test_https_is_required_beyond_loopback(tmp_path: Path) -> None:
    config = load_config(env={}, overrides={"data_dir": str(tmp_path), "ui.host": "0.0.0.0"})
    refusal = config.ui.refusal()
    assert refusal is not None and "HTTPS" in refusal and "ui.certificate" in refusal
    from aidx.cli import main

    assert main(["--data-dir", str(tmp_path), "ui", "--host", "0.0.0.0", "--port", "0"]) == 2


def test_the_app_serves_https_with_the_configured_certificate(
    tmp_path: Path,
    pki: Pki,  # noqa: F811  (the fixture imported above)
) -> None:
    """HTTPS end to end through uvicorn: the page over TLS (checked against the test CA), the
    session cookie marked Secure, and no plain HTTP on that port."""
    config = load_config(
        env={},
        overrides={
            "data_dir": str(tmp_path),
            "ui.port": 0,
            "ui.certificate": str(pki.server_cert),
            "ui.private_key": str(pki.server_key),
        },
    )
    store = Store.for_config(config)
    server = UiServer(config, store)
    server.start()
    try:
        server.ctx.accounts.add_user("rad", PASSWORD, role="radiologist", display_name="R^A")
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(pki.ca))
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context),
            urllib.request.ProxyHandler({}),
            _NoRedirect(),
        )

        def login_page_served() -> bool:
            try:
                with opener.open(server.url + "login", timeout=10) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        poll_until(login_page_served, 30.0, "the login page over HTTPS")
        form = urllib.parse.urlencode({"username": "rad", "password": PASSWORD}).encode()
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(server.url + "login", data=form, timeout=10)
        assert redirect.value.code == 303
        cookie = redirect.value.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie
        assert redirect.value.headers["strict-transport-security"] == "max-age=31536000"
        with pytest.raises(OSError):
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{server.port}/login", timeout=10
            )
    finally:
        server.stop()
        store.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_every_interface_text_exists_in_both_languages() -> None:
    assert missing("zh") == []
    assert text("zh", "sign") == "签署报告" and text("en", "sign") == "Sign report"
    assert text("fr", "sign") == "Sign report"  # an unknown language falls back to English


def test_an_open_page_cancelled_at_shutdown_is_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn cancels a browser's open event stream when the review app stops and logs it as
    "Exception in ASGI application" with an 80-line traceback (seen with Chromium on Ctrl-C);
    the review app says it in one line instead, and lets real errors through."""
    import asyncio
    import logging

    from ui.web import _quiet_shutdown

    _quiet_shutdown()
    uvicorn_log = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.INFO):
        try:
            raise asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")
        except asyncio.CancelledError:
            uvicorn_log.exception("Exception in ASGI application\n")
        uvicorn_log.error("Cancel 1 running task(s), timeout graceful shutdown exceeded")
        try:
            raise ValueError("a real error")
        except ValueError:
            uvicorn_log.exception("Exception in ASGI application\n")
    messages = [r.getMessage() for r in caplog.records]
    assert "review app stopped: an open browser page's connection was closed" in messages
    assert not any("graceful shutdown" in m for m in messages)
    (real,) = [r for r in caplog.records if r.exc_info]
    assert isinstance(real.exc_info[1], ValueError)  # type: ignore[index]
