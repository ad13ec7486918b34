"""Work in daemon threads: a background loop that its owner can wake early and stop (the node's
study assembler, its export worker and the job publisher share this shape), and a uvicorn server
(the review app, the DICOMweb service)."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn


class BackgroundLoop:
    """Subclasses implement :meth:`_run`, looping until ``self._stop`` is set and waiting with
    :meth:`_sleep`; :meth:`notify` ends a wait early."""

    thread_name = "aidx-background"
    join_timeout_s = 10.0

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)

    def notify(self, *_args: Any) -> None:
        """Something changed: look now rather than at the end of the current wait."""
        self._wake.set()

    def _sleep(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: until notified); whether it was notified."""
        woken = self._wake.wait(timeout)
        self._wake.clear()
        return woken

    def _run(self) -> None:
        raise NotImplementedError


def serve_uvicorn(server: uvicorn.Server, sock: socket.socket, name: str) -> threading.Thread:
    """Run a uvicorn ``server`` on the bound ``sock`` in a daemon thread named ``name`` (the
    review app and the DICOMweb service); stop it with ``server.should_exit = True``. Off the
    main thread uvicorn leaves the signals alone: the main thread keeps them."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    return thread
