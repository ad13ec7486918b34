"""Accounts, roles, sessions and the audit log of the review app (issue 7, items 2 and 7).

Passwords are kept only as salted scrypt hashes (RFC 7914) in a self-describing string
``scrypt$n$r$p$salt$hash``, so the cost can be raised later while older hashes still verify. A
failed login says only "invalid user name or password" and costs the same time whether the user
exists or not (an unknown user is checked against a dummy hash). After ``LOCKOUT_THRESHOLD``
consecutive failures an account is locked, for a period that doubles with each further failure.
Sessions are random tokens of which the store keeps only the SHA-256. Logins, failures, lockouts,
logouts, expiries and account changes go to the audit log, which this module appends to and
reads but never changes.

Torch- and Gradio-free: ``aidx users`` and ``aidx audit`` use it as well as the review app.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, Row, delete, select, update
from sqlalchemy.exc import IntegrityError

from aidx.store.schema import sessions, users

from .audit import Audit

if TYPE_CHECKING:
    from aidx.store.store import Store

log = logging.getLogger("ui.accounts")

RADIOLOGIST: Final = "radiologist"
ENGINEER: Final = "engineer"
ADMIN: Final = "admin"
ROLES: Final = (RADIOLOGIST, ENGINEER, ADMIN)
LANGUAGES: Final = ("en", "zh")  # interface languages, chosen per user

# Defaults of the settings the configuration will carry (ui.session_idle_timeout_s, ...).
SESSION_IDLE_TIMEOUT_S: Final = 30 * 60.0
SESSION_MAX_AGE_S: Final = 12 * 3600.0
LOCKOUT_THRESHOLD: Final = 5  # consecutive failures that lock an account
LOCKOUT_BASE_S: Final = 30.0  # the first lock; doubled for each further failure
LOCKOUT_MAX_S: Final = 15 * 60.0

PASSWORD_MIN_LENGTH: Final = 10
PASSWORD_MAX_LENGTH: Final = 1024  # bounds the work one login attempt can ask for

# scrypt cost: about 16 MiB and 50 ms a hash. Tests lower SCRYPT_N to run fast; verification reads
# the cost from the stored hash, so hashes made with another cost still verify.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_SCHEME = "scrypt"

# A session's last_seen is written at most this often, so that a page full of requests does not
# write the store on each one; the idle timeout is therefore exact to within this.
_TOUCH_EVERY_S = 15.0
_MAX_TOKEN_LENGTH = 256

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
AUTH_FAILED_MESSAGE: Final = "invalid user name or password"
SYSTEM_ACTOR: Final = "system"

# Audit actions of this module; the review app adds its own (study views, decisions, sign-offs).
LOGIN: Final = "login"
LOGIN_FAILED: Final = "login_failed"
LOGIN_RATE_LIMITED: Final = "login_rate_limited"  # ui.login_rate_limit (ui.web)
REQUEST_REFUSED: Final = "request_refused"  # from another origin (ui.web_guard.OriginPolicy)
LOCKOUT: Final = "lockout"
LOGOUT: Final = "logout"
SESSION_EXPIRED: Final = "session_expired"
USER_ADDED: Final = "user_added"
USER_DISABLED: Final = "user_disabled"
USER_ENABLED: Final = "user_enabled"
PASSWORD_CHANGED: Final = "password_changed"


class AccountError(ValueError):
    """An account request that cannot be carried out; the message says what to change."""


class PasswordPolicyError(AccountError):
    """A new password that the policy refuses; the message lists every reason."""


class AuthError(Exception):
    """A failed login. The message never says whether the user exists, is locked or disabled."""

    def __init__(self) -> None:
        super().__init__(AUTH_FAILED_MESSAGE)


class PermissionDenied(Exception):  # noqa: N818  (the name the web world knows)
    """The user is not logged in or does not hold a role the action needs."""


@dataclass(frozen=True)
class User:
    """A review-app account as the application sees it (never with its password hash)."""

    id: int
    username: str
    display_name: str
    organisation: str
    role: str
    language: str
    disabled: bool
    created_at: float
    password_changed_at: float
    failed_logins: int
    locked_until: float | None


@dataclass(frozen=True)
class Session:
    """A logged-in session. ``token`` goes to the client; the store keeps only its SHA-256."""

    token: str = field(repr=False)
    user: User
    created_at: float
    expires_at: float


# --------------------------------------------------------------------------------- passwords
def hash_password(password: str) -> str:
    """A salted scrypt hash (RFC 7914) of ``password``: ``scrypt$n$r$p$salt_b64$hash_b64``."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, _KEY_BYTES)
    return "$".join((_SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)))


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (compared in constant time).

    Raises ValueError when ``stored`` is not a hash made by :func:`hash_password`.
    """
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError("not an aidx scrypt password hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"unreadable scrypt password hash: {exc}") from None
    # Bounds, so that a tampered row cannot make one login take minutes or gigabytes.
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16 or not key:
        raise ValueError(f"scrypt parameters out of range: n={n} r={r} p={p}")
    candidate = _scrypt(password, salt, n, r, p, len(key))
    return hmac.compare_digest(candidate, key)


def check_password_policy(username: str, password: str) -> None:
    """Raise PasswordPolicyError unless ``password`` may be used by ``username``."""
    problems = []
    length = len(unicodedata.normalize("NFC", password))
    if length < PASSWORD_MIN_LENGTH:
        problems.append(
            f"the password has {length} characters; it needs at least {PASSWORD_MIN_LENGTH}"
        )
    if length > PASSWORD_MAX_LENGTH:
        problems.append(f"the password is longer than {PASSWORD_MAX_LENGTH} characters")
    if password.strip().casefold() == username.strip().casefold():
        problems.append("the password must not be the user name")
    if problems:
        raise PasswordPolicyError("; ".join(problems))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_dummy_hashes: dict[tuple[int, int, int], str] = {}


def _dummy_hash() -> str:
    """A hash with the current cost, checked for unknown users so that they cost the same time."""
    cost = (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    if cost not in _dummy_hashes:
        _dummy_hashes[cost] = hash_password(secrets.token_urlsafe(16))
    return _dummy_hashes[cost]


# ------------------------------------------------------------------------------------- roles
def require_role(user: User | None, *roles: str) -> User:
    """``user`` if it is logged in, enabled and holds one of ``roles``; else PermissionDenied."""
    unknown = [r for r in roles if r not in ROLES]
    if not roles or unknown:
        raise ValueError(f"require_role needs roles among {ROLES}, not {roles}")
    if user is None:
        raise PermissionDenied("log in first")
    if user.disabled:
        raise PermissionDenied(f"the account {user.username} is disabled")
    if user.role not in roles:
        raise PermissionDenied(
            f"this needs the role {' or '.join(roles)}; {user.username} is {user.role}"
        )
    return user


# ------------------------------------------------------------------------------------- audit
class Accounts:
    """Users, logins and sessions of the review app, kept in the store.

    ``clock`` gives the time (seconds since the epoch); tests pass their own.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        idle_timeout_s: float = SESSION_IDLE_TIMEOUT_S,
        max_age_s: float = SESSION_MAX_AGE_S,
        lockout_threshold: int = LOCKOUT_THRESHOLD,
        lockout_base_s: float = LOCKOUT_BASE_S,
        lockout_max_s: float = LOCKOUT_MAX_S,
    ) -> None:
        if idle_timeout_s <= 0 or max_age_s <= 0 or lockout_threshold < 1:
            raise ValueError("session timeouts must be positive and the lockout threshold >= 1")
        self._store = store
        self._clock = clock
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self.lockout_threshold = lockout_threshold
        self.lockout_base_s = lockout_base_s
        self.lockout_max_s = lockout_max_s
        self.audit = Audit(store, clock)

    # ----------------------------------------------------------------------- administration
    def add_user(
        self,
        username: str,
        password: str,
        *,
        display_name: str,
        role: str,
        organisation: str = "",
        language: str = "en",
        actor: User | str = SYSTEM_ACTOR,
    ) -> User:
        """Create an account; AccountError (or PasswordPolicyError) says what to change."""
        name = _username(username)
        problems = []
        if role not in ROLES:
            problems.append(f"role {role!r} is not one of {', '.join(ROLES)}")
        if language not in LANGUAGES:
            problems.append(f"language {language!r} is not one of {', '.join(LANGUAGES)}")
        display_name = display_name.strip()
        if not display_name or len(display_name) > 200:
            problems.append("the display name must have 1 to 200 characters")
        if len(organisation.strip()) > 200:
            problems.append("the organisation must have at most 200 characters")
        if problems:
            raise AccountError("; ".join(problems))
        check_password_policy(name, password)
        password_hash = hash_password(password)
        now = self._clock()
        try:
            with self._store._write() as conn:
                conn.execute(
                    users.insert().values(
                        username=name,
                        display_name=display_name,
                        organisation=organisation.strip(),
                        role=role,
                        password_hash=password_hash,
                        disabled=False,
                        language=language,
                        created_at=now,
                        password_changed_at=now,
                        failed_logins=0,
                        locked_until=None,
                    )
                )
                detail = {"user": name, "role": role}
                self.audit._insert(conn, *_who(actor), USER_ADDED, detail=detail)
        except IntegrityError:
            raise AccountError(f"a user named {name} exists already") from None
        return self._existing(name)

    def disable_user(self, username: str, *, actor: User | str = SYSTEM_ACTOR) -> User:
        """Refuse the account's logins from now on and end its open sessions."""
        return self._set_disabled(username, True, actor)

    def enable_user(self, username: str, *, actor: User | str = SYSTEM_ACTOR) -> User:
        return self._set_disabled(username, False, actor)

    def set_password(
        self, username: str, password: str, *, actor: User | str = SYSTEM_ACTOR
    ) -> None:
        """Replace the password; unlocks the account and ends its open sessions."""
        user = self._existing(username)
        check_password_policy(user.username, password)
        password_hash = hash_password(password)
        now = self._clock()
        with self._store._write() as conn:
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(
                    password_hash=password_hash,
                    password_changed_at=now,
                    failed_logins=0,
                    locked_until=None,
                )
            )
            _revoke_all(conn, user.id)
            detail = {"user": user.username}
            self.audit._insert(conn, *_who(actor), PASSWORD_CHANGED, detail=detail)

    def set_language(
        self, username: str, language: str, *, actor: User | str = SYSTEM_ACTOR
    ) -> User:
        """The user's interface language (one of LANGUAGES)."""
        if language not in LANGUAGES:
            raise AccountError(f"language {language!r} is not one of {', '.join(LANGUAGES)}")
        user = self._existing(username)
        with self._store._write() as conn:
            conn.execute(update(users).where(users.c.id == user.id).values(language=language))
            detail = {"user": user.username, "language": language}
            self.audit._insert(conn, *_who(actor), "language_changed", detail=detail)
        return self._existing(username)

    def get_user(self, username: str) -> User | None:
        name = username.strip().lower()
        with self._store.engine.connect() as conn:
            row = conn.execute(select(*_USER_COLUMNS).where(users.c.username == name)).first()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._store.engine.connect() as conn:
            rows = conn.execute(select(*_USER_COLUMNS).order_by(users.c.username)).all()
        return [_user(row) for row in rows]

    # ------------------------------------------------------------------------------- logins
    def authenticate(self, username: str, password: str, client: str | None = None) -> Session:
        """A new session for the user, or AuthError with the same message whatever went wrong."""
        name = username.strip().lower()
        now = self._clock()
        row = None
        if _USERNAME.match(name):
            with self._store.engine.connect() as conn:
                row = conn.execute(select(users).where(users.c.username == name)).first()
        # No password is that long, but hashing a bounded one keeps every attempt's cost equal.
        probe = password[:PASSWORD_MAX_LENGTH]
        if row is None:
            verify_password(probe, _dummy_hash())
            reason = {"reason": "unknown user"}
            self.audit.record(name or "-", None, LOGIN_FAILED, detail=reason, client=client)
            raise AuthError
        user = _user(row)
        try:
            matches = verify_password(probe, row.password_hash) and probe == password
        except ValueError as exc:
            log.error(
                "password hash of user %s is unusable (%s): set a new one with "
                "`aidx users passwd %s`",
                user.username,
                exc,
                user.username,
            )
            matches = False
        failure = None
        if user.disabled:
            failure = "disabled"
        elif user.locked_until is not None and now < user.locked_until:
            failure = "locked"  # even with the right password: that is what a lock is for
        elif not matches:
            failure = "wrong password"
        with self._store._write() as conn:
            if failure is None:
                conn.execute(
                    update(users)
                    .where(users.c.id == user.id)
                    .values(failed_logins=0, locked_until=None)
                )
                user = replace(user, failed_logins=0, locked_until=None)
                session = self._new_session(conn, user, now)
                self.audit._insert(conn, user.username, user.role, LOGIN, client=client)
                return session
            self.audit._insert(
                conn,
                user.username,
                user.role,
                LOGIN_FAILED,
                detail={"reason": failure},
                client=client,
            )
            if failure == "wrong password":
                self._count_failure(conn, user, now, client)
        raise AuthError

    def _count_failure(self, conn: Connection, user: User, now: float, client: str | None) -> None:
        conn.execute(
            update(users)
            .where(users.c.id == user.id)
            .values(failed_logins=users.c.failed_logins + 1)
        )
        failures = int(
            conn.execute(select(users.c.failed_logins).where(users.c.id == user.id)).scalar_one()
        )
        if failures < self.lockout_threshold:
            return
        doublings = min(failures - self.lockout_threshold, 30)
        seconds = min(self.lockout_base_s * 2**doublings, self.lockout_max_s)
        conn.execute(update(users).where(users.c.id == user.id).values(locked_until=now + seconds))
        detail = {"failures": failures, "seconds": seconds}
        self.audit._insert(conn, user.username, user.role, LOCKOUT, detail=detail, client=client)

    # ----------------------------------------------------------------------------- sessions
    def validate(self, token: str | None, client: str | None = None) -> User | None:
        """The user of a live session, or None (unknown, revoked, idle or too old, disabled).

        A session found expired is revoked and its expiry recorded in the audit log.
        """
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            return None
        token_hash = _token_hash(token)
        now = self._clock()
        stmt = (
            select(sessions.c.last_seen, sessions.c.expires_at, sessions.c.revoked, *_USER_COLUMNS)
            .join(users, users.c.id == sessions.c.user_id)
            .where(sessions.c.token_hash == token_hash)
        )
        with self._store.engine.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None or row.revoked:
            return None
        user = _user(row)
        expiry = None
        if user.disabled:
            expiry = "user disabled"
        elif now >= row.expires_at:
            expiry = "maximum age"
        elif now - row.last_seen > self.idle_timeout_s:
            expiry = "idle"
        if expiry is not None:
            with self._store._write() as conn:
                if _revoke(conn, token_hash):
                    self.audit._insert(
                        conn,
                        user.username,
                        user.role,
                        SESSION_EXPIRED,
                        detail={"reason": expiry},
                        client=client,
                    )
            return None
        if now - row.last_seen >= _TOUCH_EVERY_S:
            with self._store._write() as conn:
                conn.execute(
                    update(sessions)
                    .where(sessions.c.token_hash == token_hash)
                    .values(last_seen=now)
                )
        return user

    def revoke(self, token: str | None, client: str | None = None) -> bool:
        """Log out: end the session. False when it was unknown or ended already."""
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            return False
        token_hash = _token_hash(token)
        with self._store._write() as conn:
            row = conn.execute(
                select(users.c.username, users.c.role)
                .join(sessions, users.c.id == sessions.c.user_id)
                .where(sessions.c.token_hash == token_hash)
            ).first()
            if row is None or not _revoke(conn, token_hash):
                return False
            self.audit._insert(conn, row.username, row.role, LOGOUT, client=client)
        return True

    def _new_session(self, conn: Connection, user: User, now: float) -> Session:
        # Sessions past their maximum age can never be valid again: each login clears them, so
        # the table holds only sessions that are open or were ended early (the audit log keeps
        # the history of logins, logouts and expiries).
        conn.execute(delete(sessions).where(sessions.c.expires_at <= now))
        token = secrets.token_urlsafe(32)
        expires_at = now + self.max_age_s
        conn.execute(
            sessions.insert().values(
                token_hash=_token_hash(token),
                user_id=user.id,
                created_at=now,
                last_seen=now,
                expires_at=expires_at,
                revoked=False,
            )
        )
        return Session(token=token, user=user, created_at=now, expires_at=expires_at)

    # -------------------------------------------------------------------------------- helpers
    def _existing(self, username: str) -> User:
        user = self.get_user(username)
        if user is None:
            raise AccountError(
                f"no user named {username.strip().lower()}; `aidx users list` shows the accounts"
            )
        return user

    def _set_disabled(self, username: str, disabled: bool, actor: User | str) -> User:
        user = self._existing(username)
        with self._store._write() as conn:
            conn.execute(update(users).where(users.c.id == user.id).values(disabled=disabled))
            if disabled:
                _revoke_all(conn, user.id)
            action = USER_DISABLED if disabled else USER_ENABLED
            self.audit._insert(conn, *_who(actor), action, detail={"user": user.username})
        return self._existing(user.username)


_USER_COLUMNS = [c for c in users.c if c.name != "password_hash"]


def _username(username: str) -> str:
    name = username.strip().lower()
    if not _USERNAME.match(name):
        raise AccountError(
            f"user name {username!r}: use 1 to 64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _user(row: Row[Any]) -> User:
    return User(
        id=row.id,
        username=row.username,
        display_name=row.display_name,
        organisation=row.organisation,
        role=row.role,
        language=row.language,
        disabled=bool(row.disabled),
        created_at=row.created_at,
        password_changed_at=row.password_changed_at,
        failed_logins=row.failed_logins,
        locked_until=row.locked_until,
    )


def _who(actor: User | str) -> tuple[str, str | None]:
    return (actor.username, actor.role) if isinstance(actor, User) else (actor, None)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _revoke(conn: Connection, token_hash: str) -> bool:
    result = conn.execute(
        update(sessions)
        .where(sessions.c.token_hash == token_hash, sessions.c.revoked.is_(False))
        .values(revoked=True)
    )
    return result.rowcount > 0


def _revoke_all(conn: Connection, user_id: int) -> None:
    conn.execute(
        update(sessions)
        .where(sessions.c.user_id == user_id, sessions.c.revoked.is_(False))
        .values(revoked=True)
    )
