"""Secure asyncio peer transport: :class:`PeerHost`.

Every TCP connection runs the handshake of :mod:`peer.handshake`, then carries AEAD records of
:mod:`peer.secure`, one wire frame per record. Above the frames sits one message layer used by
both RPC and the tagged mailbox: a message is split into chunks (``chunk_size``, ~1 MiB) that
each travel as a DATA frame ``{"i": message id, "o": offset, "n": total, "z": chunk size}``
with the message's metadata on the chunk at offset 0.

- RPC requests and their responses stay on one connection (so a lost connection fails exactly
  the calls it carried).
- One-way ``send`` stripes chunks round-robin over the pool of connections to the peer (several
  TCP flows fill a long fat pipe better than one), and the receiver appends chunks to one
  growing buffer (size limits checked first). Striped chunks carry the STRIPED frame flag: if any connection of the pool dies,
  striped messages in flight from that peer are dropped (their chunks on the dead connection
  are gone), so receivers rely on deadlines and tags, as collectives do anyway.
- Backpressure: after each record write a sender waits while the transport's write buffer is
  above ``write_buffer_bytes`` (pause_writing / resume_writing, i.e. what ``drain()`` does).
- Messages for the same (peer, tag) have no ordering guarantee; give each its own tag.
- Received payloads are ``bytearray``: a multi-chunk message is reassembled in one growing
  buffer, and delivering it without a final copy is what keeps encrypted throughput near the
  raw socket's (a writable buffer is also what torch.frombuffer / numpy want).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Awaitable, Callable

from peer.errors import (AuthError, LowbandError, PeerUnavailable, ProtocolError, RemoteError,
                         TransportTimeout)
from peer.handshake import MAX_HANDSHAKE_FRAME, Handshake
from peer.identity import Identity
from peer.ratelimit import RateLimiter
from peer.secure import RECORD_HEADER_SIZE, SecureChannel
from peer.wire import FrameType

log = logging.getLogger("lowband.transport")

# handler(peer_id, header, payload) -> (header, payload); received payloads are bytearrays
Handler = Callable[[str, dict, bytearray], Awaitable[tuple[dict, bytes | bytearray | memoryview]]]
STRIPED = 0x01  # frame flag: chunk of a message striped over the connection pool
_BANDWIDTH_MIN_BYTES = 4 * 1024 * 1024  # transfers at least this large give bandwidth samples
_EWMA = 0.25
_RING_SLOTS = 6  # recycled record buffers per connection (only allocated by bulk senders)
_RING_MIN_PAYLOAD = 128 * 1024  # smaller records are cheap to allocate fresh


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


@dataclass
class HostLimits:
    """Per-peer resource limits of a PeerHost (exceeding one costs the offender, not the host).

    - ``rpc_rate_per_s`` / ``rpc_burst``: incoming RPC requests per peer (token bucket); excess
      ones get a RemoteError "rate limited" reply without running the handler.
    - ``max_handlers_per_peer``: RPC handlers running at once for one peer; excess requests get
      an immediate "busy" RemoteError reply.
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


@dataclass
class LinkStats:
    """Link measurements from real traffic (EWMA of samples; None until the first sample)."""
    rtt_s: float | None = None
    bandwidth_Bps: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0

    def add_rtt(self, sample: float) -> None:
        self.rtt_s = sample if self.rtt_s is None else (1 - _EWMA) * self.rtt_s + _EWMA * sample

    def add_bandwidth(self, nbytes: int, seconds: float) -> None:
        if nbytes < _BANDWIDTH_MIN_BYTES or seconds <= 0:
            return
        sample = nbytes / seconds
        self.bandwidth_Bps = sample if self.bandwidth_Bps is None else (1 - _EWMA) * self.bandwidth_Bps + _EWMA * sample


