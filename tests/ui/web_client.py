"""The review app's web layer for a test, without a study: a fresh data folder and store, users
``rad`` (radiologist) and ``eng`` (engineer) with tests.ui.reviewed_study's PASSWORD, and the app
of ui.web.create_app on them (its ``ui.*`` settings as given)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from aidx.config import load_config
from aidx.store.store import Store
from tests.ui.reviewed_study import PASSWORD
from ui.accounts import Accounts
from ui.review import Reviews
from ui.web import SessionGate, UiContext, create_app


@dataclass
class WebApp:
    api: FastAPI
    gate: SessionGate
    ctx: UiContext


def empty_app(root: Path, **ui: Any) -> WebApp:
    config = load_config(
        env={}, overrides={"data_dir": str(root), **{f"ui.{k}": v for k, v in ui.items()}}
    )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.for_config(config)
    accounts = Accounts(store)
    accounts.add_user("rad", PASSWORD, role="radiologist", display_name="Smith^Anna")
    accounts.add_user("eng", PASSWORD, role="engineer", display_name="Engineer")
    ctx = UiContext(config, store, accounts, Reviews(store, accounts.audit))
    return WebApp(*create_app(ctx), ctx)
