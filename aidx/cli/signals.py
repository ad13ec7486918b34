"""Stopping a long-running command (serve, worker, outbox run) cleanly on SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("aidx.cli")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (logged), for the command's main thread to wait on."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop
