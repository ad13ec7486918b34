"""Sign-in under attack: the password check (scrypt) runs on the login threads, never on the
event loop that serves every other request; failed sign-ins are limited per client address
(429 with Retry-After), successful ones are not counted; the account lockout still holds."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import ui.accounts as accounts_module
from tests.ui.reviewed_study import PASSWORD
from tests.ui.web_client import WebApp, empty_app
from ui.web import COOKIE

LIMIT = 3
WINDOW_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def web(tmp_path: Path) -> WebApp:
    return empty_app(tmp_path, login_rate_limit=LIMIT, login_rate_window_s=WINDOW_S)


def attempt(client: TestClient, password: str, user: str = "rad") -> int:
    client.cookies.clear()
    response = client.post(
        "/login", data={"username": user, "password": password}, follow_redirects=False
    )
    return response.status_code


def test_failed_sign_ins_are_limited_per_address(web: WebApp) -> None:
    clock = web.api.state.login_limit.clock = Clock()
    attacker = TestClient(web.gate, base_url="http://127.0.0.1", client=("10.0.0.66", 50000))
    colleague = TestClient(web.gate, base_url="http://127.0.0.1", client=("10.0.0.7", 50000))
    for _ in range(LIMIT):
        assert attempt(attacker, "wrong password!", user="eng") == 401
    refused = attacker.post("/login", data={"username": "rad", "password": PASSWORD})
    assert refused.status_code == 429  # even the right password: nothing is checked
    assert refused.headers["retry-after"] == "60"
    assert "Too many failed sign-ins" in refused.text and "60 s" in refused.text
    assert COOKIE not in refused.cookies
    assert attempt(colleague, PASSWORD) == 303  # another address has its own allowance
    clock.now += 45.0
    assert attacker.post("/login", data={}).headers["retry-after"] == "15"
    clock.now += 15.0  # the window has passed
    assert attempt(attacker, PASSWORD) == 303
    failures = web.ctx.accounts.audit.query(action="login_failed")
    assert len(failures) == LIMIT  # refused attempts never reached the password check
    # The refusals are in the audit log: one entry per address each time it is locked out.
    limited = web.ctx.accounts.audit.query(action="login_rate_limited")
    assert [(e.client, e.detail) for e in limited] == [("10.0.0.66", {"retry_after_s": 60})]


def test_successful_sign_ins_are_not_counted(web: WebApp) -> None:
    client = TestClient(web.gate, base_url="http://127.0.0.1")
    for _ in range(3 * LIMIT):
        assert attempt(client, PASSWORD) == 303
    assert attempt(client, "wrong password!") == 401


def test_the_account_lockout_still_holds_across_addresses(web: WebApp) -> None:
    """Five wrong passwords from five addresses (each within its allowance) lock the account."""
    for i in range(web.ctx.accounts.lockout_threshold):
        client = TestClient(web.gate, base_url="http://127.0.0.1", client=(f"10.0.1.{i}", 1))
        assert attempt(client, "wrong password!") == 401
    fresh = TestClient(web.gate, base_url="http://127.0.0.1", client=("10.0.2.1", 1))
    assert attempt(fresh, PASSWORD) == 401  # locked, even with the right password
    assert web.ctx.accounts.audit.query(action="lockout")


def test_the_password_check_runs_off_the_event_loop(
    web: WebApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scrypt must not run on the thread of the event loop: there, every other request waits
    for it (four clients posting wrong passwords took others from 3 ms to 216 ms)."""
    ran_on: list[tuple[str, bool]] = []
    real = accounts_module._scrypt

    def recording(*args: object, **kwargs: object) -> bytes:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        ran_on.append((threading.current_thread().name, on_loop))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(accounts_module, "_scrypt", recording)
    with TestClient(web.gate, base_url="http://127.0.0.1") as client:
        assert attempt(client, "wrong password!") == 401
        assert attempt(client, PASSWORD) == 303
        assert attempt(client, PASSWORD, user="nobody") == 401  # the dummy hash, too
    assert len(ran_on) >= 3  # (and the dummy hash made on first use)
    for name, on_loop in ran_on:
        assert not on_loop, f"scrypt ran on the event loop's thread ({name})"
        assert name.startswith("aidx-login"), name
