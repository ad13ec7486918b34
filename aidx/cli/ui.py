"""`aidx ui` (the review app alone) and the review app inside `aidx serve`."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from typing import TYPE_CHECKING, Any

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.store.store import Store

log = logging.getLogger("aidx.cli")

DEMO_USER = "demo"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ui = sub.add_parser("ui", help="run the radiologist review app alone (aidx serve runs it too)")
    ui.add_argument("--host", dest="ui_host", help="override ui.host")
    ui.add_argument("--port", dest="ui_port", type=int, help="override ui.port")
    # `aidx serve --demo` runs the review app as `aidx ui --demo`: the demo's account.
    ui.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    ui.set_defaults(handler=run_ui)


def start_ui(config: AidxConfig, store: Store, demo: bool = False) -> object | None:
    """Start the review app in a thread (for `aidx serve`); None when ui.enabled is false.
    Raises ValueError (refusal: HTTPS beyond loopback) or OSError (port in use)."""
    if not config.ui.enabled:
        return None
    from ui.web import UiServer

    server = UiServer(config, store)
    server.start()
    _announce(config, server, demo)
    return server


def _announce(config: AidxConfig, server: Any, demo: bool) -> None:
    """The review app's address, and how to sign in (the demo's account, or how to add one)."""
    password = ensure_demo_user(server.ctx.accounts) if demo else None
    print(f"aidx review app: {server.url}", flush=True)
    if password:
        print(
            f"  sign in as '{DEMO_USER}' (radiologist) with password: {password}\n"
            "  (shown once; `aidx users passwd demo` sets another, `aidx users add` adds users)",
            flush=True,
        )
    elif demo:
        print(
            f"  sign in as '{DEMO_USER}' with the password printed at the first `make run` "
            f"(forgotten: aidx --data-dir {config.data_dir} users passwd {DEMO_USER})",
            flush=True,
        )
    else:
        _no_accounts_hint(config, server.ctx.accounts)


def _no_accounts_hint(config: AidxConfig, accounts: object) -> None:
    """With no account yet, nobody can sign in: say how to add the first one."""
    from ui.accounts import Accounts

    assert isinstance(accounts, Accounts)
    if not accounts.list_users():
        print(
            "  no accounts yet: add one with "
            f"`aidx --data-dir {config.data_dir} users add NAME --role admin --name 'FAMILY^Given'`"
            " (it asks for the password; roles: radiologist, engineer, admin)",
            flush=True,
        )


def ensure_demo_user(accounts: object) -> str | None:
    """The demo's radiologist account, created once with a random password (returned then)."""
    from ui.accounts import Accounts

    assert isinstance(accounts, Accounts)
    if accounts.get_user(DEMO_USER) is not None:
        return None
    password = secrets.token_urlsafe(12)
    accounts.add_user(
        DEMO_USER,
        password,
        role="radiologist",
        display_name="Demo^Radiologist",
        organisation="aidx demo",
    )
    return password


def run_ui(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.store import Store
    from ui.web import UiServer

    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.for_config(config)
        server = UiServer(config, store)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx ui: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _announce(config, server, bool(getattr(args, "demo", False)))
    try:
        server.run()
    finally:
        store.close()
    return EXIT_OK
