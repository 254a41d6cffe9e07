"""Per-peer resource limits of a PeerHost and the inbound-connection admission they drive."""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("lowband.transport")


@dataclass
class HostLimits:
    """Per-peer resource limits of a PeerHost (exceeding one costs the offender, not the host).

    - ``rpc_rate_per_s`` / ``rpc_burst``: incoming RPC requests per peer (token bucket); excess
      ones get a RemoteRateLimited error reply without running the handler.
    - ``max_handlers_per_peer``: RPC handlers running at once for one peer; excess requests get
      an immediate RemoteBusy error reply.
    - ``max_mailbox_bytes_per_peer``: completed, not yet received ``send`` payloads buffered for
      one peer. A message that would exceed it (unless nothing of that peer is buffered, so any
      message within ``max_message_bytes`` can be delivered) drops the peer's connections with a
      warning. 1 GiB: a 100 MB all-reduce buffers at most a few of its ~100 MB/n chunks per peer.
    - ``max_inbound_connections`` / ``max_inbound_per_address``: accepted connections, handshaking
      ones included, in total and per remote IP; excess ones are closed at once. Several peers on
      one host share an IP and each opens ``conns_per_peer`` connections, hence 256 per address.
    """
    rpc_rate_per_s: float = 1000.0
    rpc_burst: int = 2000
    max_handlers_per_peer: int = 64
    max_mailbox_bytes_per_peer: int = 1 << 30
    max_inbound_connections: int = 1024
    max_inbound_per_address: int = 256


class InboundGate:
    """Counts accepted connections per remote IP against the inbound limits."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self._open: dict[str, int] = {}  # remote IP -> open inbound connections

    def admit(self, ip: str, where: str) -> bool:
        """Count one more connection from ``ip``; False (nothing counted): over a limit."""
        lim, total, here = self.limits, sum(self._open.values()), self._open.get(ip, 0)
        if total >= lim.max_inbound_connections or here >= lim.max_inbound_per_address:
            log.warning("refused inbound connection from %s: %d open in total (limit %d), %d from "
                        "this address (limit %d)", where, total, lim.max_inbound_connections,
                        here, lim.max_inbound_per_address)
            return False
        self._open[ip] = here + 1
        return True

    def open(self) -> int:
        """Inbound connections counted now."""
        return sum(self._open.values())

    def release(self, ip: str) -> None:
        left = self._open.get(ip, 0) - 1
        if left > 0:
            self._open[ip] = left
        else:
            self._open.pop(ip, None)