class _Partial:
    """A message being reassembled.

    Chunks arriving in order are appended to one growing buffer: no zero-filled preallocation
    of the whole message, so each page is touched once, as data lands, spread over the
    transfer. Chunks that overtake others (striping) wait in ``ahead`` until the gap closes.
    """

    def __init__(self, total: int, chunk: int, striped: bool) -> None:
        self.total = total
        self.chunk = chunk
        self.striped = striped
        self.started = time.perf_counter()
        self.meta: dict | None = None
        self.buf = bytearray()
        self.ahead: dict[int, bytes] = {}
        self.conns: set[int] = set()

    def add(self, off: int, chunk: memoryview) -> bool:
        """Place a chunk (copied now); True once the message is complete."""
        if off < len(self.buf) or off in self.ahead:
            raise ProtocolError(f"duplicate chunk at offset {off}")
        if off == len(self.buf):
            self.buf += chunk
            while (nxt := self.ahead.pop(len(self.buf), None)) is not None:
                self.buf += nxt
        else:
            self.ahead[off] = bytes(chunk)
        return len(self.buf) == self.total


class _Conn(asyncio.BufferedProtocol):
    """One TCP connection: the sans-IO handshake, then AEAD records.

    A BufferedProtocol lets the kernel copy each record straight into a reused ciphertext
    buffer, which is decrypted into a reused plaintext buffer; consumers copy the payload out
    synchronously (into the message being reassembled). No stream-buffer copies, no fresh
    page-faulting allocation per record.
    """

    _ids = itertools.count(1)

    def __init__(self, host: "PeerHost", handshake: Handshake, where: str) -> None:
        self.id = next(self._ids)
        self.host = host
        self.hs = handshake
        self.where = where
        self.peer_id = ""  # known once the handshake is done
        self.channel: SecureChannel | None = None
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()  # handshake outcome
        if not handshake.initiator:
            self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits inbound ones
        self.closed = False
        self.registered = False
        self.calls: dict[int, asyncio.Future] = {}  # call/ping id -> future, for requests sent here
        self._reason = "closed by peer"
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._hs_buf = bytearray(MAX_HANDSHAKE_FRAME)
        self._head = bytearray(RECORD_HEADER_SIZE)
        self._body = bytearray()
        self._plain = bytearray()
        self._filled = 0
        self._need = 0  # ciphertext length of the record being read; 0 while reading its header
        self._timer: asyncio.TimerHandle | None = None
        self.last_rx = time.monotonic()
        self._ring: list[list] = []  # [record buffer, stream position of its end] for large records
        self._written = 0  # bytes handed to the transport so far
        self.inbound_ip: str | None = None  # remote IP while counted against the inbound limits

    # ---------------------------------------------------------------- asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is not a subclass)
        if not self.hs.initiator:
            peer = transport.get_extra_info("peername")
            self.where = f"{peer[0]}:{peer[1]}" if peer else self.where
            if not self.host._admit_inbound(self, peer[0] if peer else "?"):
                self.closed = True
                transport.abort()
                return
        self.host._live.add(self)
        transport.set_write_buffer_limits(high=self.host.write_buffer_bytes)
        self._timer = asyncio.get_running_loop().call_later(self.host.handshake_timeout, self._handshake_timeout)
        self._flush_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.channel is None:
            return memoryview(self._hs_buf)
        if self._need == 0:
            return memoryview(self._head)[self._filled:]
        return memoryview(self._body)[self._filled:self._need]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        try:
            if self.channel is None:
                self._on_handshake_bytes(bytes(self._hs_buf[:nbytes]))
            else:
                self._advance(nbytes)
        except ProtocolError as e:
            if self.registered:
                log.warning("dropping connection %d to %s: %s", self.id, self.peer_id[:12], e)
            self.close(f"protocol violation: {e}", abort=True)
        except Exception as e:  # a bug must cost this connection only, never the event loop
            log.exception("dropping connection %d to %s after an internal error", self.id, self.peer_id[:12])
            self.close(f"internal error: {type(e).__name__}: {e}", abort=True)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inbound_ip is not None:
            self.host._release_inbound(self.inbound_ip)
            self.inbound_ip = None
        self.closed = True
        self._can_write.set()  # wake writers; they see ``closed``
        self.host._live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(PeerUnavailable(f"{self.where} closed the connection during the handshake"))
        if self.registered:
            self.host._on_conn_closed(self, self._reason if exc is None else f"{self._reason}: {exc}")

    # ---------------------------------------------------------------- handshake
    def _flush_handshake(self) -> None:
        out = self.hs.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _on_handshake_bytes(self, data: bytes) -> None:
        try:
            self.hs.receive_data(data)
        except (AuthError, ProtocolError) as e:
            self._flush_handshake()  # the REJECT frame with our reason goes out before we close
            self._fail_handshake(e)
            return
        self._flush_handshake()
        if not self.hs.done:
            return
        assert self.hs.result is not None
        if self._timer is not None:
            self._timer.cancel()
        self.peer_id = self.hs.result.peer_id
        self.channel = SecureChannel(self.hs.result.send_key, self.hs.result.recv_key,
                                     max_payload=self.host.chunk_size)
        if not self.host._register(self):
            self._fail_handshake(PeerUnavailable("host is closing"))
            return
        self.ready.set_result(self)
        self._consume(self.hs.take_trailing_data())  # records that arrived with the last handshake frame

    def _fail_handshake(self, err: LowbandError) -> None:
        if not self.hs.initiator:
            log.warning("rejected inbound connection from %s: %s", self.where, err)
        if not self.ready.done():
            self.ready.set_exception(err)
        self.close(str(err))

    def _handshake_timeout(self) -> None:
        if not self.ready.done():
            self._fail_handshake(TransportTimeout(
                f"handshake with {self.where} timed out after {self.host.handshake_timeout}s"))

    # ---------------------------------------------------------------- records
    def _consume(self, data: bytes) -> None:
        """Push already-received bytes through the same path as socket reads."""
        mv, pos = memoryview(data), 0
        while pos < len(mv) and not self.closed:
            buf = self.get_buffer(-1)
            k = min(len(buf), len(mv) - pos)
            buf[:k] = mv[pos:pos + k]
            pos += k
            self._advance(k)

    def _advance(self, nbytes: int) -> None:
        assert self.channel is not None
        self._filled += nbytes
        if self._need == 0:
            if self._filled == RECORD_HEADER_SIZE:
                self._need = self.channel.record_length(self._head)
                self._filled = 0
                if len(self._body) < self._need:
                    self._body = bytearray(self._need)  # grows to the largest record once
            return
        if self._filled < self._need:
            return
        clen, self._need, self._filled = self._need, 0, 0
        if len(self._plain) < clen:
            self._plain = bytearray(clen)
        frame = self.channel.open_record_into(self._head, memoryview(self._body)[:clen], self._plain)
        self.host._stats[self.peer_id].bytes_received += RECORD_HEADER_SIZE + clen
        self.host._on_frame(self, frame)

    async def send_frame(self, type_: int, header: dict, payload: bytes | memoryview = b"", flags: int = 0) -> None:
        if self.closed or self.channel is None or self.transport is None:
            raise PeerUnavailable(f"connection to {self.peer_id[:12]} is closed")
        # seal + write without an await in between: counters follow the byte order on the socket
        slot = self._free_slot() if len(payload) >= _RING_MIN_PAYLOAD else None
        record = self.channel.seal_frame(type_, header, payload, flags, None if slot is None else slot[0])
        self.transport.write(record)
        self._written += len(record)
        if slot is not None:
            slot[1] = self._written  # reusable once the transport has flushed this far
        self.host._stats[self.peer_id].bytes_sent += len(record)
        if not self._can_write.is_set():  # backpressure: the write buffer is above its high mark
            await self._can_write.wait()
        if self.closed:
            raise PeerUnavailable(f"connection to {self.peer_id[:12]} lost while sending ({self._reason})")

    def _free_slot(self) -> list | None:
        """A record buffer of the ring that the transport no longer references, if any.

        Transports flush FIFO and drop their reference to a buffer once it is fully handed to
        the kernel, so a buffer whose last byte lies before the flushed mark is free again.
        """
        assert self.transport is not None and self.channel is not None
        flushed = self._written - self.transport.get_write_buffer_size()
        for slot in self._ring:
            if slot[1] <= flushed:
                return slot
        if len(self._ring) < _RING_SLOTS:
            self._ring.append([bytearray(self.channel.max_record_bytes), 0])
            return self._ring[-1]
        return None  # all in flight: this record gets a fresh buffer

    def close(self, reason: str, abort: bool = False) -> None:
        if self.closed or self.transport is None:
            return
        self._reason = reason
        if abort:
            self.transport.abort()
        else:
            self.transport.close()


