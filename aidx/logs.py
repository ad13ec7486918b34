"""Logging set-up for every aidx command: plain text for people, JSON lines for collectors.

Log UIDs, AE titles and paths; never patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra=`` fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _RequestorConnectFailures(logging.Filter):
    """pynetdicom logs two ERROR lines ("Association request failed", "TCP Initialisation
    Error") whenever a connection it requests fails. aidx's requestors (the outbox, ``aidx
    send``/``echo``) report that failure themselves, with the destination and what happens
    next, so these lines are dropped unless pynetdicom is logged at DEBUG."""

    PREFIXES = ("Association request failed", "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            return True
        return not str(record.msg).startswith(self.PREFIXES)


_CONNECT_FAILURES = _RequestorConnectFailures()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process (later calls replace the handler)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every DIMSE message at INFO: hundreds of lines per study, and slow.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
    transport = logging.getLogger("pynetdicom.transport")
    if _CONNECT_FAILURES not in transport.filters:
        transport.addFilter(_CONNECT_FAILURES)
    logging.getLogger("highdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
