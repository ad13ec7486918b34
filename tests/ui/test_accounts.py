"""Accounts, logins, lockout, sessions, roles and the audit log of the review app (issue 7)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

import ui.accounts as accounts_module
from aidx.store.schema import sessions
from aidx.store.store import Store
from ui.accounts import (
    ADMIN,
    AUTH_FAILED_MESSAGE,
    ENGINEER,
    LOCKOUT_MAX_S,
    RADIOLOGIST,
    SESSION_IDLE_TIMEOUT_S,
    SESSION_MAX_AGE_S,
    AccountError,
    Accounts,
    AuthError,
    PasswordPolicyError,
    PermissionDenied,
    User,
    check_password_policy,
    hash_password,
    require_role,
    verify_password,
)
from ui.audit import CSV_COLUMNS, Audit

PASSWORD = "correct horse battery"
T0 = 1_750_000_000.0
B64 = r"[A-Za-z0-9+/]+={0,2}"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny scrypt cost, so that the many logins below take milliseconds."""
    monkeypatch.setattr(accounts_module, "SCRYPT_N", 2**4)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)  # SQLite and PostgreSQL
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def accounts(store: Store, clock: Clock, fast_scrypt: None) -> Accounts:
    del fast_scrypt
    acc = Accounts(store, clock=clock)
    acc.add_user("alice", PASSWORD, display_name="Alice Smith", role=RADIOLOGIST)
    return acc


def actions(acc: Accounts) -> list[tuple[str, str]]:
    """(username, action) of every audit entry, oldest first."""
    return [(e.username, e.action) for e in reversed(acc.audit.query())]


def fail_login(acc: Accounts, username: str, password: str) -> str:
    with pytest.raises(AuthError) as info:
        acc.authenticate(username, password, client="10.0.0.9")
    return str(info.value)


# ----------------------------------------------------------------------------- password hashes
def test_hash_has_the_production_cost_in_a_self_describing_string() -> None:
    stored = hash_password(PASSWORD)
    match = re.fullmatch(rf"scrypt\$16384\$8\$1\$({B64})\$({B64})", stored)
    assert match is not None, stored
    salt, key = (base64.b64decode(g) for g in match.groups())
    assert len(salt) == 16
    expected = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**14, r=8, p=1, dklen=len(key))
    assert key == expected
    assert verify_password(PASSWORD, stored)
    assert not verify_password(PASSWORD + "!", stored)
    assert hash_password(PASSWORD) != stored  # a fresh salt each time


def test_a_hash_keeps_verifying_after_the_cost_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts_module, "SCRYPT_N", 2**4)
    cheap = hash_password(PASSWORD)
    assert cheap.startswith("scrypt$16$8$1$")
    monkeypatch.setattr(accounts_module, "SCRYPT_N", 2**5)
    assert verify_password(PASSWORD, cheap)
    assert not verify_password("correct horse battery staple", cheap)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "pbkdf2$1$2$3$AAAA$AAAA",
        "scrypt$16$8$1$AAAA",
        "scrypt$sixteen$8$1$AAAA$AAAA",
        "scrypt$16$8$1$not base64!$AAAA",
        "scrypt$15$8$1$AAAA$AAAA",  # n not a power of two
        "scrypt$1073741824$8$1$AAAA$AAAA",  # a tampered row asking for a huge cost
    ],
)
def test_an_unusable_stored_hash_is_an_error_not_a_match(stored: str) -> None:
    with pytest.raises(ValueError, match=r"scrypt"):
        verify_password(PASSWORD, stored)


def test_password_policy_lists_every_problem() -> None:
    check_password_policy("alice", "ten chars!")
    with pytest.raises(PasswordPolicyError, match="it needs at least 10"):
        check_password_policy("alice", "too short")
    with pytest.raises(PasswordPolicyError, match="must not be the user name"):
        check_password_policy("alice.smith", "Alice.Smith")
    with pytest.raises(PasswordPolicyError) as info:
        check_password_policy("bob", "BOB")
    assert "at least 10" in str(info.value)
    assert "user name" in str(info.value)


# ----------------------------------------------------------------------------- administration
def test_add_user_refuses_bad_requests_and_stores_nothing(accounts: Accounts) -> None:
    with pytest.raises(PasswordPolicyError):
        accounts.add_user("bob", "short", display_name="Bob", role=ENGINEER)
    with pytest.raises(PasswordPolicyError):
        accounts.add_user("carol.king", "Carol.King", display_name="Carol", role=ENGINEER)
    with pytest.raises(AccountError, match="role 'doctor'"):
        accounts.add_user("bob", PASSWORD, display_name="Bob", role="doctor")
    with pytest.raises(AccountError, match="language 'fr'"):
        accounts.add_user("bob", PASSWORD, display_name="Bob", role=ENGINEER, language="fr")
    with pytest.raises(AccountError, match="user name"):
        accounts.add_user("bob smith", PASSWORD, display_name="Bob", role=ENGINEER)
    with pytest.raises(AccountError, match="display name"):
        accounts.add_user("bob", PASSWORD, display_name="  ", role=ENGINEER)
    with pytest.raises(AccountError, match="exists already"):
        accounts.add_user("ALICE", PASSWORD, display_name="Another", role=ADMIN)
    assert [u.username for u in accounts.list_users()] == ["alice"]
    assert actions(accounts) == [("system", "user_added")]


def test_users_are_listed_without_password_hashes(accounts: Accounts) -> None:
    accounts.add_user(
        " Wang.Li ",
        "正确的马电池订书钉很长",
        display_name="王丽",
        role=ADMIN,
        organisation="第一医院",
        language="zh",
    )
    listed = accounts.list_users()
    assert [u.username for u in listed] == ["alice", "wang.li"]
    wang = listed[1]
    assert (wang.display_name, wang.organisation, wang.language, wang.role) == (
        "王丽",
        "第一医院",
        "zh",
        ADMIN,
    )
    assert not hasattr(wang, "password_hash")
    assert "scrypt" not in repr(listed)
    assert accounts.authenticate("wang.li", "正确的马电池订书钉很长").user.id == wang.id


# ------------------------------------------------------------------------------------- logins
def test_login_gives_a_session_whose_token_is_stored_only_as_a_hash(
    accounts: Accounts, store: Store
) -> None:
    session = accounts.authenticate(" Alice ", PASSWORD, client="10.0.0.7")
    assert session.user.username == "alice"
    assert session.user.display_name == "Alice Smith"
    assert session.expires_at == T0 + SESSION_MAX_AGE_S
    assert len(session.token) >= 40
    assert session.token not in repr(session)
    with store.engine.connect() as conn:
        stored = conn.execute(select(sessions.c.token_hash)).scalars().all()
    assert stored == [hashlib.sha256(session.token.encode()).hexdigest()]
    assert accounts.validate(session.token) == session.user
    login = accounts.audit.query(action="login")
    assert [(e.username, e.role, e.client) for e in login] == [("alice", RADIOLOGIST, "10.0.0.7")]


