"""Client side of the node's commands: C-ECHO and collecting files to send."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association

from aidx.config import DestinationConfig

from .tls import client_context

VERIFICATION = UID("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 Annex A)


def echo(destination: DestinationConfig, calling_ae: str) -> tuple[bool, str]:
    """C-ECHO ``destination``; returns whether it succeeded and what happened."""
    ae = AE(ae_title=destination.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(VERIFICATION)
    tls_args = (
        (client_context(destination.tls), destination.host) if destination.tls.enabled else None
    )
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        return False, "association rejected" if assoc.is_rejected else "no association"
    no_delay(assoc)
    try:
        settle_reactor(assoc)
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(getattr(rsp, "Status", -1)) if rsp else -1
    return (code == 0, "success") if code == 0 else (False, f"status 0x{code:04X}")


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and every file under folders named (hidden files skipped), sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not files:
        raise FileNotFoundError("no files to send in the paths given")
    return files


def no_delay(assoc: Association) -> None:
    """Switch off Nagle's algorithm on an association's socket.

    pynetdicom leaves it on; with small DIMSE messages answered by delayed ACKs, each message
    then waits about 40 ms on loopback.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def settle_reactor(assoc: Association, quiet_s: float = 0.003) -> None:
    """Make sure pynetdicom's reactor thread is parked before a DIMSE request is sent.

    pynetdicom 3.0 pauses its reactor inside ``send_*`` by clearing an event and waiting for a
    flag, but the flag can read "paused" while the reactor is just past the event; with a fast
    peer (TCP_NODELAY on loopback) the reactor then takes the response off the queue ("Received
    unexpected C-STORE service message") and the request waits for the DIMSE timeout. Here the
    event is cleared and the flag must stay set for a few milliseconds: a reactor that got past
    the event clears the flag within microseconds, a parked one never does.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return  # another pynetdicom version: nothing to do
    checkpoint.clear()
    deadline = time.monotonic() + 5.0
    parked_since: float | None = None
    while time.monotonic() < deadline:
        if assoc._is_paused:  # private on purpose: see the docstring
            parked_since = parked_since or time.monotonic()
            if time.monotonic() - parked_since >= quiet_s:
                return
        else:
            parked_since = None
        time.sleep(0.0002)
