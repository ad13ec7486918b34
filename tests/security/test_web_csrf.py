"""Cross-origin requests against the review app (login CSRF, same-site forms, CORS): a page of
another origin, another port or a sibling subdomain included (SameSite=Strict does not stop
those: they are the same site), can neither sign a user in or out, change their language, send
Gradio events, nor read the app's responses. The app's own pages and non-browser clients work.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from aidx.config import ConfigError, load_config
from tests.ui.reviewed_study import PASSWORD
from tests.ui.test_web import login
from tests.ui.web_client import WebApp, empty_app
from ui.web import COOKIE

APP = "http://127.0.0.1"
PROXY = "https://review.hospital.example"  # configured in ui.trusted_origins
OTHER_ORIGINS = [
    "http://127.0.0.1:8666",  # another port of the same host: the same site
    "https://127.0.0.1",  # another scheme
    "http://localhost",  # another host name of the same machine
    "https://evil.example",
]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> WebApp:
    return empty_app(tmp_path_factory.mktemp("csrf"), trusted_origins=[PROXY])


@pytest.fixture
def client(web: WebApp) -> Iterator[TestClient]:
    with TestClient(web.gate, base_url=APP) as c:
        yield c


def sign_in(client: TestClient, headers: dict[str, str]) -> int:
    client.cookies.clear()
    response = client.post(
        "/login",
        data={"username": "eng", "password": PASSWORD},
        headers=headers,
        follow_redirects=False,
    )
    if response.status_code == 403:
        assert COOKIE not in response.cookies
        assert "ui.trusted_origins" in response.text and "refused" in response.text
    return response.status_code


@pytest.mark.parametrize("origin", OTHER_ORIGINS)
def test_login_from_another_origin_is_refused(client: TestClient, origin: str) -> None:
    assert sign_in(client, {"Origin": origin}) == 403
    assert sign_in(client, {"Referer": origin + "/form.html"}) == 403


def test_login_from_browsers_that_give_no_origin_but_tell_the_site(client: TestClient) -> None:
    assert sign_in(client, {"Sec-Fetch-Site": "same-site"}) == 403
    assert sign_in(client, {"Sec-Fetch-Site": "cross-site"}) == 403
    assert sign_in(client, {"Origin": "null"}) == 403  # a sandboxed frame of any site


def test_login_from_the_app_its_proxy_or_no_browser_works(client: TestClient) -> None:
    assert sign_in(client, {"Origin": APP}) == 303
    assert sign_in(client, {"Origin": APP + ":80", "Sec-Fetch-Site": "same-origin"}) == 303
    assert sign_in(client, {"Referer": APP + "/login?next=/app/en/"}) == 303
    assert sign_in(client, {"Origin": "null", "Sec-Fetch-Site": "same-origin"}) == 303
    assert sign_in(client, {"Origin": PROXY}) == 303
    assert sign_in(client, {"Sec-Fetch-Site": "none"}) == 303  # typed into the address bar
    assert sign_in(client, {}) == 303  # curl, scripts: no origin, and no victim's cookie


def test_language_logout_and_gradio_events_from_another_origin_are_refused(
    web: WebApp, client: TestClient
) -> None:
    login(client, "eng")
    for origin in OTHER_ORIGINS:
        changed = client.post(
            "/language", data={"lang": "zh"}, headers={"Origin": origin}, follow_redirects=False
        )
        assert changed.status_code == 403, origin
        joined = client.post(
            "/app/en/gradio_api/queue/join",
            json={"data": [], "fn_index": 0, "session_hash": "abc"},
            headers={"Origin": origin},
        )
        assert joined.status_code == 403, origin
    assert web.ctx.accounts.get_user("eng").language == "en"  # type: ignore[union-attr]
    for site in ("same-site", "cross-site"):  # a link or a form on a sibling subdomain
        out = client.get("/logout", headers={"Sec-Fetch-Site": site}, follow_redirects=False)
        assert out.status_code == 403
    assert client.get("/app/en/config").status_code == 200  # still signed in
    same = client.post(
        "/language", data={"lang": "zh"}, headers={"Origin": APP}, follow_redirects=False
    )
    assert same.status_code == 303
    assert web.ctx.accounts.get_user("eng").language == "zh"  # type: ignore[union-attr]
    web.ctx.accounts.set_language("eng", "en")
    out = client.get("/logout", headers={"Referer": APP + "/app/en/"}, follow_redirects=False)
    assert out.status_code == 303


def test_refusals_are_logged_with_the_address_and_audited_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web = empty_app(tmp_path)
    forger = TestClient(web.gate, base_url=APP, client=("10.9.8.7", 4000))
    for _ in range(5):
        assert sign_in(forger, {"Origin": "https://evil.example"}) == 403
    lines = [r.getMessage() for r in caplog.records if "evil.example" in r.getMessage()]
    assert len(lines) == 5 and all("POST /login from 10.9.8.7" in line for line in lines)
    refused = web.ctx.accounts.audit.query(action="request_refused")
    assert len(refused) == 1, refused  # a flood of forged requests is one entry a minute
    assert refused[0].client == "10.9.8.7" and refused[0].detail["path"] == "/login"
    assert "evil.example" in refused[0].detail["why"]


def test_a_sibling_subdomain_is_another_origin(web: WebApp) -> None:
    with TestClient(web.gate, base_url="https://app.hospital.example") as client:
        login(client, "eng")
        sibling = client.post(
            "/language",
            data={"lang": "zh"},
            headers={"Origin": "https://evil.hospital.example"},
            follow_redirects=False,
        )
        assert sibling.status_code == 403
        assert "https://app.hospital.example" in sibling.text  # the app's own origin
        own = client.post(
            "/language",
            data={"lang": "en"},
            headers={"Origin": "https://app.hospital.example"},
            follow_redirects=False,
        )
        assert own.status_code == 303


@pytest.mark.parametrize(
    ("base_url", "origin"),
    [
        (APP, "http://127.0.0.1:8666"),  # Gradio reflected localhost origins
        ("https://app.hospital.example", "https://evil.hospital.example"),  # ... and any other
    ],
)
def test_no_origin_may_read_the_apps_responses(web: WebApp, base_url: str, origin: str) -> None:
    with TestClient(web.gate, base_url=base_url) as client:
        login(client, "eng")
        for path in ("/app/en/config", "/app/en/gradio_api/info", "/"):
            response = client.get(path, headers={"Origin": origin}, follow_redirects=False)
            assert response.status_code in (200, 303), path
            assert "access-control-allow-origin" not in response.headers, path
            assert "access-control-allow-credentials" not in response.headers, path
        preflight = client.options(
            "/app/en/gradio_api/queue/join",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_a_websocket_from_another_origin_is_closed(client: TestClient) -> None:
    login(client, "eng")
    evil = {"Origin": "https://evil.example"}
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/", headers=evil):
        pass
    assert closed.value.code == 4403


def test_trusted_origins_must_be_origins(tmp_path: Path) -> None:
    for bad in ("https://proxy.example/app", "proxy.example", "ftp://proxy.example"):
        with pytest.raises(ConfigError, match="trusted_origins"):
            load_config(env={}, overrides={"data_dir": str(tmp_path), "ui.trusted_origins": [bad]})
    good = ["https://proxy.example", "http://10.0.0.5:8443", "https://[fd00::5]:8443"]
    config = load_config(env={}, overrides={"data_dir": str(tmp_path), "ui.trusted_origins": good})
    assert config.ui.trusted_origins == good
