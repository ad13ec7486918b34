"""The storage SCP (PS3.4 Annex A VERIFICATION and Annex B Storage, as SCP) built on pynetdicom.

Each C-STORE is written to the spool exactly as received (no decode of pixel data), flushed to
disk and indexed in the store before the success status is returned. Handlers never raise: every
failure becomes a DIMSE status and one log line naming the SOP Instance UID and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from aidx.config import NodeConfig
from aidx.store.store import Store

from . import status
from .client import VERIFICATION
from .guard import Connection, ConnectionGuard, await_request
from .limits import (
    PDU_SLACK,
    BoundedDIMSE,
    BoundedSocket,
    OversizedDataSet,
    advertised_max_pdu,
)
from .parse import InstanceError, ParseLimits
from .policy import (
    REJECT_PERMANENT,
    SOURCE_SERVICE_USER,
    AccessPolicy,
    Rejection,
    Rights,
)
from .receive import Receiver
from .spool import Spool, valid_uid
from .tls import server_context

log = logging.getLogger("aidx.node")


@dataclass
class _Counts:
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)


# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient, by the service provider (presentation
# related), local limit exceeded.
REJECT_TRANSIENT = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
REASON_LOCAL_LIMIT_EXCEEDED = 0x02


class _PolicyACSE(ACSE):
    """ACSE that applies the node's association limit and the access policy before
    pynetdicom's own negotiation; it runs once the whole A-ASSOCIATE-RQ has arrived."""

    def __init__(
        self,
        assoc: Association,
        policy: AccessPolicy,
        guard: ConnectionGuard,
        connection: Connection | None,
    ) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._guard = guard
        self._connection = connection

    def _negotiate_as_acceptor(self) -> None:
        request = cast(Any, self.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = self.assoc.requestor.address
        if self._connection is not None and self._guard.requested(self._connection):
            self.requestor.ae_title = calling
            self.send_reject(
                REJECT_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT_EXCEEDED
            )
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        decision = self._policy.decide(calling, called, address)
        if isinstance(decision, Rejection):
            self.requestor.ae_title = calling
            log.warning(
                "association rejected: %s",
                decision.why,
                extra={"calling_ae": calling, "called_ae": called, "peer": address},
            )
            self.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, decision.reason)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        # Rights decide which services this association may negotiate.
        self.acceptor.supported_contexts = [
            cx for cx in self.acceptor.supported_contexts if _allowed(cx, decision)
        ]
        super()._negotiate_as_acceptor()


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission control and the TLS handshake moved off the
    accepting thread.

    pynetdicom handshakes in ``get_request``, on the one thread that accepts every connection,
    with no deadline: a client that connects and stays silent would stop the node accepting
    anyone. Here each connection is first admitted by the :class:`ConnectionGuard` (per-address
    and pending limits, a deadline for the whole association request), then handshakes on its
    own thread.
    """

    guard: ConnectionGuard
    current = threading.local()  # the connection being set up on this thread

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        plain = cast(socket.socket, request)
        connection = self.guard.admit(plain, str(client_address[0]))
        if connection is None:
            return
        with contextlib.suppress(OSError):  # answer each C-STORE at once (no Nagle delay)
            plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is None and not await_request(plain, connection, self.guard):
            self.guard.release(connection)
            self.shutdown_request(plain)
            return
        if self.ssl_context is not None:
            try:
                plain.settimeout(self.guard.node.association_request_timeout_s)
                request = self.ssl_context.wrap_socket(plain, server_side=True)
                request.settimeout(None)  # as accepted; pynetdicom applies its own timeouts
                connection.sock = request  # the TLS socket took over the descriptor
            except OSError as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.guard.release(connection)
                self.shutdown_request(plain)
                return
        self.current.connection = connection
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.current.connection = None


def _allowed(cx: PresentationContext, rights: Rights) -> bool:
    if cx.abstract_syntax == VERIFICATION:
        return rights.echo
    return rights.store


class StorageSCP:
    """The listening node: policy, handlers and the pynetdicom server."""

    def __init__(
        self,
        node: NodeConfig,
        store: Store,
        spool: Spool,
        on_study_opened: Callable[[str], None] | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.spool = spool
        self.policy = AccessPolicy(node)
        self.on_study_opened = on_study_opened
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._counts: dict[int, _Counts] = {}
        self._counts_lock = threading.Lock()
        self.guard = ConnectionGuard(node)
        self.parse_limits = ParseLimits(node.max_dataset_bytes, node.max_sequence_depth)
        self.receiver = Receiver(store, spool, self.parse_limits, on_study_opened)

    @property
    def port(self) -> int:
        assert self._server is not None, "the node is not started"
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """The acceptor thread is serving (for health checks)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self.policy.check_startup()
        ae = AE(ae_title=self.node.ae_title)
        # Unlimited (0) is advertised as the largest data set: a peer then never sends a PDU
        # that the node would refuse to read.
        ae.maximum_pdu_size = advertised_max_pdu(self.node.max_pdu, self.node.max_dataset_bytes)
        # The node's own limit counts only associations whose request has arrived (guard);
        # pynetdicom's counts pending connections too, so it is set past both.
        ae.maximum_associations = self.node.max_associations + self.node.max_pending_connections
        ae.network_timeout = self.node.network_timeout_s
        ae.acse_timeout = 30
        ae.dimse_timeout = self.node.network_timeout_s
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_closed),
            (evt.EVT_ABORTED, self._handle_closed),
        ]
        policy, guard = self.policy, self.guard
        max_pdu = ae.maximum_pdu_size + PDU_SLACK
        max_dataset = self.node.max_dataset_bytes

        class _Handler(RequestHandler):
            connection: Connection | None = None
            assoc: Association | None = None

            def handle(self) -> None:
                self.connection = getattr(_AssociationServer.current, "connection", None)
                super().handle()  # creates the association and starts its thread
                if self.connection is not None and self.assoc is not None:
                    # Only a started thread tells, by ending, that the connection is gone.
                    self.connection.thread = self.assoc

            def _create_association(self) -> Association:
                assoc = super()._create_association()
                BoundedSocket.adopt(cast(Any, assoc.dul.socket), max_pdu, self.connection)
                assoc.dimse = BoundedDIMSE(assoc, max_dataset)
                assoc.acse = _PolicyACSE(assoc, policy, guard, self.connection)
                self.assoc = assoc
                return assoc

        ssl_context = server_context(self.node.tls) if self.node.tls.enabled else None
        server = ae.make_server(
            (self.node.host, self.node.port),
            evt_handlers=handlers,
            ssl_context=ssl_context,
            server_class=_AssociationServer,
            request_handler=_Handler,
        )
        cast(_AssociationServer, server).guard = self.guard
        self.guard.start()
        self._server = server
        # What AE.start_server does: shutdown() expects the server in the AE's list.
        ae._servers.append(server)
        self._thread = threading.Thread(
            target=server.serve_forever, name="aidx-node-acceptor", daemon=True
        )
        self._thread.start()
        log.info(
            "DICOM node listening on %s:%d as %s%s",
            self.node.host,
            self.port,
            self.node.ae_title,
            " (TLS)" if ssl_context else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.guard.stop()

    # ------------------------------------------------------------------------------ handlers
    def _handle_accepted(self, event: evt.Event) -> None:
        with self._counts_lock:
            self._counts[id(event.assoc)] = _Counts()
        log.debug(
            "association accepted",
            extra={
                "calling_ae": event.assoc.requestor.ae_title,
                "peer": event.assoc.requestor.address,
            },
        )

    def _handle_closed(self, event: evt.Event) -> None:
        with self._counts_lock:
            counts = self._counts.pop(id(event.assoc), None)
        if counts is None or counts.stored + counts.duplicates + counts.failed == 0:
            return
        log.info(
            "association from %s %s: %d stored, %d duplicates, %d failed in %.2f s",
            event.assoc.requestor.ae_title,
            "released" if event.event == evt.EVT_RELEASED else "aborted",
            counts.stored,
            counts.duplicates,
            counts.failed,
            time.monotonic() - counts.started,
        )

    def _handle_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _handle_store(self, event: evt.Event) -> int:
        request = cast(Any, event.request)
        sop_uid = str(request.AffectedSOPInstanceUID or "").strip()
        sop_class_uid = str(request.AffectedSOPClassUID or "").strip()
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        counts = self._counts.get(id(event.assoc))
        outcome = "failed"
        try:
            outcome = self._store(event, sop_uid, sop_class_uid, calling_ae)
            code = status.SUCCESS
        except InstanceError as exc:
            log.warning(
                "C-STORE refused: sop_uid=%s calling_ae=%s status=0x%04X: %s",
                sop_uid or "(none)",
                calling_ae,
                exc.code,
                exc,
            )
            code = exc.code
        except Exception:
            log.exception("C-STORE failed: sop_uid=%s calling_ae=%s", sop_uid, calling_ae)
            code = status.PROCESSING_FAILURE
        if counts is not None:
            if outcome == "new":
                counts.stored += 1
            elif outcome == "duplicate":
                counts.duplicates += 1
            else:
                counts.failed += 1
        return code

    def _store(self, event: evt.Event, sop_uid: str, sop_class_uid: str, calling_ae: str) -> str:
        if not valid_uid(sop_uid):
            raise InstanceError(
                status.CANNOT_UNDERSTAND, "the request's Affected SOP Instance UID is invalid"
            )
        received = cast(Any, event.request).DataSet
        if isinstance(received, OversizedDataSet):
            raise InstanceError(
                status.OUT_OF_RESOURCES,
                f"the data set of {received.received} bytes exceeds node.max_dataset_mb "
                f"({received.limit} bytes); nothing was stored",
            )
        return self.receiver.store_dataset(
            received.getbuffer(),
            str(event.context.transfer_syntax),
            sop_uid,
            sop_class_uid,
            calling_ae,
            self.policy.quiet_period_s(calling_ae),
        ).outcome
