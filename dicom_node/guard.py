"""Admission control for the node's TCP connections, before and during association requests.

pynetdicom gives each connection a thread and counts it against ``maximum_associations`` from
the moment it is accepted, while it waits (with no deadline on the whole request) for the
A-ASSOCIATE-RQ PDU. A handful of slow or silent connections could therefore hold every slot,
and the allow-list, which applies once the request has arrived, cannot help. Here:

- a connection is *pending* until its whole A-ASSOCIATE-RQ has arrived; the request (and the TLS
  handshake before it) must be complete within ``node.association_request_timeout_s``, otherwise
  the connection is shut down;
- pending connections are bounded per peer address (``node.max_pending_per_address``; more are
  refused) and in all (``node.max_pending_connections``; past it the oldest pending connection is
  closed, not the newcomer), and every connection of one address, pending or associated, by
  ``node.max_connections_per_address``: no address, nor many slow ones, can take the slots;
- only associations whose request has arrived count against ``node.max_associations``.

Every refused or timed-out connection is logged once (peer address and reason; no AE titles are
known yet) and counted by reason for ``/metrics``.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aidx.config import NodeConfig

log = logging.getLogger("aidx.node")

# Reasons a connection is refused or closed, as counted in aidx_node_connections_refused_total.
ADDRESS_LIMIT = "address_limit"
PENDING_ADDRESS_LIMIT = "pending_address_limit"
PENDING_LIMIT = "pending_limit"
REQUEST_TIMEOUT = "request_timeout"
ASSOCIATION_LIMIT = "association_limit"
REASONS = (ADDRESS_LIMIT, PENDING_ADDRESS_LIMIT, PENDING_LIMIT, REQUEST_TIMEOUT, ASSOCIATION_LIMIT)


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, from accept until its association thread ends."""

    address: str
    sock: socket.socket
    deadline: float
    requested: bool = False
    closed: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        if self.closed or self.sock.fileno() == -1:
            return False
        return self.thread is None or self.thread.is_alive()


