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
from typing import Callable

from peer.conn import ConnConfig, Connection
from peer.errors import PeerUnavailable, ProtocolError, TransportTimeout
from peer.handshake import Handshake
from peer.identity import Identity
from peer.limits import HostLimits, InboundGate
from peer.linkstats import LinkStats
from peer.mailbox import Mailbox
from peer.messages import (STRIPED, Error, ErrorCode, Mail, Message, OutgoingMessage, Reassembler, Request,
                           Response, remote_error)
from peer.rpc import Handler, RpcServer
from peer.wire import Frame, FrameType

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
        self.mailbox = Mailbox(self.limits.max_mailbox_bytes_per_peer)
        self.reassembler = Reassembler(max_message_bytes, max_pending_bytes_per_peer, max_partials_per_peer)
        self.rpc = RpcServer(self.limits)
        self._conn_config = ConnConfig(chunk_size, write_buffer_bytes, handshake_timeout)
        self._inbound = InboundGate(self.limits)
        self._keepalive: asyncio.Task | None = None
        self._token = bytes(token)
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[str, list[Connection]] = {}
        self._rr: dict[str, int] = {}
        self._routes: dict[str, str] = {}
        self._dial_locks: dict[str, asyncio.Lock] = {}
        self._lost: set[str] = set()
        self._lost_callbacks: list[Callable[[str], object]] = []
        self._stats: dict[str, LinkStats] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._live: set[Connection] = set()  # every open transport, handshaking or registered

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
    def add_route(self, peer_id: str, address: str) -> None:
        """Remember where to dial ``peer_id`` when a send/call needs a connection."""
        split_address(address)
        self._routes[peer_id] = address

    def connected_peers(self) -> list[str]:
        return [p for p, conns in self._conns.items() if conns]

    def handle(self, method: str, fn: Handler) -> None:
        """Register ``async fn(peer_id, header, payload) -> (header, payload)`` for ``method``."""
        self.rpc.handle(method, fn)

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
    async def connect(self, address: str, expected_peer_id: str | None = None) -> str:
        """Dial ``address``, authenticate, fill the connection pool; returns the remote peer id."""
        conn = await self._dial(address, expected_peer_id)
        peer_id = conn.peer_id
        self._routes[peer_id] = address
        missing = self.conns_per_peer - len(self._conns.get(peer_id, ()))
        if missing > 0:
            results = await asyncio.gather(*(self._dial(address, peer_id) for _ in range(missing)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.warning("extra connection to %s failed: %s", peer_id[:12], r)
        return peer_id

    async def _dial(self, address: str, expected_peer_id: str | None) -> Connection:
        host, port = split_address(address)
        hs = Handshake(self.identity, self._token, initiator=True, expected_peer_id=expected_peer_id)
        conn = Connection(self, self._conn_config, hs, address)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_connection(lambda: conn, host, port),
                                   self.connect_timeout)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"connect to {address} timed out after {self.connect_timeout}s") from None
        except OSError as e:
            raise PeerUnavailable(f"cannot connect to {address}: {e}") from e
        return await conn.ready  # bounded by the handshake timer started in connection_made

    def _on_inbound(self) -> Connection:
        return Connection(self, self._conn_config, Handshake(self.identity, self._token, initiator=False),
                          "inbound peer")

    async def _pool(self, peer_id: str) -> list[Connection]:
        """Live connections to ``peer_id``, dialing through its route if there are none."""
        conns = self._conns.get(peer_id)
        if conns:
            return conns
        if self._closing:
            raise PeerUnavailable("host is closed")
        address = self._routes.get(peer_id)
        if address is None:
            raise PeerUnavailable(f"no connection and no route to peer {peer_id}")
        async with self._dial_lock(peer_id):
            if not self._conns.get(peer_id):
                await self.connect(address, expected_peer_id=peer_id)
        conns = self._conns.get(peer_id)
        if not conns:
            raise PeerUnavailable(f"could not open a connection to peer {peer_id}")
        return conns

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
            for conns in list(self._conns.values()):
                for conn in list(conns):
                    idle = now - conn.last_rx
                    if idle > self.dead_after_s:
                        log.warning("dropping connection %d to %s: nothing received for %.0fs",
                                    conn.id, conn.peer_id[:12], idle)
                        conn.close(f"nothing received for {idle:.0f}s", abort=True)
                    elif idle >= self.keepalive_s:
                        self._spawn(conn.send_frame(FrameType.PING, {"p": 0}))  # the PONG refreshes last_rx

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
        self._live.add(conn)
        return True

    def conn_ready(self, conn: Connection) -> LinkStats | None:
        if self._closing:
            return None
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keepalive_loop())
            self._tasks.add(self._keepalive)
        self._conns.setdefault(conn.peer_id, []).append(conn)
        self._lost.discard(conn.peer_id)
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
            self._spawn(conn.send_frame(FrameType.PONG, {"p": h.get("p")}))
        elif frame.type == FrameType.PONG:
            pid = h.get("p")
            fut = conn.calls.get(pid) if isinstance(pid, int) else None  # a list/dict id is unhashable
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} in a session")

    def conn_lost(self, conn: Connection, reason: str) -> None:
        if conn.inbound_ip is not None:
            self._inbound.release(conn.inbound_ip)
            conn.inbound_ip = None
        self._live.discard(conn)
        if conn.registered:
            self._on_conn_closed(conn, reason)

    # ------------------------------------------------------------------ messages out
    async def _send_message(self, conns: list[Connection], msg: Message, payload: bytes | memoryview,
                            striped: bool) -> None:
        """Chunk ``payload``; chunk k goes on conns[k % len(conns)], in order per connection."""
        out = OutgoingMessage(next(self._ids), msg, payload, self.chunk_size, striped)
        lanes = min(len(conns), len(out.offsets))

        async def pump(lane: int) -> None:
            conn = conns[lane]
            for header, chunk in out.lane(lane, lanes):
                await conn.send_frame(FrameType.DATA, header, chunk, out.flags)

        if lanes == 1:  # inline: no extra coroutine per message on the common path
            for header, chunk in out.lane(0, 1):
                await conns[0].send_frame(FrameType.DATA, header, chunk, out.flags)
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
            if not self.mailbox.deliver(conn.peer_id, msg.tag, (msg.header, payload)):
                limit = self.limits.max_mailbox_bytes_per_peer
                for c in list(self._conns.get(conn.peer_id, ())):
                    c.close(f"mailbox limit of {limit} unread bytes exceeded", abort=True)
        elif isinstance(msg, Request):
            refusal = self.rpc.admit(conn.peer_id, msg)
            if refusal is not None:
                self._spawn(self._send_message([conn], refusal, b"", False))
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
        reply, out = await self.rpc.serve(conn.peer_id, req, payload)
        try:
            await self._send_message([conn], reply, out, False)
        except PeerUnavailable:
            pass  # the caller's connection is gone; it sees PeerUnavailable itself
        except (ProtocolError, TypeError, ValueError) as e:  # e.g. unpackable response header
            await self._send_message([conn], Error(req.call_id, ErrorCode.BAD_RESPONSE, f"bad response: {e}"),
                                     b"", False)

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
        err = f"connection to {peer_id[:12]} lost ({reason})"
        for fut in conn.calls.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable(err))
        conn.calls.clear()
        # striped messages begun so far may have lost chunks on this connection: drop them all
        self.reassembler.connection_lost(peer_id, conn.id, last=not conns)
        if conns:
            if peer_id in self._routes and not self._closing:
                self._spawn(self._replenish(peer_id))
            return
        self._conns.pop(peer_id, None)
        self._lost.add(peer_id)
        self.mailbox.fail_peer(peer_id, f"peer {peer_id} is unreachable: {err}")
        if not self._closing:
            for cb in self._lost_callbacks:
                try:
                    cb(peer_id)
                except Exception:
                    log.exception("on_peer_lost callback failed")
