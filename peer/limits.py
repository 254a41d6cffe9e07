"""Resource limits of a PeerHost and the inbound-connection admission they drive.

Identities are free in an open swarm, so every per-peer limit has a host-wide companion or a
per-connection one that holds whatever the number of identities: host-wide caps on unread
mailbox bytes and on bytes held in partial messages, and for connections that have not yet
authenticated a per-address rate, a deadline (the handshake timeout) and a share of the
inbound slots they may never take, so a flood of handshakes cannot lock admitted peers out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from peer.ratelimit import RateLimiter

log = logging.getLogger("lowband.transport")


@dataclass
class HostLimits:
    """Resource limits of a PeerHost (exceeding one costs the offender, not the host).

    - ``rpc_rate_per_s`` / ``rpc_burst``: incoming RPC requests per peer (token bucket); excess
      ones get a RemoteRateLimited error reply without running the handler.
    - ``max_handlers_per_peer``: RPC requests of one peer admitted at once, from admission until
      the reply is written; excess requests get an immediate RemoteBusy error reply.
    - ``max_mailbox_bytes_per_peer``: completed, not yet received ``send`` payloads buffered for
      one peer. A message that would exceed it (unless nothing of that peer is buffered, so any
      message within ``max_message_bytes`` can be delivered) drops the peer's connections with a
      warning. 1 GiB: a 100 MB all-reduce buffers at most a few of its ~100 MB/n chunks per peer.
    - ``max_mailbox_bytes_total``: the same, summed over all peers; a message that would exceed
      it is refused the same way, whoever sent it.
    - ``max_partial_bytes_total``: bytes received into messages not yet complete, all peers; the
      chunk that would exceed it costs its sender the connection (and what it held).
    - ``ping_rate_per_s`` / ``ping_burst``: PINGs answered per connection; excess ones are dropped
      and ``ping_burst`` dropped PINGs close the connection (a PING is a keepalive, not a service).
    - ``max_inbound_connections`` / ``max_inbound_per_address``: accepted connections, handshaking
      ones included, in total and per remote IP; excess ones are closed at once. Several peers on
      one host share an IP and each opens ``conns_per_peer`` connections, hence 256 per address.
    - ``max_handshaking``: inbound connections still in their handshake (unauthenticated) at once;
      the rest of ``max_inbound_connections`` is reserved for authenticated ones.
    - ``handshake_rate_per_s`` / ``handshake_burst``: inbound connections accepted per remote IP
      (token bucket); excess ones are closed at once.
    - ``max_relay_reservations``: peers a relay keeps reachable at once (:mod:`peer.relay`).
    - ``max_relay_circuits`` / ``max_relay_circuits_per_peer``: spliced or pending circuits a
      relay carries, in total and per requesting or reserved peer; ``relay_circuit_timeout_s``:
      how long a requested circuit waits for its far end to dial in.
    - ``max_incoming_dials``: dials a NATed peer makes at once because a relay asked it to
      (circuit acceptances and reversals), so a relay cannot make it dial without bound.
    - ``reversal_interval_s`` / ``reversal_rate_per_s``: reversal dials we make at most once
      per this interval per requesting peer, and at this rate in all (burst 4): identities are
      free, so the total is what bounds the dials many of them can ask for.
    - ``punch_interval_s`` / ``punch_rate_per_s``: punch offers we answer at most once per this
      interval per peer and at this rate in all (burst 4): each answered offer makes us send up
      to :data:`peer.punch.MAX_ATTEMPTS` SYNs.
    """
    rpc_rate_per_s: float = 1000.0
    rpc_burst: int = 2000
    max_handlers_per_peer: int = 64
    max_mailbox_bytes_per_peer: int = 1 << 30
    max_mailbox_bytes_total: int = 4 << 30
    max_partial_bytes_total: int = 4 << 30
    ping_rate_per_s: float = 20.0
    ping_burst: int = 40
    max_inbound_connections: int = 1024
    max_inbound_per_address: int = 256
    max_handshaking: int = 512
    handshake_rate_per_s: float = 20.0
    handshake_burst: int = 64
    max_relay_reservations: int = 256
    max_relay_circuits: int = 256
    max_relay_circuits_per_peer: int = 8
    relay_circuit_timeout_s: float = 5.0
    max_incoming_dials: int = 16
    reversal_interval_s: float = 5.0
    reversal_rate_per_s: float = 2.0
    punch_interval_s: float = 10.0
    punch_rate_per_s: float = 1.0


class InboundGate:
    """Counts accepted connections per remote IP against the inbound limits, and how many of
    them are still unauthenticated (in their handshake)."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self._open: dict[str, int] = {}  # remote IP -> open inbound connections
        self._total = 0
        self.handshaking = 0
        self._rate = RateLimiter(limits.handshake_rate_per_s, limits.handshake_burst, max_keys=16384)

    def admit(self, ip: str, where: str) -> bool:
        """Count one more (handshaking) connection from ``ip``; False (nothing counted): over a limit."""
        lim, here = self.limits, self._open.get(ip, 0)
        refusal = None
        if self._total >= lim.max_inbound_connections or here >= lim.max_inbound_per_address:
            refusal = (f"{self._total} open in total (limit {lim.max_inbound_connections}), {here} from "
                       f"this address (limit {lim.max_inbound_per_address})")
        elif self.handshaking >= lim.max_handshaking:
            refusal = (f"{self.handshaking} connections in their handshake (limit {lim.max_handshaking}; "
                       "the other slots are reserved for authenticated peers)")
        elif self._rate.acquire(ip):
            refusal = (f"more than {lim.handshake_rate_per_s:g} new connections/s from this address "
                       f"(burst {lim.handshake_burst})")
        if refusal is not None:
            log.warning("refused inbound connection from %s: %s", where, refusal)
            return False
        self._open[ip] = here + 1
        self._total += 1
        self.handshaking += 1
        return True

    def authenticated(self) -> None:
        """One admitted connection finished its handshake: it no longer counts as handshaking."""
        self.handshaking -= 1

    def open(self) -> int:
        """Inbound connections counted now."""
        return self._total

    def release(self, ip: str, handshaking: bool) -> None:
        self._total -= 1
        if handshaking:
            self.handshaking -= 1
        left = self._open.get(ip, 0) - 1
        if left > 0:
            self._open[ip] = left
        else:
            self._open.pop(ip, None)