class ConnectionGuard:
    """Decides which connections may proceed, and shuts down the ones that are too slow."""

    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._deadlines: list[tuple[float, int, Connection]] = []
        self._sequence = 0
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.refused: Counter[str] = Counter()

    # ------------------------------------------------------------------------- life cycle
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._reap, name="aidx-node-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------------- decisions
    def admit(self, sock: socket.socket, address: str) -> Connection | None:
        """Register a newly accepted connection, or refuse it (logged, counted, closed)."""
        with self._lock:
            self._prune()
            from_address = [c for c in self._connections if c.address == address]
            pending = [c for c in self._connections if not c.requested]
            reason = why = ""
            if len(from_address) >= self.node.max_connections_per_address:
                reason = ADDRESS_LIMIT
                why = f"{len(from_address)} connections from this address already open "
                why += f"(node.max_connections_per_address {self.node.max_connections_per_address})"
            elif sum(not c.requested for c in from_address) >= self.node.max_pending_per_address:
                reason = PENDING_ADDRESS_LIMIT
                why = "too many association requests from this address still incomplete "
                why += f"(node.max_pending_per_address {self.node.max_pending_per_address})"
            evicted: Connection | None = None
            if not reason and len(pending) >= self.node.max_pending_connections:
                # Many addresses holding incomplete requests: the oldest one goes, not the
                # newcomer (a real request completes within milliseconds of connecting).
                evicted = min(pending, key=lambda c: c.deadline)
                evicted.closed = True
                self._connections.discard(evicted)
                self.refused[PENDING_LIMIT] += 1
            if reason:
                self.refused[reason] += 1
            else:
                deadline = time.monotonic() + self.node.association_request_timeout_s
                connection = Connection(address, sock, deadline)
                self._connections.add(connection)
                self._sequence += 1
                heapq.heappush(self._deadlines, (deadline, self._sequence, connection))
                self._wake.notify_all()
        if evicted is not None:
            log.warning(
                "connection from %s closed: the oldest of %d incomplete association requests "
                "(node.max_pending_connections)",
                evicted.address,
                len(pending),
            )
            _shutdown(evicted.sock)
        if not reason:
            return connection
        log.warning("connection from %s refused: %s", address, why)
        _close(sock)
        return None

    def requested(self, connection: Connection) -> str | None:
        """The whole A-ASSOCIATE-RQ has arrived: the connection stops being pending. Returns why
        the association must be rejected (the node's association limit), or None."""
        with self._lock:
            self._prune()
            connection.requested = True
            associated = sum(
                1 for c in self._connections if c.requested and c is not connection and c.alive
            )
            if associated < self.node.max_associations:
                return None
            self.refused[ASSOCIATION_LIMIT] += 1
        why = f"{associated} associations already open (node.max_associations)"
        log.warning("association from %s rejected: %s", connection.address, why)
        return why

    def release(self, connection: Connection) -> None:
        with self._lock:
            connection.closed = True
            self._connections.discard(connection)

    # ------------------------------------------------------------------------- figures
    def open_counts(self) -> tuple[int, int]:
        """(pending, associated) connections now."""
        with self._lock:
            self._prune()
            pending = sum(1 for c in self._connections if not c.requested)
            return pending, len(self._connections) - pending

    def collect(self) -> Iterable[Metric]:
        """Prometheus families (a collector for the metrics endpoint's registry)."""
        refused = CounterMetricFamily(
            "aidx_node_connections_refused",
            "TCP connections the node refused or closed before association, by reason",
            labels=["reason"],
        )
        with self._lock:
            counts = dict(self.refused)
        for reason in REASONS:
            refused.add_metric([reason], float(counts.get(reason, 0)))
        pending, associated = self.open_counts()
        open_ = GaugeMetricFamily(
            "aidx_node_connections_open", "Open connections to the node, by state", labels=["state"]
        )
        open_.add_metric(["pending"], float(pending))
        open_.add_metric(["associated"], float(associated))
        return [refused, open_]

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    # ------------------------------------------------------------------------- internals
    def _prune(self) -> None:
        """Forget connections whose thread has ended (lock held)."""
        dead = [c for c in self._connections if not c.alive]
        for connection in dead:
            self._connections.discard(connection)

    def expire(self, connection: Connection) -> None:
        """The connection's deadline has passed without a whole request: count, log and shut
        it, once, whichever of the reaper and the connection's own thread sees it first. The
        line is logged before ``closed`` is set: the connection's thread, seeing ``closed``,
        may close the socket at once, and the peer must not see the close before the log."""
        with self._lock:
            if connection.requested or not connection.alive:
                return
            log.warning(
                "connection from %s closed: no complete association request "
                "within %.1f s (node.association_request_timeout_s)",
                connection.address,
                self.node.association_request_timeout_s,
            )
            connection.closed = True
            self._connections.discard(connection)
            self.refused[REQUEST_TIMEOUT] += 1
        _shutdown(connection.sock)

    def _reap(self) -> None:
        """Shut down connections whose association request is overdue."""
        with self._lock:
            while not self._stop:
                now = time.monotonic()
                overdue: list[Connection] = []
                while self._deadlines and self._deadlines[0][0] <= now:
                    overdue.append(heapq.heappop(self._deadlines)[2])
                if overdue:
                    self._lock.release()
                    try:
                        for connection in overdue:
                            self.expire(connection)
                    finally:
                        self._lock.acquire()
                    continue
                timeout = self._deadlines[0][0] - now if self._deadlines else None
                self._wake.wait(timeout)


# Requests up to this size are awaited in the kernel's buffer (SO_RCVLOWAT), well within the
# default receive buffer; a larger one (hundreds of presentation contexts) is read by pynetdicom.
_AWAITED_REQUEST_MAX = 64 * 1024
_A_ASSOCIATE_RQ = 0x01


def await_request(sock: socket.socket, connection: Connection, guard: ConnectionGuard) -> bool:
    """Block, without polling, until the whole A-ASSOCIATE-RQ PDU has arrived on a plain TCP
    ``sock`` (peeked: the bytes stay for pynetdicom to read), the peer closes, or the guard
    shuts the connection at its deadline (or this thread sees it first and has the guard
    expire it). True when the request is there to be read.

    pynetdicom's reactor polls each connection a thousand times a second; a slow or silent
    connection waits here instead, so many of them cost no CPU. Something other than an
    A-ASSOCIATE-RQ is handed over at once (pynetdicom answers it).
    """
    try:
        wanted = 6
        while True:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
            remaining = connection.deadline - time.monotonic()
            if connection.closed:
                return False
            if remaining <= 0:
                guard.expire(connection)
                return False
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                continue  # the deadline: the guard shuts the connection
            data = sock.recv(wanted, socket.MSG_PEEK)
            if not data or connection.closed:
                return False  # the peer went, or the guard closed it
            if len(data) < wanted:
                continue  # woken early (a signal); the low-water mark still holds
            if wanted == 6:
                pdu_type, _, length = struct.unpack(">BBL", data[:6])
                if pdu_type != _A_ASSOCIATE_RQ or 6 + length > _AWAITED_REQUEST_MAX:
                    return True
                wanted = 6 + length
                continue
            return True
    except OSError:
        return not connection.closed
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _shutdown(sock: Any) -> None:
    """Wake a thread blocked reading ``sock``: its recv returns end-of-file."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    with contextlib.suppress(OSError):
        sock.close()
