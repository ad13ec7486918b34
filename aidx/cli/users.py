"""`aidx users` and `aidx audit`: the review app's accounts and its audit log (issue 7).

Thin wrappers over :mod:`ui.accounts`, imported only when a command runs. Passwords are read with
getpass (twice) or, for scripts, as one line from standard input; they are never printed, and
neither are their hashes.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
import unicodedata
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.store.store import Store
    from ui.accounts import User
    from ui.audit import AuditEntry

# The same as ui.accounts.ROLES and LANGUAGES (a test keeps them equal): the parser is built for
# every command, and must not import the review app to be built.
ROLES = ("radiologist", "engineer", "admin")
LANGUAGES = ("en", "zh")


class _UsageError(Exception):
    pass


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``users`` and ``audit`` commands."""
    users = sub.add_parser("users", help="add, disable or list the review app's accounts")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = users_sub.add_parser("add", help="create an account (asks for its password)")
    add.add_argument("username", metavar="USERNAME")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--name", required=True, dest="display_name", help="the name to show")
    add.add_argument("--organisation", default="", help="shown with the name on signed reports")
    add.add_argument("--language", choices=LANGUAGES, default="en", help="interface language")
    _password_argument(add)
    add.set_defaults(handler=users_add)
    disable = users_sub.add_parser("disable", help="refuse an account's logins, end its sessions")
    disable.add_argument("username", metavar="USERNAME")
    disable.set_defaults(handler=users_disable)
    enable = users_sub.add_parser("enable", help="allow a disabled account to log in again")
    enable.add_argument("username", metavar="USERNAME")
    enable.set_defaults(handler=users_enable)
    passwd = users_sub.add_parser(
        "passwd", help="set an account's password (also unlocks it and ends its sessions)"
    )
    passwd.add_argument("username", metavar="USERNAME")
    _password_argument(passwd)
    passwd.set_defaults(handler=users_passwd)
    users_sub.add_parser("list", help="the accounts, their roles and states").set_defaults(
        handler=users_list
    )

    audit = sub.add_parser("audit", help="show or export the review app's audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    export = audit_sub.add_parser("export", help="write the audit log as CSV")
    export.add_argument("out", type=Path, metavar="OUT.csv")
    _filter_arguments(export)
    export.set_defaults(handler=audit_export)
    listing = audit_sub.add_parser("list", help="the latest audit entries, newest first")
    listing.add_argument("--limit", type=int, default=50, help="entries to show (default 50)")
    _filter_arguments(listing)
    listing.set_defaults(handler=audit_list)


def _password_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password as one line from standard input (for scripts)",
    )


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since", type=_when, metavar="DATE", help="e.g. 2024-05-01 or 2024-05-01T08:00"
    )
    p.add_argument("--until", type=_when, metavar="DATE", help="entries before this time")
    p.add_argument("--user", dest="username", metavar="USERNAME")
    p.add_argument("--action", help="e.g. login, login_failed, lockout")


