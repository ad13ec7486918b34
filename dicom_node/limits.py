"""Limits on what one association may make the node hold in memory while receiving.

pynetdicom reads a whole PDU of whatever length the peer declares, and collects a whole C-STORE
data set in memory before any handler runs. Here:

- a PDU longer than the Maximum Length the node negotiates (``node.max_pdu``, or, when that is
  unlimited, the maximum data set size) aborts the association before it is read;
- the fragments of one data set are collected only up to ``node.max_dataset_mb``; past it they are
  counted and dropped, and the C-STORE, once complete, is answered 0xA700 (Out of Resources) by
  the handler, which sees an :class:`OversizedDataSet`. The association goes on.
"""

from __future__ import annotations

import logging
import struct
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.transport import AssociationSocket

from .guard import Connection

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("aidx.node")

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
# An A-ASSOCIATE-RQ of 128 presentation contexts with a dozen transfer syntaxes each is about
# 40 KB; other PDUs than P-DATA are a few bytes.
MAX_CONTROL_PDU = 1 << 20
# Room for the command set and the PDV headers beside a data set of the maximum size.
PDU_SLACK = 1 << 16


class OversizedDataSet(BytesIO):
    """A data set that went past the limit: empty, with the number of bytes that arrived."""

    def __init__(self, received: int, limit: int) -> None:
        super().__init__()
        self.received = received
        self.limit = limit


class BoundedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, collecting at most ``limit`` bytes of each data set."""

    def __init__(self, assoc: Association, limit: int) -> None:
        super().__init__(assoc)
        self.limit = limit
        self._received = 0

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self._received = 0
        message = self.message
        kept: list[list[Any]] = []
        for context_id, fragment in primitive.presentation_data_value_list:
            data = fragment
            if not data[0] & 1:  # a data set fragment (PS3.8 E.2)
                self._received += len(data) - 1
                if self._received > self.limit:
                    oversized = message.data_set
                    if not isinstance(oversized, OversizedDataSet):
                        oversized = OversizedDataSet(self._received, self.limit)
                        message.data_set = oversized  # what was collected is let go
                    oversized.received = self._received
                    data = data[:1]  # keep the control header: the last fragment still ends it
            kept.append([context_id, data])
        primitive.presentation_data_value_list = kept  # type: ignore[assignment]
        super().receive_primitive(primitive)


class BoundedSocket(AssociationSocket):
    """An association socket that refuses to read a PDU longer than the node accepts."""

    max_pdu: int
    connection: Connection | None
    _pdu_type: int

    @classmethod
    def adopt(cls, sock: AssociationSocket, max_pdu: int, connection: Connection | None) -> None:
        """Turn the socket pynetdicom made for a new association into a bounded one (made
        before the association starts; creating a second socket would signal a second
        connection to its state machine)."""
        sock.__class__ = cls
        assert isinstance(sock, BoundedSocket)
        sock.max_pdu = max_pdu
        sock.connection = connection
        sock._pdu_type = 0

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes == 6 and self._pdu_type == 0:  # a PDU header: type, reserved, length
            header = super().recv(6)
            if len(header) == 6:
                self._pdu_type, _, length = struct.unpack(">BBL", header)
                allowed = self.max_pdu if self._pdu_type == P_DATA_TF else MAX_CONTROL_PDU
                if length > allowed:
                    log.warning(
                        "association from %s aborted: a PDU of type 0x%02X declares %d bytes, "
                        "more than the %d the node accepts",
                        self._peer(),
                        self._pdu_type,
                        length,
                        allowed,
                    )
                    self._pdu_type = 0
                    self.close()
                    return bytearray()
            return header
        self._pdu_type = 0
        data = super().recv(nr_bytes)
        if len(data) < nr_bytes and not self.closed_by_node:
            # pynetdicom's own line for this names no peer; it is dropped (aidx.logs).
            log.warning(
                "association from %s: the connection closed in the middle of a PDU "
                "(%d of %d bytes arrived)",
                self._peer(),
                len(data),
                nr_bytes,
            )
        return data

    @property
    def closed_by_node(self) -> bool:
        """The node shut the connection itself (and said why), e.g. at the request deadline."""
        return self.connection is not None and self.connection.closed

    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address)
        except AttributeError:
            return "(unknown)"


def advertised_max_pdu(max_pdu: int, max_dataset_bytes: int) -> int:
    """The Maximum Length the node negotiates (PS3.8 D.1): ``node.max_pdu``, or, when that is
    unlimited (0), the maximum data set size with room for headers. PDUs longer than this (with
    slack for headers) are not read."""
    if max_pdu > 0:
        return max_pdu
    return min(max_dataset_bytes + PDU_SLACK, 0xFFFFFFFF)
