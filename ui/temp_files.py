"""The review app's temporary files: Gradio's cache (its copies of the finding thumbnails:
patient images). The slices themselves never touch the disk: the page fetches them from the
viewer routes (ui.volume_route, ui.slice_route).

They live in one folder of this process under the data folder,
``<data_dir>/ui-temp/<host>_<pid>_*`` (``gradio/`` in it), never in the shared
``/tmp``: folders 0750, files 0640 (aidx.permissions). Gradio writes its own files with the
process umask, so the server makes sure it holds 027 (:func:`tighten_umask`). The folder is
removed when the server stops; folders left by processes of this host that are gone (a crash)
are removed at start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Final

from aidx.permissions import DATA_UMASK, DIR_MODE

log = logging.getLogger("aidx.ui.temp")

FOLDER: Final = "ui-temp"


def tighten_umask() -> int:
    """Add aidx's DATA_UMASK (027) to the process umask, never loosening it (``aidx`` commands
    run under it already; this covers the server made in other ways); returns the one before."""
    before = os.umask(DATA_UMASK)
    os.umask(before | DATA_UMASK)
    return before


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.chmod(DIR_MODE)  # mkdir's mode passes through the umask
    return path


class UiTemp:
    """This process's temporary folder of the review app (created on first use)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / FOLDER
        self._path: Path | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        with self._lock:
            if self._path is None:
                _mkdir(self.root)
                self._remove_stale()
                prefix = f"{_host()}_{os.getpid()}_"
                self._path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
                self._path.chmod(DIR_MODE)
            return self._path

    def gradio_dir(self) -> Path:
        """Gradio's cache (GRADIO_TEMP_DIR)."""
        return _mkdir(self.path / "gradio")

    def remove(self) -> None:
        """Remove this process's folder (at stop)."""
        with self._lock:
            path, self._path = self._path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def _remove_stale(self) -> None:
        host = _host()
        for entry in self.root.iterdir():
            name_host, _, rest = entry.name.partition("_")
            pid_text = rest.partition("_")[0]
            if name_host != host or not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                log.info("removing the review app's temporary files of a stopped process")
                shutil.rmtree(entry, ignore_errors=True)
            except OSError:  # alive under another user (EPERM)
                continue


def use_for_gradio(temp: UiTemp) -> None:
    """Point Gradio's cache at ``temp`` (before any Blocks is made: components read it then)."""
    os.environ["GRADIO_TEMP_DIR"] = str(temp.gradio_dir())
