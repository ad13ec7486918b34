"""Paths in the store, relative to the storage root (storage.root, else data_dir).

The store records every file it lists (received instances, results, signed reports, outbox
items) relative to the storage root, so that a host that mounts a shared root at another path,
or a backup restored into another folder, finds the files with the same rows. The conversion
happens at the store's boundary, so the code that uses the paths sees absolute ones as before:
the columns below use :class:`StoredPath` / :class:`StoredPathList`, which write a path under the
root as relative and read a relative one back joined to the root. A path outside the root, and
a row written before paths were relative, is absolute and passes unchanged both ways.

The root is the engine's: :class:`aidx.store.store.Store` sets it on its engine's dialect (each
engine has its own dialect object), where these types find it when SQLAlchemy converts a value.
A store opened without a root (tests, tools that read rows only) passes every value unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

_ROOT_ATTRIBUTE = "aidx_storage_root"


def root_prefix(root: Path | str | None) -> str:
    """The storage root as the prefix of the paths under it ("" without a root)."""
    if root is None:
        return ""
    prefix = str(Path(root).resolve())
    return prefix if prefix.endswith(os.sep) else prefix + os.sep


def set_root(dialect: Dialect, root: Path | str | None) -> None:
    """Make ``dialect`` (one engine's) convert paths against ``root``."""
    setattr(dialect, _ROOT_ATTRIBUTE, root_prefix(root))


def _prefix(dialect: Dialect) -> str:
    return str(getattr(dialect, _ROOT_ATTRIBUTE, ""))


def to_stored(path: str, prefix: str) -> str:
    """``path`` as the store records it: relative when under the root (one string operation:
    this runs for every received instance)."""
    if prefix and path.startswith(prefix):
        return path[len(prefix) :]
    return path


def from_stored(value: str, prefix: str) -> str:
    """A recorded path as the code uses it: absolute, under this host's root when relative."""
    if not prefix or value.startswith("/"):
        return value
    return prefix + value


class StoredPath(TypeDecorator[str]):
    """A file path, recorded relative to the storage root when it lies under it."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return to_stored(str(value), _prefix(dialect)) if value is not None else None

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return from_stored(str(value), _prefix(dialect)) if value is not None else None


class StoredPathList(TypeDecorator[str]):
    """A JSON list of file paths (the outbox's files), each as :class:`StoredPath` records it."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        prefix = _prefix(dialect)
        if value is None or not prefix:
            return value
        return json.dumps([to_stored(str(p), prefix) for p in json.loads(value)])

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        prefix = _prefix(dialect)
        if value is None or not prefix:
            return value
        return json.dumps([from_stored(str(p), prefix) for p in json.loads(value)])
