"""Who may associate with the node, from where, and for what (echo, store).

Safe by default: on loopback with no allow-list, any calling AE is accepted (the README's first
steps work); listening on any other address needs an allow-list or the explicit
``accept_any_calling_ae`` setting, otherwise the node refuses to start.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from aidx.config import NodeConfig, PeerConfig

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 = rejected-permanent, source 1 = service-user.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07


class NodeStartError(RuntimeError):
    """The node's settings are unsafe or unusable; the message says what to set."""


@dataclass(frozen=True)
class Rights:
    echo: bool
    store: bool


@dataclass(frozen=True)
class Rejection:
    reason: int
    why: str


ALL_RIGHTS = Rights(echo=True, store=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AccessPolicy:
    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self.peers: dict[str, PeerConfig] = {p.ae_title.strip(): p for p in node.allowed_peers}
        self._resolved: dict[str, set[str]] = {}

    def check_startup(self) -> None:
        if is_loopback(self.node.host) or self.peers or self.node.accept_any_calling_ae:
            return
        raise NodeStartError(
            f"node.host is {self.node.host!r}, beyond loopback, and no calling AE titles are "
            "allowed: add node.allowed_peers (AE titles, optionally with hosts) or set "
            "node.accept_any_calling_ae: true to accept any AE that can reach the port"
        )

    def decide(self, calling_ae: str, called_ae: str, address: str) -> Rights | Rejection:
        """The rights of an association request, or why it is rejected."""
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        if called_ae != self.node.ae_title.strip():
            return Rejection(
                REASON_CALLED_AE_NOT_RECOGNISED,
                f"called AE title {called_ae!r} is not this node's ({self.node.ae_title!r})",
            )
        peer = self.peers.get(calling_ae)
        if peer is None:
            if self.peers and not self.node.accept_any_calling_ae:
                return Rejection(
                    REASON_CALLING_AE_NOT_RECOGNISED,
                    f"calling AE title {calling_ae!r} is not in node.allowed_peers",
                )
            return ALL_RIGHTS
        if peer.hosts and not self._host_matches(peer.hosts, address):
            return Rejection(
                REASON_CALLING_AE_NOT_RECOGNISED,
                f"calling AE title {calling_ae!r} is not allowed from {address}",
            )
        return Rights(echo=peer.echo, store=peer.store)

    def quiet_period_s(self, calling_ae: str) -> float:
        peer = self.peers.get(calling_ae.strip())
        if peer is not None and peer.quiet_period_s is not None:
            return peer.quiet_period_s
        return self.node.study_quiet_period_s

    def _host_matches(self, hosts: list[str], address: str) -> bool:
        for host in hosts:
            if host == address:
                return True
            try:
                network = ipaddress.ip_network(host, strict=False)
                if ipaddress.ip_address(address) in network:
                    return True
            except ValueError:
                if address in self._resolve(host):
                    return True
        return False

    def _resolve(self, name: str) -> set[str]:
        if name not in self._resolved:
            try:
                self._resolved[name] = {str(i[4][0]) for i in socket.getaddrinfo(name, None)}
            except OSError:
                self._resolved[name] = set()
        return self._resolved[name]