class PeerHost:
    """A peer's endpoint: listens, dials, authenticates, and moves messages between peers."""

    def __init__(self, identity: Identity, token: bytes, *, conns_per_peer: int = 4,
                 chunk_size: int = 1 << 20, max_message_bytes: int = 1 << 31,
                 max_pending_bytes_per_peer: int = 1 << 32,
                 connect_timeout: float = 10.0, handshake_timeout: float = 10.0,
                 write_buffer_bytes: int = 4 << 20, max_partials_per_peer: int = 4096,
                 keepalive_s: float = 10.0, dead_after_s: float = 60.0,
                 limits: HostLimits | None = None) -> None:
        if conns_per_peer < 1:
            raise ValueError("conns_per_peer must be >= 1")
        self.limits = limits or HostLimits()
        self._rpc_rate = RateLimiter(self.limits.rpc_rate_per_s, self.limits.rpc_burst)
        self._serving: dict[str, int] = defaultdict(int)  # peer id -> RPC handlers running
        self._mail_bytes: dict[str, int] = defaultdict(int)  # peer id -> completed, unread bytes
        self._inbound: dict[str, int] = defaultdict(int)  # remote IP -> open inbound connections
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
        self._keepalive: asyncio.Task | None = None
        self.address: str | None = None
        self._token = bytes(token)
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[str, list[_Conn]] = defaultdict(list)
        self._rr: dict[str, int] = defaultdict(int)
        self._routes: dict[str, str] = {}
        self._dial_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._handlers: dict[str, Handler] = {}
        self._mail: dict[tuple[str, str], deque] = defaultdict(deque)
        self._waiters: dict[tuple[str, str], deque[asyncio.Future]] = defaultdict(deque)
        self._partials: dict[str, dict[int, _Partial]] = defaultdict(dict)
        self._max_striped_mid: dict[str, int] = {}  # highest striped message id seen per peer
        self._striped_watermark: dict[str, int] = {}  # striped ids at or below it are broken
        self._lost: set[str] = set()
        self._lost_callbacks: list[Callable[[str], object]] = []
        self._stats: dict[str, LinkStats] = defaultdict(LinkStats)
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._live: set[_Conn] = set()  # every open transport, handshaking or registered

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port); returns and sets ``self.address``."""
        self._server = await asyncio.get_running_loop().create_server(self._on_inbound, host, port)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{sock_host}:{sock_port}"
        return self.address

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._live):
            conn.close("host closed", abort=True)
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(PeerUnavailable("host closed"))
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
    def add_route(self, peer_id: str, address: str) -> None:
        """Remember where to dial ``peer_id`` when a send/call needs a connection."""
        split_address(address)
        self._routes[peer_id] = address

    def connected_peers(self) -> list[str]:
        return [p for p, conns in self._conns.items() if conns]

    def handle(self, method: str, fn: Handler) -> None:
        """Register ``async fn(peer_id, header, payload) -> (header, payload)`` for ``method``."""
        self._handlers[method] = fn

    def on_peer_lost(self, callback: Callable[[str], object]) -> None:
        """``callback(peer_id)`` runs when the last connection to a peer is gone."""
        self._lost_callbacks.append(callback)

    def link_stats(self, peer_id: str) -> LinkStats:
        s = self._stats.get(peer_id)
        return LinkStats() if s is None else LinkStats(s.rtt_s, s.bandwidth_Bps, s.bytes_sent, s.bytes_received)

    # ------------------------------------------------------------------ connecting
    async def connect(self, address: str, expected_peer_id: str | None = None) -> str:
        """Dial ``address``, authenticate, fill the connection pool; returns the remote peer id."""
        conn = await self._dial(address, expected_peer_id)
        peer_id = conn.peer_id
        self._routes[peer_id] = address
        missing = self.conns_per_peer - len(self._conns[peer_id])
        if missing > 0:
            results = await asyncio.gather(*(self._dial(address, peer_id) for _ in range(missing)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.warning("extra connection to %s failed: %s", peer_id[:12], r)
        return peer_id

    async def _dial(self, address: str, expected_peer_id: str | None) -> _Conn:
        host, port = split_address(address)
        hs = Handshake(self.identity, self._token, initiator=True, expected_peer_id=expected_peer_id)
        conn = _Conn(self, hs, address)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_connection(lambda: conn, host, port),
                                   self.connect_timeout)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"connect to {address} timed out after {self.connect_timeout}s") from None
        except OSError as e:
            raise PeerUnavailable(f"cannot connect to {address}: {e}") from e
        return await conn.ready  # bounded by the handshake timer started in connection_made

    def _on_inbound(self) -> _Conn:
        return _Conn(self, Handshake(self.identity, self._token, initiator=False), "inbound peer")

    def _admit_inbound(self, conn: _Conn, ip: str) -> bool:
        """Count an accepted connection against the inbound limits; False: over a limit."""
        lim = self.limits
        total = sum(self._inbound.values())
        if total >= lim.max_inbound_connections or self._inbound[ip] >= lim.max_inbound_per_address:
            log.warning("refused inbound connection from %s: %d open in total (limit %d), %d from "
                        "this address (limit %d)", conn.where, total, lim.max_inbound_connections,
                        self._inbound[ip], lim.max_inbound_per_address)
            if not self._inbound[ip]:
                del self._inbound[ip]
            return False
        self._inbound[ip] += 1
        conn.inbound_ip = ip
        return True

    def _release_inbound(self, ip: str) -> None:
        self._inbound[ip] -= 1
        if self._inbound[ip] <= 0:
            del self._inbound[ip]

    def _register(self, conn: _Conn) -> bool:
        if self._closing:
            return False
        conn.registered = True
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keepalive_loop())
            self._tasks.add(self._keepalive)
        self._conns[conn.peer_id].append(conn)
        self._lost.discard(conn.peer_id)
        return True

    async def _pool(self, peer_id: str) -> list[_Conn]:
        """Live connections to ``peer_id``, dialing through its route if there are none."""
        conns = self._conns.get(peer_id)
        if conns:
            return conns
        if self._closing:
            raise PeerUnavailable("host is closed")
        address = self._routes.get(peer_id)
        if address is None:
            raise PeerUnavailable(f"no connection and no route to peer {peer_id}")
        async with self._dial_locks[peer_id]:
            if not self._conns.get(peer_id):
                await self.connect(address, expected_peer_id=peer_id)
        conns = self._conns.get(peer_id)
        if not conns:
            raise PeerUnavailable(f"could not open a connection to peer {peer_id}")
        return conns

    async def _replenish(self, peer_id: str) -> None:
        """Dial back up to ``conns_per_peer`` after one connection of a pool was lost."""
        async with self._dial_locks[peer_id]:
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
            for conns in list(self._conns.values()):
                for conn in list(conns):
                    idle = now - conn.last_rx
                    if idle > self.dead_after_s:
                        log.warning("dropping connection %d to %s: nothing received for %.0fs",
                                    conn.id, conn.peer_id[:12], idle)
                        conn.close(f"nothing received for {idle:.0f}s", abort=True)
                    elif idle >= self.keepalive_s:
                        self._spawn(conn.send_frame(FrameType.PING, {"p": 0}))  # the PONG refreshes last_rx

    def _next_conn(self, peer_id: str, conns: list[_Conn]) -> _Conn:
        i = self._rr[peer_id]
        self._rr[peer_id] = i + 1
        return conns[i % len(conns)]

    # ------------------------------------------------------------------ messages out
    async def _send_message(self, conns: list[_Conn], meta: dict, payload: bytes | memoryview,
                            striped: bool) -> None:
        """Chunk ``payload``; chunk k goes on conns[k % len(conns)], in order per connection."""
        view = memoryview(payload).cast("B")
        total = len(view)
        mid = next(self._ids)
        size = self.chunk_size
        offsets = list(range(0, total, size)) or [0]
        flags = STRIPED if striped else 0

        async def pump(lane: int) -> None:
            conn = conns[lane]
            for off in offsets[lane::len(conns)]:
                header = {"i": mid, "o": off, "n": total, "z": size}
                if off == 0:
                    header.update(meta)
                await conn.send_frame(FrameType.DATA, header, view[off:off + size], flags)

        lanes = min(len(conns), len(offsets))
        if lanes == 1:
            await pump(0)
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
            k = self._rr[peer_id] % len(conns)  # rotate the starting lane between messages
            self._rr[peer_id] += 1
            conns = conns[k:] + conns[:k]
        t0 = time.perf_counter()
        nbytes = memoryview(payload).nbytes
        await self._send_message(conns, {"k": "m", "t": tag, "h": header}, payload, striped=len(conns) > 1)
        self._stats[peer_id].add_bandwidth(nbytes, time.perf_counter() - t0)

    async def call(self, peer_id: str, method: str, header: dict | None = None, payload: bytes | memoryview = b"",
                   timeout: float | None = 30.0) -> tuple[dict, bytearray]:
        """Request/response RPC; raises RemoteError, TransportTimeout or PeerUnavailable."""
        conn = self._next_conn(peer_id, await self._pool(peer_id))
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        conn.calls[call_id] = fut
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._send_message([conn], {"k": "q", "c": call_id, "m": method,
                                                                "h": header or {}}, payload, False), timeout)
            remaining = None if timeout is None else max(0.0, timeout - (time.perf_counter() - t0))
            rhdr, rpayload, handler_s = await asyncio.wait_for(asyncio.shield(fut), remaining)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"call {method!r} to {peer_id[:12]} timed out after {timeout}s") from None
        finally:
            conn.calls.pop(call_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a failure already raised another way must not be logged
        if memoryview(payload).nbytes + len(rpayload) <= 64 * 1024:  # small: time is dominated by RTT
            self._stats[peer_id].add_rtt(max(0.0, time.perf_counter() - t0 - handler_s))
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
        self._stats[peer_id].add_rtt(rtt)
        return rtt

    # ------------------------------------------------------------------ mailbox
    async def recv(self, peer_id: str, tag: str, timeout: float | None = None) -> tuple[dict, bytearray]:
        """Next message from ``peer_id`` under ``tag``. Raises PeerUnavailable if the peer's
        connections are (or get) lost and nothing is buffered, TransportTimeout on timeout."""
        key = (peer_id, tag)
        box = self._mail.get(key)
        if box:
            msg = box.popleft()
            if not box:
                del self._mail[key]
            self._unbuffer(peer_id, len(msg[1]))
            return msg
        if peer_id in self._lost or self._closing:
            raise PeerUnavailable(f"peer {peer_id} is not connected")
        fut = asyncio.get_running_loop().create_future()
        self._waiters[key].append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"no message {tag!r} from {peer_id[:12]} within {timeout}s") from None
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                if fut in waiters:  # membership test first: deque.remove's error would repr a huge result
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[key]

    def discard_tag(self, tag: str) -> int:
        """Drop buffered and partially received messages whose tag starts with ``tag``."""
        dropped = 0
        for key in [k for k in self._mail if k[1].startswith(tag)]:
            box = self._mail.pop(key)
            dropped += len(box)
            self._unbuffer(key[0], sum(len(payload) for _, payload in box))
        for partials in self._partials.values():
            for mid in [m for m, p in partials.items() if p.meta and str(p.meta.get("t", "")).startswith(tag)]:
                del partials[mid]
                dropped += 1
        return dropped

    def _deliver(self, peer_id: str, tag: str, msg: tuple[dict, bytearray]) -> None:
        key = (peer_id, tag)
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(msg)
                return
        buffered, size, limit = self._mail_bytes[peer_id], len(msg[1]), self.limits.max_mailbox_bytes_per_peer
        if buffered and buffered + size > limit:
            # nobody reads what this peer sends: cut it off rather than buffer without bound
            log.warning("dropping connections to %s: %d unread bytes buffered, a %d-byte message "
                        "under %r would exceed the %d-byte mailbox limit", peer_id[:12], buffered,
                        size, tag, limit)
            for conn in list(self._conns.get(peer_id, ())):
                conn.close(f"mailbox limit of {limit} unread bytes exceeded", abort=True)
            return
        self._mail_bytes[peer_id] = buffered + size
        self._mail[key].append(msg)

    def _unbuffer(self, peer_id: str, size: int) -> None:
        left = self._mail_bytes.get(peer_id, 0) - size
        if left > 0:
            self._mail_bytes[peer_id] = left
        else:
            self._mail_bytes.pop(peer_id, None)

    # ------------------------------------------------------------------ messages in
    def _on_frame(self, conn: _Conn, frame) -> None:
        h = frame.header
        if frame.type == FrameType.DATA:
            self._on_chunk(conn, h, frame.payload, bool(frame.flags & STRIPED))
        elif frame.type == FrameType.PING:
            self._spawn(conn.send_frame(FrameType.PONG, {"p": h.get("p")}))
        elif frame.type == FrameType.PONG:
            pid = h.get("p")
            fut = conn.calls.get(pid) if isinstance(pid, int) else None  # a list/dict id is unhashable
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} in a session")

    def _on_chunk(self, conn: _Conn, h: dict, chunk: memoryview, striped: bool) -> None:
        """Place one chunk (a view into the connection's reused plaintext buffer: copy it now)."""
        mid, off, total, size = h.get("i"), h.get("o"), h.get("n"), h.get("z")
        if not all(isinstance(v, int) and v >= 0 for v in (mid, off, total, size)) or size == 0:
            raise ProtocolError("DATA chunk needs integers i, o, n >= 0 and z > 0")
        if total > self.max_message_bytes:
            raise ProtocolError(f"message of {total} bytes exceeds limit {self.max_message_bytes}")
        # fixed chunk grid: chunk k covers [k*z, min((k+1)*z, n)), so distinct offsets never overlap
        if off % size or off >= max(total, 1) or len(chunk) != min(size, total - off):
            raise ProtocolError(f"chunk at {off} of {len(chunk)} bytes is off the {size}-byte grid of {total}")
        if off == 0 and len(chunk) == total:  # fast path: the whole message in one chunk
            self._on_message(conn, h, bytearray(chunk))
            return
        partials = self._partials[conn.peer_id]
        p = partials.get(mid)
        if p is None:
            if striped:
                if mid <= self._striped_watermark.get(conn.peer_id, -1):
                    return  # part of a striped message broken by a lost connection
                self._max_striped_mid[conn.peer_id] = max(mid, self._max_striped_mid.get(conn.peer_id, -1))
            if len(partials) >= self.max_partials_per_peer:
                raise ProtocolError(f"more than {self.max_partials_per_peer} partial messages in flight")
            if sum(q.total for q in partials.values()) + total > self.max_pending_bytes_per_peer:
                raise ProtocolError(f"partial messages would exceed {self.max_pending_bytes_per_peer} bytes")
            p = partials[mid] = _Partial(total, size, striped)
        if p.total != total or p.chunk != size:
            raise ProtocolError(f"chunk of message {mid} disagrees with its earlier chunks on sizes")
        p.conns.add(conn.id)
        if off == 0:
            p.meta = h
        if not p.add(off, chunk):
            return
        del partials[mid]
        assert p.meta is not None  # all grid chunks present, so offset 0 is too
        self._stats[conn.peer_id].add_bandwidth(total, time.perf_counter() - p.started)
        self._on_message(conn, p.meta, p.buf)

    def _on_message(self, conn: _Conn, meta: dict, payload: bytearray) -> None:
        kind = meta.get("k")
        if kind == "m":
            tag, header = meta.get("t"), meta.get("h")
            if not isinstance(tag, str) or not isinstance(header, dict):
                raise ProtocolError("message needs a str tag and a dict header")
            self._deliver(conn.peer_id, tag, (header, payload))
        elif kind == "q":
            method, call_id, header = meta.get("m"), meta.get("c"), meta.get("h")
            if not isinstance(method, str) or not isinstance(call_id, int) or not isinstance(header, dict):
                raise ProtocolError("request needs str method, int call id, dict header")
            refusal = self._refuse_rpc(conn.peer_id)
            if refusal:
                self._spawn(self._send_message([conn], {"k": "e", "c": call_id, "err": refusal}, b"", False))
                return
            self._serving[conn.peer_id] += 1
            self._spawn(self._serve(conn, call_id, method, header, payload))
        elif kind in ("r", "e"):
            call_id = meta.get("c")
            fut = conn.calls.get(call_id) if isinstance(call_id, int) else None  # unhashable ids too
            if fut is None or fut.done():
                return  # the caller timed out or gave up
            if kind == "e":
                fut.set_exception(RemoteError(f"{conn.peer_id[:12]}: {meta.get('err')}"))
            else:
                header = meta.get("h")
                if not isinstance(header, dict):
                    raise ProtocolError("response needs a dict header")
                d = meta.get("d")
                fut.set_result((header, payload, d if isinstance(d, (int, float)) else 0.0))
        else:
            raise ProtocolError(f"unknown message kind {kind!r}")

    def _refuse_rpc(self, peer_id: str) -> str | None:
        """Why an incoming request from ``peer_id`` is refused (None: serve it)."""
        lim = self.limits
        if self._serving[peer_id] >= lim.max_handlers_per_peer:
            return f"busy: {lim.max_handlers_per_peer} requests of this peer are already being handled"
        wait = self._rpc_rate.acquire(peer_id)
        if wait:
            return (f"rate limited: more than {lim.rpc_rate_per_s:g} requests/s (burst {lim.rpc_burst}); "
                    f"retry after {wait:.3f}s")
        return None

    async def _serve(self, conn: _Conn, call_id: int, method: str, header: dict, payload: bytearray) -> None:
        try:
            await self._run_handler(conn, call_id, method, header, payload)
        finally:
            self._serving[conn.peer_id] -= 1
            if self._serving[conn.peer_id] <= 0:
                del self._serving[conn.peer_id]

    async def _run_handler(self, conn: _Conn, call_id: int, method: str, header: dict, payload: bytearray) -> None:
        fn = self._handlers.get(method)
        t0 = time.perf_counter()
        if fn is None:
            meta, out = {"k": "e", "c": call_id, "err": f"LookupError: no handler for method {method!r}"}, b""
        else:
            try:
                rhdr, out = await fn(conn.peer_id, header, payload)
                meta = {"k": "r", "c": call_id, "h": rhdr, "d": time.perf_counter() - t0}
            except asyncio.CancelledError:
                raise
            except Exception as e:  # reported to the caller as RemoteError
                log.debug("handler %s failed", method, exc_info=True)
                meta, out = {"k": "e", "c": call_id, "err": f"{type(e).__name__}: {e}"}, b""
        try:
            await self._send_message([conn], meta, out, False)
        except PeerUnavailable:
            pass  # the caller's connection is gone; it sees PeerUnavailable itself
        except (ProtocolError, TypeError, ValueError) as e:  # e.g. unpackable response header
            await self._send_message([conn], {"k": "e", "c": call_id, "err": f"bad response: {e}"}, b"", False)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), PeerUnavailable):
            log.warning("transport task failed: %r", task.exception())

    # ------------------------------------------------------------------ failures
    def _on_conn_closed(self, conn: _Conn, reason: str) -> None:
        peer_id = conn.peer_id
        conns = self._conns.get(peer_id, [])
        if conn in conns:
            conns.remove(conn)
        err = f"connection to {peer_id[:12]} lost ({reason})"
        for fut in conn.calls.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable(err))
        conn.calls.clear()
        # striped messages begun so far may have lost chunks on this connection: drop them all
        self._striped_watermark[peer_id] = self._max_striped_mid.get(peer_id, -1)
        partials = self._partials.get(peer_id, {})
        for mid in [m for m, p in partials.items() if p.striped or conn.id in p.conns]:
            del partials[mid]
        if conns:
            if peer_id in self._routes and not self._closing:
                self._spawn(self._replenish(peer_id))
            return
        self._conns.pop(peer_id, None)
        self._lost.add(peer_id)
        self._partials.pop(peer_id, None)
        for key in [k for k in self._waiters if k[0] == peer_id]:
            for fut in self._waiters.pop(key):
                if not fut.done():
                    fut.set_exception(PeerUnavailable(f"peer {peer_id} is unreachable: {err}"))
        if not self._closing:
            for cb in self._lost_callbacks:
                try:
                    cb(peer_id)
                except Exception:
                    log.exception("on_peer_lost callback failed")