def test_wrong_password_and_unknown_user_fail_alike(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real_verify = accounts_module.verify_password

    def counting_verify(password: str, stored: str) -> bool:
        hashed.append(stored)
        return real_verify(password, stored)

    monkeypatch.setattr(accounts_module, "verify_password", counting_verify)
    messages = {
        fail_login(accounts, "alice", "wrong password!"),
        fail_login(accounts, "mallory", PASSWORD),
        fail_login(accounts, "no such name!", PASSWORD),
        fail_login(accounts, "alice", PASSWORD * 100),
    }
    assert messages == {AUTH_FAILED_MESSAGE}
    # Every attempt costs one scrypt hash, whether the user exists or not.
    assert len(hashed) == 4
    assert all(h.startswith("scrypt$16$8$1$") for h in hashed)
    failed = [
        (e.username, e.detail["reason"], e.client)
        for e in reversed(accounts.audit.query(action="login_failed"))
    ]
    assert failed == [
        ("alice", "wrong password", "10.0.0.9"),
        ("mallory", "unknown user", "10.0.0.9"),
        ("no such name!", "unknown user", "10.0.0.9"),
        ("alice", "wrong password", "10.0.0.9"),
    ]


def test_five_failures_lock_the_account_until_the_lock_expires(
    accounts: Accounts, clock: Clock
) -> None:
    for _ in range(4):
        fail_login(accounts, "alice", "wrong password!")
        clock.advance(1)
    assert accounts.audit.query(action="lockout") == []
    fail_login(accounts, "alice", "wrong password!")
    lockouts = accounts.audit.query(action="lockout")
    assert [e.detail for e in lockouts] == [{"failures": 5, "seconds": 30.0}]
    user = accounts.get_user("alice")
    assert user is not None
    assert user.locked_until == clock.now + 30
    # Locked: the right password is refused too, with the same message, and counts nothing.
    clock.advance(29)
    assert fail_login(accounts, "alice", PASSWORD) == AUTH_FAILED_MESSAGE
    assert accounts.audit.query(action="login_failed", limit=1)[0].detail == {"reason": "locked"}
    locked = accounts.get_user("alice")
    assert locked is not None
    assert locked.failed_logins == 5
    clock.advance(2)
    session = accounts.authenticate("alice", PASSWORD)
    assert (session.user.failed_logins, session.user.locked_until) == (0, None)
    after = accounts.get_user("alice")
    assert after is not None
    assert (after.failed_logins, after.locked_until) == (0, None)


def test_the_lock_doubles_with_each_further_failure_up_to_the_cap(
    accounts: Accounts, clock: Clock
) -> None:
    for _ in range(12):
        fail_login(accounts, "alice", "wrong password!")
        user = accounts.get_user("alice")
        assert user is not None
        if user.locked_until is not None:
            clock.now = user.locked_until  # the lock ends at that instant
    periods = [e.detail["seconds"] for e in reversed(accounts.audit.query(action="lockout"))]
    assert periods == [30.0, 60.0, 120.0, 240.0, 480.0, LOCKOUT_MAX_S, LOCKOUT_MAX_S, LOCKOUT_MAX_S]


def test_a_disabled_user_cannot_log_in_and_loses_its_sessions(accounts: Accounts) -> None:
    session = accounts.authenticate("alice", PASSWORD)
    disabled = accounts.disable_user("alice", actor="cli:root")
    assert disabled.disabled
    assert accounts.validate(session.token) is None
    assert fail_login(accounts, "alice", PASSWORD) == AUTH_FAILED_MESSAGE
    assert accounts.audit.query(action="login_failed")[0].detail == {"reason": "disabled"}
    accounts.enable_user("alice", actor="cli:root")
    assert accounts.validate(accounts.authenticate("alice", PASSWORD).token) is not None
    assert actions(accounts) == [
        ("system", "user_added"),
        ("alice", "login"),
        ("cli:root", "user_disabled"),
        ("alice", "login_failed"),
        ("cli:root", "user_enabled"),
        ("alice", "login"),
    ]
    with pytest.raises(AccountError, match="no user named bob"):
        accounts.disable_user("bob")


def test_set_password_replaces_it_unlocks_and_ends_sessions(
    accounts: Accounts, clock: Clock
) -> None:
    session = accounts.authenticate("alice", PASSWORD)
    for _ in range(5):
        fail_login(accounts, "alice", "wrong password!")
    with pytest.raises(PasswordPolicyError):
        accounts.set_password("alice", "alice")
    admin = User(9, "root", "Root", "", ADMIN, "en", False, T0, T0, 0, None)
    clock.advance(5)
    accounts.set_password("alice", "a new long password", actor=admin)
    assert accounts.validate(session.token) is None
    assert fail_login(accounts, "alice", PASSWORD) == AUTH_FAILED_MESSAGE
    assert accounts.authenticate("alice", "a new long password").user.password_changed_at == (
        T0 + 5
    )
    changed = accounts.audit.query(action="password_changed")
    assert [(e.username, e.role, e.detail) for e in changed] == [("root", ADMIN, {"user": "alice"})]


# ----------------------------------------------------------------------------------- sessions
def test_a_session_ends_after_the_idle_timeout(accounts: Accounts, clock: Clock) -> None:
    token = accounts.authenticate("alice", PASSWORD).token
    for _ in range(3):  # in use: kept alive well beyond one idle period
        clock.advance(SESSION_IDLE_TIMEOUT_S - 60)
        assert accounts.validate(token) is not None
    clock.advance(SESSION_IDLE_TIMEOUT_S + 1)
    assert accounts.validate(token, client="10.0.0.7") is None
    assert accounts.validate(token) is None  # and it stays ended, recorded once
    expired = accounts.audit.query(action="session_expired")
    assert [(e.username, e.detail, e.client) for e in expired] == [
        ("alice", {"reason": "idle"}, "10.0.0.7")
    ]


def test_a_session_ends_at_its_maximum_age_even_in_use(accounts: Accounts, clock: Clock) -> None:
    token = accounts.authenticate("alice", PASSWORD).token
    while clock.now + 600 < T0 + SESSION_MAX_AGE_S:
        clock.advance(600)
        assert accounts.validate(token) is not None
    clock.now = T0 + SESSION_MAX_AGE_S
    assert accounts.validate(token) is None
    expired = accounts.audit.query(action="session_expired")
    assert [e.detail for e in expired] == [{"reason": "maximum age"}]


def test_a_login_clears_sessions_past_their_maximum_age(
    accounts: Accounts, clock: Clock, store: Store
) -> None:
    old = accounts.authenticate("alice", PASSWORD).token
    clock.advance(SESSION_MAX_AGE_S - 1)
    recent = accounts.authenticate("alice", PASSWORD).token
    clock.advance(1)  # the first session's maximum age is reached; the second is open
    newest = accounts.authenticate("alice", PASSWORD).token
    with store.engine.connect() as conn:
        stored = set(conn.execute(select(sessions.c.token_hash)).scalars())
    assert stored == {hashlib.sha256(t.encode()).hexdigest() for t in (recent, newest)}
    assert accounts.validate(old) is None
    assert accounts.validate(recent) is not None and accounts.validate(newest) is not None


def test_logout_revokes_the_session(accounts: Accounts) -> None:
    token = accounts.authenticate("alice", PASSWORD).token
    other = accounts.authenticate("alice", PASSWORD).token
    assert accounts.revoke(token, client="10.0.0.7")
    assert accounts.validate(token) is None
    assert not accounts.revoke(token)  # once only
    assert accounts.validate(other) is not None  # another browser stays logged in
    for bad in (None, "", "x" * 10_000, "not-a-token"):
        assert accounts.validate(bad) is None
        assert not accounts.revoke(bad)
    assert actions(accounts)[-1] == ("alice", "logout")
    assert len(accounts.audit.query(action="logout")) == 1


# -------------------------------------------------------------------------------------- roles
def test_require_role() -> None:
    radiologist = User(1, "alice", "Alice", "", RADIOLOGIST, "en", False, T0, T0, 0, None)
    admin = User(2, "root", "Root", "", ADMIN, "en", False, T0, T0, 0, None)
    gone = User(3, "old", "Old", "", ADMIN, "en", True, T0, T0, 0, None)
    assert require_role(radiologist, RADIOLOGIST, ADMIN) is radiologist
    assert require_role(admin, ADMIN) is admin
    with pytest.raises(PermissionDenied, match="needs the role admin; alice is radiologist"):
        require_role(radiologist, ADMIN)
    with pytest.raises(PermissionDenied, match="log in"):
        require_role(None, RADIOLOGIST)
    with pytest.raises(PermissionDenied, match="disabled"):
        require_role(gone, ADMIN)
    with pytest.raises(ValueError, match="require_role"):
        require_role(admin, "superuser")
    with pytest.raises(ValueError, match="require_role"):
        require_role(admin)


# -------------------------------------------------------------------------------------- audit
def test_audit_query_filters_and_orders(store: Store, clock: Clock) -> None:
    audit = Audit(store, clock)
    uid = "1.2.826.0.1.3680043.10.543.1"
    audit.record("alice", RADIOLOGIST, "study_viewed", study_uid=uid, client="10.0.0.7")
    clock.advance(60)
    audit.record("alice", RADIOLOGIST, "decision", uid, {"finding": 2, "decision": "reject"})
    clock.advance(60)
    audit.record("bob", ENGINEER, "login")
    assert [e.action for e in audit.query()] == ["login", "decision", "study_viewed"]
    assert [e.action for e in audit.query(limit=1)] == ["login"]
    assert [e.action for e in audit.query(username="alice")] == ["decision", "study_viewed"]
    assert [e.action for e in audit.query(since=T0 + 60, until=T0 + 120)] == ["decision"]
    since = datetime.fromtimestamp(T0 + 1)
    assert [e.action for e in audit.query(since=since)] == ["login", "decision"]
    decision = audit.query(action="decision")[0]
    assert (decision.at, decision.study_uid, decision.detail) == (
        T0 + 60,
        uid,
        {"finding": 2, "decision": "reject"},
    )
    with pytest.raises(ValueError, match="audit action"):
        audit.record("alice", RADIOLOGIST, "")
    assert not hasattr(audit, "update")
    assert not hasattr(audit, "delete")


def test_audit_export_csv(store: Store, clock: Clock, tmp_path: Path) -> None:
    audit = Audit(store, clock)
    audit.record("alice", RADIOLOGIST, "sign_off", "1.2.3", {"reason": "诊断一致"}, "10.0.0.7")
    clock.advance(1)
    # A failed login records the name as typed: it must not become a spreadsheet formula.
    audit.record("=HYPERLINK(1)", None, "login_failed", detail={"reason": "unknown user"})
    out = tmp_path / "audit.csv"
    assert audit.export_csv(out) == 2
    with out.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # so that spreadsheets read UTF-8
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1][0] == "1"
    assert datetime.fromisoformat(rows[1][1]).timestamp() == T0
    assert rows[1][2:] == [
        "alice",
        RADIOLOGIST,
        "sign_off",
        "1.2.3",
        '{"reason": "诊断一致"}',
        "10.0.0.7",
    ]
    assert rows[2][2:6] == ["'=HYPERLINK(1)", "", "login_failed", ""]
    buffer = io.StringIO()
    assert audit.export_csv(buffer, since=T0 + 1) == 1
    assert buffer.getvalue().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert len(buffer.getvalue().splitlines()) == 2