def _when(text: str) -> datetime:
    """An ISO 8601 date or time; without a UTC offset it is local time."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None


# ------------------------------------------------------------------------------------ users
def users_add(args: argparse.Namespace, config: AidxConfig) -> int:
    from ui.accounts import AccountError, Accounts

    store = _open_store(config, create=True)
    try:
        accounts = Accounts(store)
        # Before asking for a password that could not be used.
        if accounts.get_user(args.username) is not None:
            raise AccountError(f"a user named {args.username.strip().lower()} exists already")
        password = _read_password(args, args.username)
        user = accounts.add_user(
            args.username,
            password,
            display_name=args.display_name,
            role=args.role,
            organisation=args.organisation,
            language=args.language,
            actor=_actor(),
        )
    except (AccountError, _UsageError) as exc:
        return _fail("users add", exc)
    finally:
        store.close()
    print(f"added {user.role} {user.username} ({user.display_name})")
    return EXIT_OK


def users_disable(args: argparse.Namespace, config: AidxConfig) -> int:
    from ui.accounts import AccountError, Accounts

    try:
        store = _open_store(config)
        try:
            user = Accounts(store).disable_user(args.username, actor=_actor())
        finally:
            store.close()
    except (AccountError, _UsageError) as exc:
        return _fail("users disable", exc)
    print(f"disabled {user.username}; its sessions are ended")
    return EXIT_OK


def users_enable(args: argparse.Namespace, config: AidxConfig) -> int:
    from ui.accounts import AccountError, Accounts

    try:
        store = _open_store(config)
        try:
            user = Accounts(store).enable_user(args.username, actor=_actor())
        finally:
            store.close()
    except (AccountError, _UsageError) as exc:
        return _fail("users enable", exc)
    print(f"enabled {user.username}")
    return EXIT_OK


def users_passwd(args: argparse.Namespace, config: AidxConfig) -> int:
    from ui.accounts import AccountError, Accounts

    try:
        store = _open_store(config)
        try:
            accounts = Accounts(store)
            user = accounts.get_user(args.username)
            if user is None:
                raise AccountError(
                    f"no user named {args.username}; `aidx users list` shows the accounts"
                )
            password = _read_password(args, user.username)
            accounts.set_password(user.username, password, actor=_actor())
        finally:
            store.close()
    except (AccountError, _UsageError) as exc:
        return _fail("users passwd", exc)
    print(f"password of {user.username} changed; its sessions are ended")
    return EXIT_OK


def users_list(args: argparse.Namespace, config: AidxConfig) -> int:
    del args
    from ui.accounts import Accounts
    from ui.audit import format_time

    try:
        store = _open_store(config)
    except _UsageError as exc:
        return _fail("users list", exc)
    try:
        users = Accounts(store).list_users()
    finally:
        store.close()
    now = time.time()
    if not users:
        print("no users; add one with `aidx users add USERNAME --role admin --name NAME`")
        return EXIT_OK
    rows = [("USER", "ROLE", "NAME", "ORGANISATION", "LANG", "STATE", "PASSWORD SET")]
    rows += [
        (
            u.username,
            u.role,
            u.display_name,
            u.organisation or "-",
            u.language,
            _state(u, now),
            format_time(u.password_changed_at),
        )
        for u in users
    ]
    _print_table(rows)
    return EXIT_OK


def _state(user: User, now: float) -> str:
    if user.disabled:
        return "disabled"
    if user.locked_until is not None and user.locked_until > now:
        return f"locked {round(user.locked_until - now)} s"
    return "active"


# ------------------------------------------------------------------------------------ audit
def audit_export(args: argparse.Namespace, config: AidxConfig) -> int:
    from ui.audit import Audit

    try:
        store = _open_store(config)
    except _UsageError as exc:
        return _fail("audit export", exc)
    try:
        count = Audit(store).export_csv(
            args.out, since=args.since, until=args.until, username=args.username, action=args.action
        )
    except OSError as exc:
        return _fail("audit export", f"cannot write {args.out}: {exc.strerror or exc}")
    finally:
        store.close()
    print(f"wrote {count} audit entries to {args.out}")
    return EXIT_OK


def audit_list(args: argparse.Namespace, config: AidxConfig) -> int:
    from ui.audit import Audit

    if args.limit < 1:
        return _fail("audit list", f"--limit must be at least 1, not {args.limit}")
    try:
        store = _open_store(config)
    except _UsageError as exc:
        return _fail("audit list", exc)
    try:
        entries = Audit(store).query(
            since=args.since,
            until=args.until,
            username=args.username,
            action=args.action,
            limit=args.limit,
        )
    finally:
        store.close()
    if not entries:
        print("no audit entries")
        return EXIT_OK
    header = ("TIME", "USER", "ROLE", "ACTION", "STUDY", "CLIENT", "DETAIL")
    _print_table([header, *map(_entry_row, entries)])
    return EXIT_OK


def _entry_row(e: AuditEntry) -> tuple[str, ...]:
    from ui.audit import format_time

    detail = ", ".join(f"{k}={v}" for k, v in e.detail.items())
    return (
        format_time(e.at),
        e.username,
        e.role or "-",
        e.action,
        e.study_uid or "-",
        e.client or "-",
        detail or "-",
    )


# ---------------------------------------------------------------------------------- helpers
def _open_store(config: AidxConfig, create: bool = False) -> Store:
    from aidx.store.store import Store

    if config.store.url is None:
        db = (config.data_dir / "aidx.db").resolve()
        if create:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        elif not db.exists():
            raise _UsageError(
                f"no store at {db}: give the node's data directory with --data-dir (or data_dir "
                "/ store.url in the configuration), or add a user first with `aidx users add`"
            )
    return Store.for_config(config)


def _read_password(args: argparse.Namespace, username: str) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise _UsageError("--password-stdin: standard input held no password line")
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass(f"new password for {username}: ")
        second = getpass.getpass("the same password again: ")
    except EOFError:
        raise _UsageError("no password was entered; nothing was changed") from None
    if first != second:
        raise _UsageError("the two passwords differ; nothing was changed")
    return first


def _actor() -> str:
    """Who ran the command, for the audit log: the operating-system account."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in a bare container
        return "cli"


def _fail(command: str, problem: object) -> int:
    print(f"aidx {command}: {problem}", file=sys.stderr)
    return EXIT_USAGE


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell + " " * (w - _width(cell)) for cell, w in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _width(text: str) -> int:
    """Terminal columns: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)
