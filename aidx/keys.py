"""aidx's own secret keys at rest: ``<data_dir>/keys/<name>.key``, files 0600 in a 0700 folder.

A key here is made by aidx, once, on first use (``os.O_EXCL``: two processes starting at once
cannot make two different keys), and kept: a new key would change what it derives (the
de-identified export's UIDs, :mod:`aidx.deidentify`). Only the user aidx runs as may read
one, so the rule is stricter than the data folder's (0640/0750, :mod:`aidx.permissions`):
a key file wider than 0600, or a keys folder wider than 0700, is refused with the command that
fixes it, when the key is used and when any aidx command starts (:func:`secret_problems`).
The feedback export's key, ``<data_dir>/feedback.key`` (made before this folder existed),
follows the same rule where it lies.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger("aidx.keys")

KEYS_DIR = "keys"
KEY_FILE_MODE = 0o600
KEYS_DIR_MODE = 0o700
KEY_BYTES = 32
# Secrets aidx keeps directly in the data folder (older than the keys folder).
LOOSE_KEYS = ("feedback.key",)


class SecretKeyError(ValueError):
    """A key that must not be used: the message names the file and the fix."""


def _problem(path: Path, is_dir: bool, euid: int) -> str | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    kind, allowed, fix = (
        ("folder", KEYS_DIR_MODE, f"chmod 700 {path}")
        if is_dir
        else ("file", KEY_FILE_MODE, f"chmod 600 {path}")
    )
    if stat.S_ISLNK(st.st_mode) or (stat.S_ISDIR(st.st_mode) != is_dir):
        return f"{path} is not a {kind}: aidx keeps its secret keys in plain files and folders"
    if st.st_uid != euid:
        return (
            f"{path} is owned by user id {st.st_uid}, not by the user aidx runs as ({euid}): "
            f"chown it to that user and run {fix}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~allowed & 0o777:
        return (
            f"secret key {kind} {path} has mode {mode:04o}, so other users can reach it "
            f"({allowed:04o} or less is allowed); refused. Run: {fix}"
        )
    return None


def secret_problems(data_dir: Path, euid: int | None = None) -> list[str]:
    """What is wrong with the secret keys under ``data_dir`` (empty when nothing is): the keys
    folder and every file in it, and the keys kept loose in the data folder."""
    euid = os.geteuid() if euid is None else euid
    folder = Path(data_dir) / KEYS_DIR
    found = [_problem(folder, True, euid)]
    if folder.is_dir() and not folder.is_symlink():
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            entries = []
        found += [_problem(p, False, euid) for p in entries]
    found += [_problem(Path(data_dir) / name, False, euid) for name in LOOSE_KEYS]
    return [p for p in found if p is not None]


def secret_key(data_dir: Path, name: str) -> bytes:
    """The key ``<data_dir>/keys/<name>.key``, made on first use (:func:`key_file`). Raises
    :class:`SecretKeyError` naming the file and the fix when it or its folder can be reached by
    other users, or the file does not hold a key."""
    if not name.isidentifier():
        raise ValueError(f"a key name is a word, not {name!r}")
    folder = Path(data_dir) / KEYS_DIR
    folder.mkdir(mode=KEYS_DIR_MODE, parents=True, exist_ok=True)
    problem = _problem(folder, True, os.geteuid())
    if problem is not None:
        raise SecretKeyError(problem)
    return key_file(folder / f"{name}.key")


def key_file(path: Path) -> bytes:
    """The key in ``path`` (32 random bytes, as hex), written first if the file does not exist
    (mode 0600; ``O_EXCL``: two processes starting at once cannot write two different keys).
    Raises :class:`SecretKeyError` naming the file and the fix when other users can reach it,
    another user owns it, or it does not hold a key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("created the secret key %s; keep it with the data folder's backups", path)
    problem = _problem(path, False, os.geteuid())
    if problem is not None:
        raise SecretKeyError(problem)
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretKeyError(
            f"{path} does not hold a key ({2 * KEY_BYTES} hex digits): restore it from the "
            "backup of the data folder (a new key changes everything derived from it)"
        )
    return key
