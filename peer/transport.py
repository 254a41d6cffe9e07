"""Secure asyncio peer transport: :class:`PeerHost`, the thin adapter over the sans-IO layers.

Layers, bottom up (see docs/architecture.md):

- :mod:`peer.conn` — one TCP connection: handshake (:mod:`peer.handshake`), then AEAD records
  (:mod:`peer.secure`) decoded in place, one wire frame (:mod:`peer.wire`) per record.
- :mod:`peer.messages` — typed messages (mail / request / response / error) cut into ~1 MiB
  DATA-frame chunks and reassembled with size limits; no I/O.
- this module — the pool of connections per peer, dialing, striping, RPC calls, keepalive;
  :mod:`peer.mailbox` (tagged one-way messages), :mod:`peer.rpc` (handlers and their limits).

- RPC requests and their responses stay on one connection (so a lost connection fails exactly
  the calls it carried).
- One-way ``send`` stripes chunks round-robin over the pool of connections to the peer (several
  TCP flows fill a long fat pipe better than one). If any connection of the pool dies, striped
  messages in flight from that peer are dropped (their chunks on the dead connection are gone),
  so receivers rely on deadlines and tags, as collectives do anyway.
- Backpressure: after each record write a sender waits while the transport's write buffer is
  above ``write_buffer_bytes`` (pause_writing / resume_writing, i.e. what ``drain()`` does).
  Replies wait before they are written and stop the reading of requests meanwhile, and PONGs
  and refusals are dropped rather than queued (:mod:`peer.conn`), so a peer that never reads
  cannot make us buffer without bound.
- Admission: with a coordinator ``authority``, every peer must present a credential for its
  key (:mod:`peer.credentials`, checked in :mod:`peer.handshake`); ``roles_of`` gives its roles,
  ``handle(..., roles=)`` refuses callers holding none of them (``Forbidden``), and ``revoke``
  cuts revoked identities off and refuses their handshakes. Limits that hold against many
  identities: :mod:`peer.limits`.
- Reach (issue 15): a route to a peer is an address, relays it reserved at, or both; a
  connection is tried in this order: existing, direct (if the peer is reachable), reversal
  (the peer dials us, asked through a relay), relay circuit (:mod:`peer.relay`: end-to-end
  handshake and records through a relay that splices raw sockets), and a relay circuit is then
  upgraded by a hole punch (:mod:`peer.punch`). ``link_path`` tells which. What others name
  never makes us dial a third party (identities are free): a reversal dials the address our
  route table holds for the requester, else the one its relay saw it at (scope-checked,
  :mod:`peer.addrscope`); a punch aims only at an IP the peer's connections come from (the
  relay-seen one over a circuit); both are rate-limited per peer and in all
  (:class:`~peer.limits.HostLimits`). A punch whose peer SYN reaches our listener takes that
  inbound connection (:class:`~peer.punch.PunchBook`, with the punch's handshake role). Our
  RelayService serves only while ``reachable`` is True.
- Messages for the same (peer, tag) have no ordering guarantee; give each its own tag.
- Received payloads are ``bytearray``: a multi-chunk message is reassembled in one growing
  buffer, and delivering it without a final copy is what keeps encrypted throughput near the
  raw socket's (a writable buffer is also what torch.frombuffer / numpy want).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from typing import Callable, Iterable

from peer import addrscope
from peer import circuit as C
from peer.conn import ConnConfig, Connection
from peer.credentials import Credential
from peer.errors import AuthError, LowbandError, PeerUnavailable, ProtocolError, TransportTimeout
from peer.handshake import Handshake
from peer.identity import Identity
from peer.limits import HostLimits, InboundGate
from peer.linkstats import LinkStats
from peer.mailbox import Mailbox
from peer.messages import (STRIPED, Error, ErrorCode, Mail, Message, OutgoingMessage, Reassembler, Request,
                           Response, remote_error)
from peer.punch import (PunchAnswer, PunchBook, PunchFailed, PunchOffer, PunchPlan, classify_mapping, plan, predict,
                        simultaneous_open)
from peer.ratelimit import RateLimiter
from peer.reach import pick_relays
from peer.relay import RelayService, dial_circuit
from peer.rpc import Handler, RpcServer
from peer.wire import Frame, FrameType

_MAX_PING_ID = 2**64 - 1
_MAX_LOST_PEERS = 65536  # lost peers remembered (recv from them fails at once)
_SPARE_IDLE_S = 5.0  # a spare relayed connection idle this long is closed
_UNMEASURED_RTT_S = 1e6  # relays without a measured round trip rank after measured ones, by load
METHOD_PUNCH = "punch.offer"

__all__ = ["PeerHost", "HostLimits", "LinkStats", "Handler", "STRIPED", "install_event_loop_policy",
           "split_address"]

log = logging.getLogger("lowband.transport")


def install_event_loop_policy() -> bool:
    """Use uvloop when it is installed (optional; the core stays portable). True if installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _check_port_free(host: str, port: int) -> None:
    """OSError (EADDRINUSE) if something listens on host:port, SO_REUSEPORT listeners included."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        probe.bind((host, port))


class PeerHost:
    """A peer's endpoint: listens, dials, authenticates, and moves messages between peers."""

    def __init__(self, identity: Identity, token: bytes | None = None, *, credential: Credential | None = None,
                 authority: bytes | None = None, conns_per_peer: int = 4,
                 chunk_size: int = 1 << 20, max_message_bytes: int = 1 << 31,
                 max_pending_bytes_per_peer: int = 1 << 32,
                 connect_timeout: float = 10.0, handshake_timeout: float = 5.0,
                 write_buffer_bytes: int = 4 << 20, max_partials_per_peer: int = 4096,
                 keepalive_s: float = 10.0, dead_after_s: float = 60.0,
                 limits: HostLimits | None = None, relay: bool = True, relay_rate: float | None = None,
                 relay_circuit_rate: float | None = None) -> None:
        """``token``: the swarm token (closed swarm); ``authority``: the coordinator's public key,
        whose credentials every peer must present (``credential``: ours). At least one of the two.
        ``relay``: relay for unreachable peers (:mod:`peer.relay`), at most ``relay_rate`` bytes/s
        in all and ``relay_circuit_rate`` per circuit (None: uncapped)."""
        if conns_per_peer < 1:
            raise ValueError("conns_per_peer must be >= 1")
        if not token and authority is None:
            raise ValueError("PeerHost needs a swarm token or a coordinator authority key")
        self.limits = limits or HostLimits()
        self.identity = identity
        self.peer_id = identity.peer_id
        self.conns_per_peer = conns_per_peer
        self.chunk_size = chunk_size
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes_per_peer = max_pending_bytes_per_peer
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.write_buffer_bytes = write_buffer_bytes
        self.max_partials_per_peer = max_partials_per_peer
        # a connection that hears nothing for dead_after_s is dropped (silent partitions would
        # otherwise leave recv() waiting forever); idle ones are pinged every keepalive_s
        self.keepalive_s = keepalive_s
        self.dead_after_s = dead_after_s
        self.address: str | None = None
        self.mailbox = Mailbox(self.limits.max_mailbox_bytes_per_peer, self.limits.max_mailbox_bytes_total,
                               connected=lambda peer_id: bool(self._conns.get(peer_id)), evict=self._cut_off)
        self.reassembler = Reassembler(max_message_bytes, max_pending_bytes_per_peer, max_partials_per_peer,
                                       max_buffered_bytes=self.limits.max_partial_bytes_total, evict=self._cut_off)
        self.rpc = RpcServer(self.limits, self.roles_of)
        self._conn_config = ConnConfig(chunk_size, write_buffer_bytes, handshake_timeout)
        self._inbound = InboundGate(self.limits)
        self._keepalive: asyncio.Task | None = None
        self._token = bytes(token) if token else None
        self.credential = credential  # replace it to renew: each new handshake presents the current one
        self._authority = authority
        self._roles: dict[str, frozenset[str] | None] = {}  # connected peer id -> credential roles
        self._revoked: set[str] = set()
        self._ping_rate = RateLimiter(self.limits.ping_rate_per_s, self.limits.ping_burst, max_keys=16384)
        self._handshake(False)  # ValueError now, not at the first connection, for a bad token/authority/credential
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[str, list[Connection]] = {}
        # relayed connections of peers we now also reach without a relay (punched/reversed/direct):
        # they only finish what they carry, and close once idle
        self._spare: dict[str, list[Connection]] = {}
        self._rr: dict[str, int] = {}
        self._routes: dict[str, str] = {}
        self._dial_locks: dict[str, asyncio.Lock] = {}
        self._lost: dict[str, None] = {}  # peers whose last connection was lost (insertion-ordered set)
        self._lost_callbacks: list[Callable[[str], object]] = []
        self._stats: dict[str, LinkStats] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._live: set[Connection] = set()  # every open transport, handshaking or registered
        # reach: relays we can be reached through, per peer; relays we hold a reservation at;
        # peers we asked to dial us (reversal) and wait for
        self.announce: str | None = None  # the address others dial us at (reversal); None: self.address
        # can others dial us? None: not known yet. Only True asks peers to dial us (reversal)
        # and lets our RelayService serve (a peer nobody can dial is no relay)
        self.reachable: bool | None = None
        # a reversal asked by a peer we hold no route for dials the address the relay saw it at;
        # False: only routed peers (a relay then cannot make us dial anything but our routes)
        self.reverse_unrouted = True
        self._reachable: dict[str, bool] = {}
        self._relays: dict[str, list[tuple[str, str, int]]] = {}  # peer -> (relay id, address, load)
        self._reservations: dict[str, str] = {}  # relay peer id -> its address
        self._arrivals: dict[str, asyncio.Future] = {}
        self._incoming_dials = 0
        lim = self.limits
        self._reversal_rate = RateLimiter(1.0 / lim.reversal_interval_s, 1, max_keys=16384)
        self._reversal_total = RateLimiter(lim.reversal_rate_per_s, 4)
        self.handle(C.METHOD_INCOMING, self._on_incoming)
        # hole punching (peer.punch): where our listening port is seen from outside, and how it maps
        self.observed: tuple[str, int] | None = None
        self.mapping = "unknown"
        self._punching: set[str] = set()
        self._punch_book = PunchBook()
        self._punch_inbound: dict[bytes, asyncio.Future] = {}  # attempt -> the connection our listener took
        self._punch_rate = RateLimiter(1.0 / lim.punch_interval_s, 1, max_keys=16384)
        self._punch_total = RateLimiter(lim.punch_rate_per_s, 4)
        self.handle(METHOD_PUNCH, self._on_punch_offer)
        self.relay = RelayService(self, relay_rate, relay_circuit_rate) if relay else None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port); returns and sets ``self.address``."""
        # reuse_port: hole punching dials out from the listening port (peer.punch). It would also
        # let a second listener share a fixed port silently, so first make sure none holds it.
        if port:
            _check_port_free(host, port)
        self._server = await asyncio.get_running_loop().create_server(self._on_inbound, host, port, reuse_port=True)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{sock_host}:{sock_port}"
        return self.address

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self.relay is not None:
            self.relay.close()
        for conn in list(self._live):
            conn.close("host closed", abort=True)
        self.mailbox.fail_all("host closed")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> "PeerHost":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ mesh view
    def add_route(self, peer_id: str, address: str | None = None, *, relays: Iterable[tuple] = (),
                  reachable: bool = True) -> None:
        """Remember how to reach ``peer_id`` when a send/call needs a connection: its ``address``
        (dialled directly only if ``reachable``; set it from coordinator-verified rows only: a
        reversal dials it too) and ``relays`` it reserved at: (peer id, address) or (peer id,
        address, announced load) tuples, tried by measured round trip scaled by load
        (:func:`peer.reach.pick_relays`), unmeasured ones last."""
        relays = [(r[0], r[1], int(r[2]) if len(r) > 2 else 0) for r in relays]
        for _, addr, _ in relays:
            split_address(addr)
        if address is not None:
            split_address(address)
            self._routes[peer_id] = address
        self._reachable[peer_id] = reachable
        if relays:
            self._relays[peer_id] = relays
        else:
            self._relays.pop(peer_id, None)

    def connected(self, peer_id: str) -> bool:
        return bool(self._conns.get(peer_id))

    def link_path(self, peer_id: str) -> str | None:
        """How the link to ``peer_id`` is connected now: direct | reversed | punched | relayed
        (None: not connected)."""
        conns = self._conns.get(peer_id)
        return conns[0].path if conns else None

    def set_authority(self, authority: bytes, credential: Credential) -> None:
        """Pin a new coordinator ``authority`` and present ``credential`` (issued by it) in every
        NEW handshake; open connections stay (they were authenticated under the old key). For a
        coordinator that lost its database and re-admitted us under a new key."""
        if len(authority) != 32:
            raise ValueError("authority must be a 32-byte Ed25519 public key")
        if credential.authority != authority or credential.peer_public != self.identity.public_bytes:
            raise ValueError("credential is not issued by this authority for our key")
        self._authority = bytes(authority)
        self.credential = credential
        self._handshake(False)  # ValueError now for anything Handshake refuses

    def connected_peers(self) -> list[str]:
        return [p for p, conns in self._conns.items() if conns]

    def handle(self, method: str, fn: Handler, roles: Iterable[str] | None = None) -> None:
        """Register ``async fn(peer_id, header, payload) -> (header, payload)`` for ``method``;
        ``roles``: callers must hold one of them (else ``Forbidden``; not checked in token-only mode)."""
        self.rpc.handle(method, fn, roles)

    def roles_of(self, peer_id: str) -> frozenset[str] | None:
        """The roles of a connected peer's credential: None in token-only mode (no credentials),
        an empty set for a peer not connected now."""
        if self._authority is None:
            return None
        return self._roles.get(peer_id) or frozenset()

    def revoke(self, peer_ids: Iterable[str]) -> None:
        """Close every connection of these peers and refuse their handshakes from now on."""
        doomed = set(peer_ids) - self._revoked
        if not doomed:
            return
        self._revoked |= doomed
        for peer_id in doomed:
            self._routes.pop(peer_id, None)
            self._relays.pop(peer_id, None)
        if self.relay is not None:
            self.relay.revoke(doomed)
        for conn in list(self._live):
            if conn.peer_id in doomed:
                log.warning("closing connection %d to %s: its identity was revoked", conn.id, conn.peer_id[:12])
                conn.close(f"peer {conn.peer_id} was revoked", abort=True)

    def on_peer_lost(self, callback: Callable[[str], object]) -> None:
        """``callback(peer_id)`` runs when the last connection to a peer is gone."""
        self._lost_callbacks.append(callback)

    def link_stats(self, peer_id: str) -> LinkStats:
        s = self._stats.get(peer_id)
        return LinkStats() if s is None else s.copy()

    def _stats_of(self, peer_id: str) -> LinkStats:
        s = self._stats.get(peer_id)
        if s is None:
            s = self._stats[peer_id] = LinkStats()
        return s

    # ------------------------------------------------------------------ connecting
    async def connect(self, address: str, expected_peer_id: str | None = None, *, path: str = "direct") -> str:
        """Dial ``address``, authenticate, fill the connection pool; returns the remote peer id."""
        conn = await self._dial(address, expected_peer_id, path)
        peer_id = conn.peer_id
        self._routes[peer_id] = address
        missing = self.conns_per_peer - len(self._conns.get(peer_id, ()))
        if missing > 0:
            results = await asyncio.gather(*(self._dial(address, peer_id, path) for _ in range(missing)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.warning("extra connection to %s failed: %s", peer_id[:12], r)
        return peer_id

    async def _dial(self, address: str, expected_peer_id: str | None, path: str = "direct") -> Connection:
        return await self.open_raw(address, expected_peer_id, self, path)

    async def open_raw(self, address: str, expected_peer_id: str | None, owner, path: str = "direct") -> Connection:
        """Dial and authenticate a connection whose frames go to ``owner`` (a ConnOwner: this
        host, or a relay circuit's preamble)."""
        host, port = split_address(address)
        if expected_peer_id in self._revoked:
            raise AuthError(f"peer {expected_peer_id} was revoked")
        conn = Connection(owner, self._conn_config, self._handshake(True, expected_peer_id), address, path=path)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_connection(lambda: conn, host, port),
                                   self.connect_timeout)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"connect to {address} timed out after {self.connect_timeout}s") from None
        except OSError as e:
            raise PeerUnavailable(f"cannot connect to {address}: {e}") from e
        return await conn.ready  # bounded by the handshake timer started in connection_made

    def _on_inbound(self) -> Connection:
        return Connection(self, self._conn_config, self._handshake(False), "inbound peer")

    def _handshake(self, initiator: bool, expected_peer_id: str | None = None) -> Handshake:
        return Handshake(self.identity, self._token, initiator=initiator, expected_peer_id=expected_peer_id,
                         credential=self.credential, authority=self._authority,
                         revoked=self._revoked.__contains__)

    async def _pool(self, peer_id: str) -> list[Connection]:
        """Live connections to ``peer_id``, dialing through its route if there are none."""
        conns = self._conns.get(peer_id)
        if conns:
            return conns
        if self._closing:
            raise PeerUnavailable("host is closed")
        address, relays = self._routes.get(peer_id), self._relays.get(peer_id)
        if address is None and not relays:
            raise PeerUnavailable(f"no connection and no route to peer {peer_id}")
        async with self._dial_lock(peer_id):
            if not self._conns.get(peer_id):
                await self._reach(peer_id, address if self._reachable.get(peer_id, True) else None, relays or [])
        conns = self._conns.get(peer_id)
        if not conns:
            raise PeerUnavailable(f"could not open a connection to peer {peer_id}")
        return conns

    async def _reach(self, peer_id: str, address: str | None, relays: list[tuple[str, str, int]]) -> None:
        """Direct, then reversal, then each relay; raises with every attempt's error."""
        errors = []
        if address is not None:
            try:
                await self.connect(address, expected_peer_id=peer_id)
                return
            except (LowbandError, OSError) as e:
                errors.append(f"direct {address}: {e}")
        if relays and self.reachable is not False and (self.announce or self.address):
            try:
                await self._reverse(peer_id, relays)
                return
            except (LowbandError, OSError) as e:
                errors.append(f"reversal: {e}")
        for relay_id, relay_address in self._relay_order(peer_id, relays):
            try:
                await self._connect_relayed(peer_id, relay_id, relay_address)
                if self.observed is not None and self.mapping != "random":
                    self._spawn(self._upgrade(peer_id))  # the circuit carries the punch offer
                return
            except (LowbandError, OSError) as e:
                errors.append(f"relay {relay_id[:12]}: {e}")
        raise PeerUnavailable(f"cannot reach peer {peer_id}: " + "; ".join(errors))

    def _relay_order(self, peer_id: str, relays: list[tuple[str, str, int]]) -> list[tuple[str, str]]:
        """(relay id, address) to try: measured round trip x load, unmeasured ones by load."""
        address = {rid: addr for rid, addr, _ in relays if rid != peer_id}
        rtt = {rid: getattr(self._stats.get(rid), "rtt_s", None) or _UNMEASURED_RTT_S for rid in address}
        rows = [{"peer_id": rid, "relay_load": load} for rid, _, load in relays if rid in address]
        return [(rid, address[rid]) for rid in pick_relays(rows, rtt, n=len(rows))]

    async def _reverse(self, peer_id: str, relays: list[tuple[str, str, int]]) -> None:
        """Ask ``peer_id``, through a relay it reserved at, to dial us; wait for it to arrive."""
        wait = self.limits.relay_circuit_timeout_s
        fut = self._arrivals.get(peer_id)
        if fut is None or fut.done():
            fut = self._arrivals[peer_id] = asyncio.get_running_loop().create_future()
        try:
            request = C.Reverse(peer_id, self.announce or self.address or "").to_header()
            last: Exception | None = None
            for relay_id, relay_address in self._relay_order(peer_id, relays):
                try:
                    if not self.connected(relay_id):
                        await self.connect(relay_address, expected_peer_id=relay_id)
                    await self.call(relay_id, C.METHOD_REVERSE, request, timeout=wait)
                    break
                except (LowbandError, OSError) as e:
                    last = e
            else:
                raise PeerUnavailable(f"no relay passed the reversal request on (last: {last})")
            try:
                await asyncio.wait_for(asyncio.shield(fut), wait)
            except asyncio.TimeoutError:
                raise TransportTimeout(f"peer {peer_id[:12]} did not dial back within {wait:g}s") from None
        finally:
            if self._arrivals.get(peer_id) is fut:
                del self._arrivals[peer_id]

    async def _connect_relayed(self, peer_id: str, relay_id: str, relay_address: str) -> None:
        ready, transport = await dial_circuit(self, relay_id, relay_address,
                                              Request(1, C.METHOD_OPEN, C.CircuitOpen(peer_id).to_header()))
        if ready.peer != peer_id:
            transport.abort()
            raise PeerUnavailable(f"relay {relay_id[:12]} connected us to {ready.peer[:12]}, not {peer_id[:12]}")
        await self._run_circuit(transport, self._handshake(True, peer_id), ready,
                                f"{peer_id[:12]} via relay {relay_address}")

    async def _run_circuit(self, transport: asyncio.Transport, hs: Handshake, ready: C.CircuitReady,
                           where: str) -> Connection:
        """The end-to-end connection over a spliced relay socket (the handshake runs through it)."""
        conn = Connection(self, self._conn_config, hs, where, path="relayed", relayed=True)
        conn.remote_ip = ready.observed  # as the relay saw the far end: where a punch may aim
        transport.set_protocol(conn)
        conn.connection_made(transport)
        transport.resume_reading()
        return await conn.ready

    # ------------------------------------------------------------------ hole punching
    def set_observed(self, observed: tuple[str, int] | None) -> str:
        """Where an observer saw a connection from our listening port come from; returns our
        mapping (public | preserving | random | unknown, :func:`peer.punch.classify_mapping`)."""
        if self.address is None:
            raise RuntimeError("start() the host first")
        self.observed = None if observed is None else (observed[0], int(observed[1]))
        self.mapping = classify_mapping(split_address(self.address), self.observed)
        return self.mapping

    async def punch(self, peer_id: str) -> Connection:
        """Hole-punch a direct connection to a connected peer (the offer and answer travel over
        our existing link, typically a relay circuit); raises PunchFailed."""
        if self.observed is None:
            raise PunchFailed("our observed address is unknown (set_observed)")
        offer = PunchOffer.make(self.peer_id, self.observed, self.mapping)
        t0 = time.monotonic()
        _, raw = await self.call(peer_id, METHOD_PUNCH, {}, offer.encode(), timeout=self.connect_timeout)
        rtt = time.monotonic() - t0
        answer = PunchAnswer.decode(bytes(raw))
        if answer.peer_id != peer_id:
            raise ProtocolError(f"punch answer names {answer.peer_id}, not the peer asked {peer_id}")
        self._check_punch_address(peer_id, answer.observed[0])
        return await self._punch(plan(self.peer_id, offer, answer, now=time.time(), rtt_s=rtt))

    def peer_ip(self, peer_id: str) -> str | None:
        """The remote IP of a live connection to ``peer_id`` that is not a relay circuit."""
        for conn in self._conns.get(peer_id, ()):
            if not conn.relayed and conn.remote_ip:
                return conn.remote_ip
        return None

    def _check_punch_address(self, peer_id: str, ip: str) -> None:
        """A punch aims only at an IP the peer is seen at: its sockets' (or, over a relay circuit,
        the one the relay saw), so a peer cannot aim our SYNs at a third party."""
        seen = {c.remote_ip for c in [*self._conns.get(peer_id, ()), *self._spare.get(peer_id, ())] if c.remote_ip}
        if not any(addrscope.same_ip(ip, s) for s in seen):
            raise PunchFailed(f"peer {peer_id[:12]} names {ip[:64]} for a punch, but its connections come from "
                              f"{', '.join(sorted(seen)) or 'nowhere'}: refused")

    async def _on_punch_offer(self, peer_id: str, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        offer = PunchOffer.decode(bytes(payload))
        if offer.peer_id != peer_id:
            raise ProtocolError(f"punch offer names {offer.peer_id}, not its sender")
        if self.observed is None:
            raise PunchFailed("our observed address is unknown")
        if not predict(self.mapping, offer.mapping).worth_trying:
            raise PunchFailed(predict(self.mapping, offer.mapping).reason)
        self._check_punch_address(peer_id, offer.observed[0])
        answer = PunchAnswer.to(offer, self.peer_id, self.observed, self.mapping)
        p = plan(self.peer_id, offer, answer, now=time.time())  # refuses a private address if we are public
        # each answered offer sends up to MAX_ATTEMPTS SYNs: bounded per peer and (free identities) in all
        if self._punch_rate.acquire(peer_id) or self._punch_total.acquire(""):
            raise PunchFailed(f"punch offers are limited to one per {self.limits.punch_interval_s:g} s per peer "
                              f"and {self.limits.punch_rate_per_s:g}/s in all")
        self._claim_punch(p)  # before answering: the peer starts its side once it has the answer
        self._spawn(self._punch(p, claimed=True))
        return {}, answer.encode()

    def _claim_punch(self, p: PunchPlan) -> None:
        if not p.prediction.worth_trying:
            raise PunchFailed(p.prediction.reason)
        if p.peer_id in self._punching:
            raise PunchFailed(f"a punch to {p.peer_id[:12]} is already running")
        self._punch_book.add(p)  # PunchFailed when too many are in flight
        self._punching.add(p.peer_id)

    async def _punch(self, p: PunchPlan, claimed: bool = False) -> Connection:
        """Run a plan: dial from our listening port, or take the connection our listener
        accepts from the punched address meanwhile (:meth:`_take_punched`), whichever comes first."""
        if not claimed:
            self._claim_punch(p)
        inbound = self._punch_inbound[p.attempt] = asyncio.get_running_loop().create_future()
        opener = asyncio.ensure_future(simultaneous_open(split_address(self.address or ""), p.remote, at=p.at,
                                                         window_s=p.window_s))
        try:
            await asyncio.wait((opener, inbound), return_when=asyncio.FIRST_COMPLETED)
            if inbound.done():
                opener.cancel()
                raced = (await asyncio.gather(opener, return_exceptions=True))[0]
                if isinstance(raced, socket.socket):
                    raced.close()
                return await inbound.result().ready
            sock = opener.result()
        finally:
            self._punch_book.remove(p)
            self._punch_inbound.pop(p.attempt, None)
            self._punching.discard(p.peer_id)
            if not opener.done():
                opener.cancel()
        conn = Connection(self, self._conn_config, self._handshake(p.initiator, p.peer_id),
                          f"{p.remote[0]}:{p.remote[1]} (punched)", path="punched")
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        return await conn.ready

    def _take_punched(self, conn: Connection) -> None:
        """An inbound connection from an address a punch aims at is that punch's connection: it
        runs the handshake with the punch's role (lower id initiates) and expected peer."""
        peer = conn.transport.get_extra_info("peername") if conn.transport is not None else None
        try:
            p = self._punch_book.inbound((str(addrscope.parse_ip(peer[0])), peer[1])) if peer else None
        except ValueError:
            return
        inbound = None if p is None else self._punch_inbound.get(p.attempt)
        if p is None or inbound is None or inbound.done():
            return
        self._punch_book.remove(p)  # one connection per punch
        log.info("inbound connection from %s is the punch to %s (%s)", conn.where, p.peer_id[:12],
                 "initiator" if p.initiator else "responder")
        conn.hs = self._handshake(p.initiator, p.peer_id)
        conn.path = "punched"
        conn.where = f"{conn.where} (punched, accepted)"
        inbound.set_result(conn)

    async def _upgrade(self, peer_id: str) -> None:
        try:
            await self.punch(peer_id)
        except (LowbandError, OSError, ValueError) as e:
            log.info("no punched link to %s (the relay stays): %s", peer_id[:12], e)

    async def reserve(self, relay_id: str, relay_address: str) -> None:
        """Hold a reservation at a relay (connect and reserve now; again whenever it is lost), so
        peers that cannot dial us reach us through it."""
        await self.connect(relay_address, expected_peer_id=relay_id)
        await self.call(relay_id, C.METHOD_RESERVE, C.Reserve().to_header(), timeout=self.connect_timeout)
        first = relay_id not in self._reservations
        self._reservations[relay_id] = relay_address
        if first:
            self._spawn(self._hold_reservation(relay_id))

    def release(self, relay_id: str) -> None:
        """Stop re-reserving at a relay (the reservation ends with our connections to it)."""
        self._reservations.pop(relay_id, None)

    async def _hold_reservation(self, relay_id: str) -> None:
        while not self._closing and relay_id in self._reservations:
            await asyncio.sleep(1.0)
            if self.connected(relay_id) or relay_id not in self._reservations:
                continue
            try:
                await self.reserve(relay_id, self._reservations[relay_id])
            except (LowbandError, OSError) as e:
                log.info("re-reserving at relay %s failed: %s", relay_id[:12], e)

    async def _on_incoming(self, peer_id: str, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        """A relay we reserved at says someone wants us: accept its circuit or dial them back."""
        relay_address = self._reservations.get(peer_id)
        if relay_address is None:
            raise PeerUnavailable("we hold no reservation at this peer")
        note = C.Incoming.from_header(header)
        if note.src in self._revoked:
            raise AuthError(f"peer {note.src} was revoked")
        if note.kind == "reverse":
            if self.connected(note.src):
                return {}, b""  # a link is up already: nothing to dial
            address = self._reversal_address(peer_id, note)
            if self._reversal_rate.acquire(note.src) or self._reversal_total.acquire(""):
                raise PeerUnavailable(f"reversal dials are limited to one per {self.limits.reversal_interval_s:g} s "
                                      f"per peer and {self.limits.reversal_rate_per_s:g}/s in all")
            note = C.Incoming("reverse", note.src, address=address)
        if self._incoming_dials >= self.limits.max_incoming_dials:
            raise PeerUnavailable(f"{self._incoming_dials} dials for relays running")
        self._incoming_dials += 1
        self._spawn(self._dial_incoming(peer_id, relay_address, note))
        return {}, b""

    def _reversal_address(self, relay_id: str, note: C.Incoming) -> str:
        """Where a reversal for ``note.src`` may make us dial: the address our route table holds
        for it (the daemon fills it from coordinator-verified rows), else, unless
        ``reverse_unrouted`` is off, the relay's note (an honest relay puts the IP it sees the
        requester at there; a hostile one is bounded by the address scope and the rates)."""
        src = note.src
        if self._reachable.get(src) is False:
            raise PeerUnavailable(f"peer {src[:12]} is not reachable by our routes: no reversal dial")
        routed = self._routes.get(src)
        if routed is not None:
            return routed
        if not self.reverse_unrouted:
            raise PeerUnavailable(f"no route to peer {src[:12]}: no reversal dial")
        relay_ip = self.peer_ip(relay_id)
        err = "no direct connection to the relay" if relay_ip is None else \
            addrscope.dial_error(split_address(note.address)[0], relay_ip)
        if err is not None:
            raise PeerUnavailable(f"reversal address {note.address[:80]} refused: {err}")
        return note.address

    async def _dial_incoming(self, relay_id: str, relay_address: str, note: C.Incoming) -> None:
        try:
            if note.kind == "reverse":
                await self.connect(note.address, note.src, path="reversed")
            else:
                accept = Request(1, C.METHOD_ACCEPT, C.CircuitAccept(note.cid).to_header())
                ready, transport = await dial_circuit(self, relay_id, relay_address, accept)
                await self._run_circuit(transport, self._handshake(False, ready.peer), ready,
                                        f"{ready.peer[:12]} via relay {relay_address}")
        except (LowbandError, OSError) as e:
            log.info("%s from %s via relay %s failed: %s", note.kind, note.src[:12], relay_id[:12], e)
        finally:
            self._incoming_dials -= 1

    def detach(self, conn: Connection) -> None:
        """Take a registered connection out of the pool (a relay splices its socket); the
        connection counts as lost for the pool, the socket lives on."""
        conn.hold()
        if conn.inbound_ip is not None:  # from now on the relay's circuit limits count it
            self._inbound.release(conn.inbound_ip, handshaking=False)
            conn.inbound_ip = None
        if conn.registered:
            conn.registered = False
            self._on_conn_closed(conn, "handed to a relay circuit")

    def _dial_lock(self, peer_id: str) -> asyncio.Lock:
        lock = self._dial_locks.get(peer_id)
        if lock is None:
            lock = self._dial_locks[peer_id] = asyncio.Lock()
        return lock

    async def _replenish(self, peer_id: str) -> None:
        """Dial back up to ``conns_per_peer`` after one connection of a pool was lost."""
        async with self._dial_lock(peer_id):
            missing = self.conns_per_peer - len(self._conns.get(peer_id, []))
            if missing <= 0 or not self._conns.get(peer_id):
                return
            results = await asyncio.gather(*(self._dial(self._routes[peer_id], peer_id) for _ in range(missing)),
                                           return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.info("could not replenish the pool to %s: %s", peer_id[:12], r)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_s)
            now = time.monotonic()
            for peer_id, spare in list(self._spare.items()):
                for conn in list(spare):
                    if not conn.calls and now - conn.last_rx >= _SPARE_IDLE_S:
                        conn.close("replaced by a link without a relay")
            for conns in list(self._conns.values()) + list(self._spare.values()):
                for conn in list(conns):
                    idle = now - conn.last_rx
                    if idle > self.dead_after_s:
                        log.warning("dropping connection %d to %s: nothing received for %.0fs",
                                    conn.id, conn.peer_id[:12], idle)
                        conn.close(f"nothing received for {idle:.0f}s", abort=True)
                    elif idle >= self.keepalive_s:
                        # the PONG refreshes last_rx; queued behind bulk data if need be (one per
                        # keepalive_s: a one-way transfer must not look like a dead peer)
                        conn.write_now(FrameType.PING, {"p": 0}, even_if_full=True)

    def _next_conn(self, peer_id: str, conns: list[Connection]) -> Connection:
        i = self._rr.get(peer_id, 0)
        self._rr[peer_id] = i + 1
        return conns[i % len(conns)]

    # ------------------------------------------------------------------ ConnOwner
    def conn_made(self, conn: Connection, remote_ip: str | None) -> bool:
        if remote_ip is not None:
            if not self._inbound.admit(remote_ip, conn.where):
                return False
            conn.inbound_ip = remote_ip
            if self._punch_inbound:  # a punch is in flight: its peer's SYN may have reached our listener
                self._take_punched(conn)
        self._live.add(conn)
        return True

    def conn_ready(self, conn: Connection) -> LinkStats:
        if self._closing:
            raise PeerUnavailable("host is closing")
        if conn.peer_id in self._revoked:  # also refused by the handshake; this covers a race with revoke()
            raise AuthError(f"peer {conn.peer_id} was revoked")
        if conn.inbound_ip is not None:
            self._inbound.authenticated()
        assert conn.hs.result is not None
        self._roles[conn.peer_id] = conn.hs.result.roles
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keepalive_loop())
            self._tasks.add(self._keepalive)
        arrival = self._arrivals.get(conn.peer_id)
        if arrival is not None and not arrival.done():
            conn.path = "reversed"  # the peer dialled us because we asked it to
            arrival.set_result(None)
        pool = self._conns.setdefault(conn.peer_id, [])
        if conn.path != "relayed" and pool and all(c.path == "relayed" for c in pool):
            self._spare.setdefault(conn.peer_id, []).extend(pool)  # upgrade: new traffic skips the relay
            pool.clear()
            log.info("link to %s upgraded from relayed to %s", conn.peer_id[:12], conn.path)
        elif conn.path == "relayed" and pool and pool[0].path != "relayed":
            self._spare.setdefault(conn.peer_id, []).append(conn)  # keep using the better link
            self._lost.pop(conn.peer_id, None)
            return self._stats_of(conn.peer_id)
        pool.append(conn)
        self._lost.pop(conn.peer_id, None)
        return self._stats_of(conn.peer_id)

    def conn_frame(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        if frame.type == FrameType.DATA:
            delivery = self.reassembler.add_chunk(conn.peer_id, conn.id, h, frame.payload, frame.flags)
            if delivery is not None:
                if delivery.elapsed_s is not None:
                    self._stats_of(conn.peer_id).add_bandwidth(len(delivery.payload), delivery.elapsed_s)
                self._on_message(conn, delivery.message, delivery.payload)
        elif frame.type == FrameType.PING:
            self._on_ping(conn, h, frame.payload)
        elif frame.type == FrameType.PONG:
            pid = h.get("p")
            fut = conn.calls.get(pid) if isinstance(pid, int) else None  # a list/dict id is unhashable
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} in a session")

    def _on_ping(self, conn: Connection, header: dict, payload: bytearray | bytes) -> None:
        """Answer a PING with a PONG at once, if its rate allows and the write buffer has room."""
        pid = header.get("p")
        if (len(header) != 1 or not isinstance(pid, int) or isinstance(pid, bool)
                or not 0 <= pid <= _MAX_PING_ID or payload):
            raise ProtocolError("a PING carries exactly an integer id 'p' and no payload")
        if self._ping_rate.acquire(str(conn.id)):
            conn.ping_strikes += 1
            if conn.ping_strikes >= self.limits.ping_burst:
                log.warning("dropping connection %d to %s: PING flood", conn.id, conn.peer_id[:12])
                conn.close(f"PING flood: more than {self.limits.ping_rate_per_s:g} PINGs/s "
                           f"({conn.ping_strikes} dropped)", abort=True)
            return
        conn.write_now(FrameType.PONG, {"p": pid})  # dropped while the peer does not read

    def conn_lost(self, conn: Connection, reason: str) -> None:
        if conn.inbound_ip is not None:
            self._inbound.release(conn.inbound_ip, handshaking=not conn.registered)
            conn.inbound_ip = None
        self._live.discard(conn)
        if conn.registered:
            self._on_conn_closed(conn, reason)

    # ------------------------------------------------------------------ messages out
    async def _send_message(self, conns: list[Connection], msg: Message, payload: bytes | memoryview,
                            striped: bool, reply: bool = False) -> None:
        """Chunk ``payload``; chunk k goes on conns[k % len(conns)], in order per connection."""
        out = OutgoingMessage(next(self._ids), msg, payload, self.chunk_size, striped)
        lanes = min(len(conns), len(out.offsets))

        async def pump(lane: int) -> None:
            conn = conns[lane]
            for header, chunk in out.lane(lane, lanes):
                await conn.send_frame(FrameType.DATA, header, chunk, out.flags)

        if lanes == 1:  # inline: no extra coroutine per message on the common path
            for header, chunk in out.lane(0, 1):
                await conns[0].send_frame(FrameType.DATA, header, chunk, out.flags, reply)
        else:
            await asyncio.gather(*(pump(k) for k in range(lanes)))

    async def send(self, peer_id: str, tag: str, header: dict, payload: bytes | memoryview = b"", *,
                   lane: int | None = None) -> None:
        """One-way message into the peer's mailbox under ``tag``; returns once written to the sockets.

        ``lane``: carry the message on pooled connection ``lane % pool size`` only (no striping):
        messages on one lane arrive in the order sent, each at the path's full rate, where
        striped ones share the path and all arrive late together (a pipeline wants the former)."""
        conns = list(await self._pool(peer_id))
        if lane is not None:
            conns = [conns[lane % len(conns)]]
        else:
            k = self._rr.get(peer_id, 0)  # rotate the starting lane between messages
            self._rr[peer_id] = k + 1
            k %= len(conns)
            conns = conns[k:] + conns[:k]
        t0 = time.perf_counter()
        nbytes = memoryview(payload).nbytes
        await self._send_message(conns, Mail(tag, header), payload, striped=len(conns) > 1)
        self._stats_of(peer_id).add_bandwidth(nbytes, time.perf_counter() - t0)

    async def call(self, peer_id: str, method: str, header: dict | None = None, payload: bytes | memoryview = b"",
                   timeout: float | None = 30.0) -> tuple[dict, bytearray]:
        """Request/response RPC; raises RemoteError (or a subclass), TransportTimeout or PeerUnavailable."""
        conn = self._next_conn(peer_id, await self._pool(peer_id))
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        conn.calls[call_id] = fut
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._send_message([conn], Request(call_id, method, header or {}), payload, False),
                                   timeout)
            remaining = None if timeout is None else max(0.0, timeout - (time.perf_counter() - t0))
            rhdr, rpayload, handler_s = await asyncio.wait_for(asyncio.shield(fut), remaining)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"call {method!r} to {peer_id[:12]} timed out after {timeout}s") from None
        finally:
            conn.calls.pop(call_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a failure already raised another way must not be logged
        if memoryview(payload).nbytes + len(rpayload) <= 64 * 1024:  # small: time is dominated by RTT
            self._stats_of(peer_id).add_rtt(max(0.0, time.perf_counter() - t0 - handler_s))
        return rhdr, rpayload

    async def ping(self, peer_id: str, timeout: float = 10.0) -> float:
        """Measure one round trip to ``peer_id`` in seconds (also feeds ``link_stats``)."""
        conn = self._next_conn(peer_id, await self._pool(peer_id))
        pid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        conn.calls[pid] = fut  # fails with PeerUnavailable if the connection dies
        t0 = time.perf_counter()
        try:
            await conn.send_frame(FrameType.PING, {"p": pid})
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"ping to {peer_id[:12]} timed out after {timeout}s") from None
        finally:
            conn.calls.pop(pid, None)
        rtt = time.perf_counter() - t0
        self._stats_of(peer_id).add_rtt(rtt)
        return rtt

    # ------------------------------------------------------------------ mailbox
    async def recv(self, peer_id: str, tag: str, timeout: float | None = None) -> tuple[dict, bytearray]:
        """Next message from ``peer_id`` under ``tag``. Raises PeerUnavailable if the peer's
        connections are (or get) lost and nothing is buffered, TransportTimeout on timeout."""
        msg = self.mailbox.take(peer_id, tag)
        if msg is not None:
            return msg
        if peer_id in self._lost or self._closing:
            raise PeerUnavailable(f"peer {peer_id} is not connected")
        return await self.mailbox.wait(peer_id, tag, timeout)

    def discard_tag(self, tag: str) -> int:
        """Drop buffered and partially received messages whose tag starts with ``tag``."""
        return self.mailbox.discard_tag(tag) + self.reassembler.discard_tag(tag)

    # ------------------------------------------------------------------ messages in
    def _on_message(self, conn: Connection, msg: Message, payload: bytearray) -> None:
        if isinstance(msg, Mail):
            refused = self.mailbox.deliver(conn.peer_id, msg.tag, (msg.header, payload))
            if refused is not None:
                self._cut_off(conn.peer_id, refused)
        elif isinstance(msg, Request) and msg.method in C.SOCKET_METHODS and self.relay is not None:
            self.relay.socket_request(conn, msg)  # the socket becomes (one end of) a relay circuit
        elif isinstance(msg, Request):
            conn.hold_reading_if_full()  # its reply could not be written now: read no more requests
            refusal = self.rpc.admit(conn.peer_id, msg)
            if refusal is not None:  # written at once or dropped: a refusal never queues
                header, chunk = next(OutgoingMessage(next(self._ids), refusal, b"", self.chunk_size).lane(0, 1))
                conn.write_now(FrameType.DATA, header, chunk)
            else:
                self._spawn(self._serve(conn, msg, payload))
        else:
            fut = conn.calls.get(msg.call_id)
            if fut is None or fut.done():
                return  # the caller timed out or gave up
            if isinstance(msg, Error):
                fut.set_exception(remote_error(msg, conn.peer_id))
            else:
                assert isinstance(msg, Response)
                fut.set_result((msg.header, payload, msg.handler_s))

    async def _serve(self, conn: Connection, req: Request, payload: bytearray) -> None:
        try:
            reply, out = await self.rpc.serve(conn.peer_id, req, payload)
            try:
                await self._send_message([conn], reply, out, False, reply=True)
            except PeerUnavailable:
                pass  # the caller's connection is gone; it sees PeerUnavailable itself
            except (ProtocolError, TypeError, ValueError) as e:  # e.g. unpackable response header
                await self._send_message([conn], Error(req.call_id, ErrorCode.BAD_RESPONSE, f"bad response: {e}"),
                                         b"", False, reply=True)
        finally:
            self.rpc.done(conn.peer_id)

    def _cut_off(self, peer_id: str, reason: str) -> None:
        log.warning("cutting off %s: %s", peer_id[:12], reason)
        for conn in list(self._conns.get(peer_id, ())) + list(self._spare.get(peer_id, ())):
            conn.close(reason, abort=True)

    def _forget(self, peer_id: str) -> None:
        """Bookkeeping of a peer whose last connection is gone: identities are free, so what a
        departed peer leaves behind must stay bounded (a dialable peer keeps its link stats)."""
        self._roles.pop(peer_id, None)
        self._rr.pop(peer_id, None)
        lock = self._dial_locks.get(peer_id)
        if lock is not None and not lock.locked():
            del self._dial_locks[peer_id]
        if peer_id not in self._routes:
            self._stats.pop(peer_id, None)
        self._lost[peer_id] = None
        if len(self._lost) > _MAX_LOST_PEERS:
            del self._lost[next(iter(self._lost))]  # the oldest: a recv from it then waits for its timeout

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), PeerUnavailable):
            log.warning("transport task failed: %r", task.exception())

    # ------------------------------------------------------------------ failures
    def _on_conn_closed(self, conn: Connection, reason: str) -> None:
        peer_id = conn.peer_id
        conns = self._conns.get(peer_id, [])
        if conn in conns:
            conns.remove(conn)
        spare = self._spare.get(peer_id)
        if spare is not None:
            if conn in spare:
                spare.remove(conn)
            if not conns and spare:  # the better link died: fall back to the relayed one
                conns = self._conns[peer_id] = spare
            if not spare or conns is spare:
                del self._spare[peer_id]
        err = f"connection to {peer_id[:12]} lost ({reason})"
        for fut in conn.calls.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable(err))
        conn.calls.clear()
        # striped messages begun so far may have lost chunks on this connection: drop them all
        self.reassembler.connection_lost(peer_id, conn.id, last=not conns)
        if conns:
            if (peer_id in self._routes and conn.path == "direct" and self._reachable.get(peer_id, True)
                    and not self._closing):
                self._spawn(self._replenish(peer_id))
            return
        self._conns.pop(peer_id, None)
        self._forget(peer_id)
        self.mailbox.fail_peer(peer_id, f"peer {peer_id} is unreachable: {err}")
        if not self._closing:
            for cb in self._lost_callbacks:
                try:
                    cb(peer_id)
                except Exception:
                    log.exception("on_peer_lost callback failed")
