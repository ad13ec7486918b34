"""Who may read what aidx writes: the data folder's modes and the TLS private keys.

Everything under ``data_dir`` (the store's ``aidx.db`` and its ``-wal``/``-shm``, the spool,
results, signed reports, exports, temporary files) holds patient data. Files are 0640 and
folders 0750: the owner writes, the service's group reads, other users see nothing. The SQLite
store also holds the review app's password hashes and session hashes: it is 0600
(:data:`STORE_FILE_MODE`), made so by :func:`create_private_file` before SQLite opens it
(SQLite gives its ``-wal`` and ``-shm`` the database file's mode). Secret keys: :mod:`aidx.keys`.

- Every aidx command runs under the umask :data:`DATA_UMASK` (:func:`private_umask`), so what
  it creates gets those modes whichever library creates it (SQLite, pydicom, highdicom);
  where aidx opens a file itself it also asks for the mode.
- A data folder made by an older aidx, or by hand, is tightened at start
  (:func:`tighten_data_dir`): the folder itself, what lies directly in it, and the SQLite store
  (to 0600).
  Not a walk of the tree: a 0750 folder already keeps other users from everything below it.
- A TLS private key that others can read is refused at start (:func:`private_key_problem`),
  the rule PostgreSQL applies to its server key: owned by the user aidx runs as, mode 0600 or
  less; owned by root, 0640 or less (a group such as ``ssl-cert`` may read it).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from aidx.keys import KEYS_DIR, LOOSE_KEYS

log = logging.getLogger("aidx.permissions")

DATA_UMASK = 0o027
FILE_MODE = 0o640
DIR_MODE = 0o750
STORE_FILE_MODE = 0o600  # the SQLite store: password hashes
_STORE_MASK = 0o077
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


@contextmanager
def private_umask() -> Iterator[None]:
    """Run the block under :data:`DATA_UMASK` (the process's umask: every thread), then put
    the previous umask back."""
    previous = os.umask(DATA_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def _tighten(path: Path, mask: int = DATA_UMASK) -> None:
    """Remove the ``mask`` bits (default: group write and all access by others) from ``path``
    (never a symbolic link's target: a link in the data folder may point at a folder that is
    not aidx's)."""
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # a data folder that is a file: the
        return  # command that uses it says so
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return
    mode = stat.S_IMODE(st.st_mode)
    tight = mode & ~mask
    if tight == mode:
        return
    try:
        path.chmod(tight)
    except OSError as exc:  # e.g. owned by another user on a shared storage root
        log.warning(
            "%s is mode %04o, readable by other users, and cannot be changed (%s): "
            "run chmod %04o %s",
            path,
            mode,
            exc.strerror,
            tight,
            path,
        )
        return
    log.warning(
        "%s was mode %04o; changed to %04o (aidx data is not for other users)", path, mode, tight
    )


def tighten_data_dir(data_dir: Path, sqlite_path: Path | None = None) -> None:
    """Tighten an existing data folder: itself, each entry directly in it, and the SQLite
    store ``sqlite_path`` (with its ``-wal``, ``-shm`` and ``-journal``, to 0600) wherever it
    lies. Nothing happens to a folder that does not exist yet (the umask makes it right)."""
    data_dir = Path(data_dir)
    if sqlite_path is not None:
        for suffix in SQLITE_SUFFIXES:
            _tighten(sqlite_path.with_name(sqlite_path.name + suffix), _STORE_MASK)
    if data_dir.is_dir():
        _tighten(data_dir)
        try:
            entries = list(data_dir.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            # Secret keys are refused, not changed, when wider (aidx.keys): whoever loosened
            # one must hear of it.
            if entry.name not in (KEYS_DIR, *LOOSE_KEYS):
                _tighten(entry)


def create_private_file(path: Path, mode: int = STORE_FILE_MODE) -> None:
    """Create ``path`` empty with ``mode`` if it does not exist (its folder too), so that a
    library that opens it next (SQLite) keeps that mode; an existing file is left as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URL; None for other stores and memory."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url.removeprefix(prefix).split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def private_key_problem(path: Path, euid: int | None = None) -> str | None:
    """Why the private key ``path`` must not be used, or None: it is not a readable file, or
    other users can read it. ``euid``: the user aidx runs as (default: this process's)."""
    path = Path(path)
    euid = os.geteuid() if euid is None else euid
    try:
        st = path.stat()
    except OSError as exc:
        return f"private key {path} cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"private key {path} is not a file"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0:
        forbidden, rule = 0o037, "owned by root, 0640 or less"  # group read: e.g. ssl-cert
    elif st.st_uid == euid:
        forbidden, rule = 0o077, "0600 or less"
    else:
        return (
            f"private key {path} is owned by user id {st.st_uid}, neither the user aidx runs "
            f"as ({euid}) nor root: chown it to that user and run chmod 600 {path}"
        )
    if mode & forbidden:
        return (
            f"private key {path} has mode {mode:04o}, so other users can read it ({rule} is "
            f"allowed); refused. Run: chmod 600 {path}"
        )
    return None


def check_private_key(path: Path, what: str) -> None:
    """Raise ValueError, naming ``what`` (e.g. ``node.tls.private_key``), when the key at
    ``path`` must not be used (:func:`private_key_problem`)."""
    problem = private_key_problem(path)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
