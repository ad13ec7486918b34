"""What several commands share: who ran the command (for the audit log), and opening the store
of an existing data folder."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.store.store import Store


class NoStoreError(ValueError):
    """No store where the configuration points: the message says what to give."""


def cli_actor() -> str:
    """Who ran the command, for the audit log: the operating-system account."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in a bare container
        return "cli"


def open_existing_store(config: AidxConfig) -> Store:
    """The store of a data folder that has one (a command that reads must not create an empty
    one where a wrong --data-dir points)."""
    from aidx.store.store import Store

    if config.store.url is None:
        db = (config.data_dir / "aidx.db").resolve()
        if not db.exists():
            raise NoStoreError(
                f"no store at {db}: give the node's data directory with --data-dir (or data_dir "
                "/ store.url in the configuration)"
            )
    return Store.for_config(config)
