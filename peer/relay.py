"""Relays and connection reversal for peers that cannot be dialled (issue 15).

A NATed peer B dials out to a reachable peer R and *reserves* there (``relay.reserve`` over an
ordinary authenticated connection). To reach B, a peer A opens a fresh connection to R, runs
the normal handshake with R and asks, in an encrypted record, for a circuit to B
(:class:`~peer.circuit.CircuitOpen`). R tells B over its reservation (``relay.incoming``), B
dials R and accepts the circuit on a fresh authenticated connection of its own. R answers both
(:class:`~peer.circuit.CircuitReady`) and from that record on SPLICES the two TCP sockets: it
forwards raw bytes, no more records of its own. A and B hand their sockets to a new
:class:`~peer.conn.Connection` (``transport.set_protocol``) and run the end-to-end handshake
(A initiator, expecting B) and AEAD records through R, which sees only ciphertext and cannot
read or forge a byte (a changed byte fails the record's tag: ProtocolError, connection gone).

The splice keeps TCP's backpressure end to end (a side's reading pauses while the other side's
write buffer is over its mark) and caps bandwidth per circuit and per relay (token buckets).
Only admitted peers (the handshake passed) reserve or open circuits, in bounded numbers
(:class:`~peer.limits.HostLimits`). If R dies, both sockets close, so do the connections over
them, and the next connect picks another relay.

Reversal: when A is reachable and B is not, A asks R (``relay.reverse``) to tell B, over its
reservation, to dial A directly -- a direct link, no relay in the path. R passes on the IP it
sees A's connection come from with the port A names, never an address of A's choosing, and B
prefers the address its own route table holds for A (see :mod:`peer.transport`).

A host relays only while it is known to be reachable (``PeerHost.reachable is True``): a peer
nobody can dial cannot carry anyone's reservation. ``CircuitReady`` tells each end the IP R
sees the other end at, the only IP a hole punch over the circuit may aim at.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peer import circuit as C
from peer.conn import Connection
from peer.errors import LowbandError, PeerUnavailable, ProtocolError, TransportTimeout
from peer.linkstats import LinkStats
from peer.messages import Error, ErrorCode, OutgoingMessage, Request, Response, decode_meta, remote_error
from peer.wire import Frame, FrameType

if TYPE_CHECKING:
    from peer.transport import PeerHost

log = logging.getLogger("lowband.relay")

_SPLICE_HIGH = 1 << 20  # bytes a relay buffers per direction before it stops reading the sender


class ByteBucket:
    """Token bucket in bytes (sans-IO): ``take`` charges bytes, possibly into debt, and says how
    long the sender must pause until the balance is back to zero."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a byte bucket needs rate > 0 and burst > 0")
        self.rate, self.burst, self.level, self.t = rate, burst, burst, now

    def take(self, nbytes: int, now: float) -> float:
        self.level = min(self.burst, self.level + (now - self.t) * self.rate) - nbytes
        self.t = now
        return 0.0 if self.level >= 0 else -self.level / self.rate


def bucket(rate: float | None, now: float) -> ByteBucket | None:
    """A bucket for ``rate`` bytes/s with ~50 ms of burst (None: no cap)."""
    return None if rate is None else ByteBucket(rate, max(64 * 1024, rate * 0.05), now)


# ---------------------------------------------------------------------------- the splice
class _End(asyncio.Protocol):
    """One socket of a spliced circuit: what it reads is written to the other end."""

    def __init__(self, circuit: "Splice", transport: asyncio.Transport) -> None:
        self.circuit = circuit
        self.transport = transport
        self.other: "_End"
        self.full = False  # the other end's write buffer is over its mark
        self.throttled = False  # the bandwidth cap paused us

    def data_received(self, data: bytes) -> None:
        self.circuit.forward(self, data)

    def eof_received(self) -> bool:
        self.circuit.close("end of stream")
        return False

    def pause_writing(self) -> None:  # our write buffer is full: stop reading the other end
        self.other.full = True
        self.other.update()

    def resume_writing(self) -> None:
        self.other.full = False
        self.other.update()

    def update(self) -> None:
        if self.circuit.closed:
            return
        if self.full or self.throttled:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def unthrottle(self) -> None:
        self.throttled = False
        self.update()

    def connection_lost(self, exc: Exception | None) -> None:
        self.circuit.close("connection lost" if exc is None else f"connection lost: {exc}")


class Splice:
    """Two sockets forwarding raw bytes to each other under the circuit's and the relay's caps."""

    def __init__(self, service: "RelayService", cid: str, a: Connection, b: Connection, counted: list[str]) -> None:
        self.service = service
        self.cid = cid
        self.counted = counted  # peers whose circuit counts this one holds
        self.conns = (a, b)
        self.closed = False
        self.bytes = 0
        now = time.monotonic()
        self.bucket = bucket(service.circuit_rate, now)
        ta, tb = a.detach(), b.detach()
        self.ends = (_End(self, ta), _End(self, tb))
        self.ends[0].other, self.ends[1].other = self.ends[1], self.ends[0]
        for end in self.ends:
            end.transport.set_write_buffer_limits(high=_SPLICE_HIGH)
            end.transport.set_protocol(end)
            end.transport.resume_reading()

    def forward(self, src: _End, data: bytes) -> None:
        """Write what ``src`` read to the other end; pause ``src`` past a bandwidth cap."""
        if self.closed:
            return
        src.other.transport.write(data)
        self.bytes += len(data)
        now = time.monotonic()
        delay = max(self.bucket.take(len(data), now) if self.bucket else 0.0,
                    self.service.bucket.take(len(data), now) if self.service.bucket else 0.0)
        if delay > 0:
            src.throttled = True
            src.update()
            asyncio.get_running_loop().call_later(delay, src.unthrottle)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        for end in self.ends:
            end.transport.close()  # flushes what is buffered, then the other side sees EOF
        self.service.circuit_closed(self, reason)


# ---------------------------------------------------------------------------- a circuit's preamble
class CircuitDial:
    """Owner of a fresh connection to a relay while it asks for a circuit: the handshake with
    the relay, one request, its answer; then the socket is handed on (:meth:`take`)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()

    def conn_made(self, conn: Connection, remote_ip: str | None) -> bool:
        return True

    def conn_ready(self, conn: Connection) -> LinkStats:
        header, chunk = next(OutgoingMessage(1, self.request, b"", 1 << 16).lane(0, 1))
        conn.write_now(FrameType.DATA, header, chunk, even_if_full=True)
        return LinkStats()

    def conn_frame(self, conn: Connection, frame: Frame) -> None:
        h = frame.header
        if frame.type != FrameType.DATA or h.get("c") != self.request.call_id or self.answer.done():
            return  # a PING, or traffic the relay queued before it saw our request: not ours
        if h.get("o") != 0 or h.get("n") != 0 or frame.payload:
            raise ProtocolError("a relay's circuit answer is one empty chunk")
        msg = decode_meta(h)
        if isinstance(msg, Error):
            self.answer.set_exception(remote_error(msg, conn.peer_id))
            conn.close(f"circuit refused: {msg.message}")
        elif isinstance(msg, Response):
            ready = C.CircuitReady.from_header(msg.header)
            self.answer.set_result((ready, conn.detach()))
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} as a circuit answer")

    def conn_lost(self, conn: Connection, reason: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(PeerUnavailable(f"relay {conn.where} closed the circuit: {reason}"))


# ---------------------------------------------------------------------------- the relay's side
@dataclass
class _Pending:
    src: Connection
    src_call: int
    dst: str
    timer: asyncio.TimerHandle | None = None
    notify: asyncio.Task | None = None
    counted: list[str] = field(default_factory=list)


class RelayService:
    """The relay side: reservations, circuit requests, splices (one per PeerHost with relay=True)."""

    def __init__(self, host: "PeerHost", rate: float | None, circuit_rate: float | None) -> None:
        self.host = host
        self.limits = host.limits
        self.circuit_rate = circuit_rate
        self.bucket = bucket(rate, time.monotonic())
        self.reserved: dict[str, float] = {}  # peer id -> when it reserved
        self.pending: dict[str, _Pending] = {}
        self.splices: dict[str, Splice] = {}
        self.per_peer: dict[str, int] = {}  # circuits (pending or spliced) per source and per reserved peer
        self.closed_bytes = 0  # bytes forwarded by circuits that are closed now
        host.handle(C.METHOD_RESERVE, self._on_reserve)
        host.handle(C.METHOD_REVERSE, self._on_reverse)
        host.on_peer_lost(lambda peer_id: self.reserved.pop(peer_id, None))

    def stats(self) -> dict:
        live = sum(s.bytes for s in self.splices.values())
        return {"reservations": len(self.reserved), "pending": len(self.pending), "circuits": len(self.splices),
                "bytes": live, "total_bytes": self.closed_bytes + live}

    def _check_serving(self) -> None:
        # a peer others cannot dial cannot be a relay: its reservations would reach nobody
        if self.host.reachable is not True:
            raise PeerUnavailable("not relaying: this peer is not known to be reachable")

    async def _on_reserve(self, peer_id: str, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        C.Reserve.from_header(header)
        self._check_serving()
        if peer_id not in self.reserved and len(self.reserved) >= self.limits.max_relay_reservations:
            raise PeerUnavailable(f"relay full: {len(self.reserved)} reservations")
        self.reserved[peer_id] = time.time()
        return {}, b""

    async def _on_reverse(self, peer_id: str, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        req = C.Reverse.from_header(header)
        self._check_serving()
        self._check_reserved(req.dst)
        # the requester's IP as we see it, its port as it says: never a third party's address
        ip = self.host.peer_ip(peer_id)
        if ip is None:
            raise PeerUnavailable("a reversal must be asked over a direct connection to the relay")
        port = req.address.rpartition(":")[2]
        note = C.Incoming("reverse", peer_id, address=f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        await self.host.call(req.dst, C.METHOD_INCOMING, note.to_header(), timeout=self.limits.relay_circuit_timeout_s)
        return {}, b""

    def _check_reserved(self, dst: str) -> None:
        if dst not in self.reserved or not self.host.connected(dst):
            raise PeerUnavailable(f"peer {dst} holds no reservation at this relay")

    # -- circuit sockets (PeerHost passes the first request of such a connection here)
    def socket_request(self, conn: Connection, req: Request) -> None:
        self.host.detach(conn)  # out of the pool: nothing else may be written on this socket now
        try:
            if req.method == C.METHOD_OPEN:
                self._open(conn, req, C.CircuitOpen.from_header(req.header))
            else:
                self._accept(conn, req, C.CircuitAccept.from_header(req.header))
        except (LowbandError, ValueError) as e:
            self._refuse(conn, req.call_id, str(e))

    def _refuse(self, conn: Connection, call_id: int, reason: str) -> None:
        header, chunk = next(OutgoingMessage(0, Error(call_id, ErrorCode.HANDLER_FAILED, reason, "PeerUnavailable"),
                                             b"", 1 << 16).lane(0, 1))
        conn.write_now(FrameType.DATA, header, chunk, even_if_full=True)
        conn.close(f"circuit refused: {reason}")

    def _count(self, peers: list[str]) -> None:
        lim = self.limits
        if len(self.pending) + len(self.splices) >= lim.max_relay_circuits:
            raise PeerUnavailable(f"relay full: {lim.max_relay_circuits} circuits")
        for p in peers:
            if self.per_peer.get(p, 0) >= lim.max_relay_circuits_per_peer:
                raise PeerUnavailable(f"peer {p[:12]} has {lim.max_relay_circuits_per_peer} circuits at this relay")
        for p in peers:
            self.per_peer[p] = self.per_peer.get(p, 0) + 1

    def _uncount(self, peers: list[str]) -> None:
        for p in peers:
            left = self.per_peer.get(p, 0) - 1
            if left > 0:
                self.per_peer[p] = left
            else:
                self.per_peer.pop(p, None)

    def _open(self, conn: Connection, req: Request, op: C.CircuitOpen) -> None:
        if op.dst == conn.peer_id:
            raise ValueError("a circuit to oneself")
        self._check_serving()
        self._check_reserved(op.dst)
        self._count([conn.peer_id, op.dst])
        cid = os.urandom(16).hex()
        p = self.pending[cid] = _Pending(conn, req.call_id, op.dst, counted=[conn.peer_id, op.dst])
        p.timer = asyncio.get_running_loop().call_later(self.limits.relay_circuit_timeout_s, self._expire, cid)
        p.notify = asyncio.ensure_future(self._notify(cid, conn.peer_id, op.dst))

    async def _notify(self, cid: str, src: str, dst: str) -> None:
        try:
            await self.host.call(dst, C.METHOD_INCOMING, C.Incoming("circuit", src, cid=cid).to_header(),
                                 timeout=self.limits.relay_circuit_timeout_s)
        except (LowbandError, asyncio.TimeoutError) as e:
            self._drop(cid, f"peer {dst[:12]} did not take the circuit: {e}")

    def _expire(self, cid: str) -> None:
        self._drop(cid, f"the far end did not dial in within {self.limits.relay_circuit_timeout_s:g}s")

    def _drop(self, cid: str, reason: str) -> None:
        p = self.pending.pop(cid, None)
        if p is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        self._uncount(p.counted)
        self._refuse(p.src, p.src_call, reason)

    def _accept(self, conn: Connection, req: Request, acc: C.CircuitAccept) -> None:
        p = self.pending.get(acc.cid)
        if p is None or p.dst != conn.peer_id:
            raise ValueError("no such circuit for this peer")
        del self.pending[acc.cid]
        if p.timer is not None:
            p.timer.cancel()
        if p.src.transport is None or p.src.transport.is_closing():
            self._uncount(p.counted)
            raise PeerUnavailable("the requesting peer left")
        ends = ((p.src, p.src_call, conn), (conn, req.call_id, p.src))
        for c, call_id, other in ends:
            ready = C.CircuitReady(other.peer_id, _socket_ip(other))
            header, chunk = next(OutgoingMessage(0, Response(call_id, ready.to_header()), b"", 1 << 16).lane(0, 1))
            c.write_now(FrameType.DATA, header, chunk, even_if_full=True)
        splice = Splice(self, acc.cid, p.src, conn, p.counted)
        self.splices[acc.cid] = splice
        log.info("relaying circuit %s: %s <-> %s", acc.cid[:8], p.src.peer_id[:12], conn.peer_id[:12])

    def circuit_closed(self, splice: Splice, reason: str) -> None:
        if self.splices.pop(splice.cid, None) is not None:
            self._uncount(splice.counted)
            self.closed_bytes += splice.bytes
        for conn in splice.conns:
            self.host.conn_lost(conn, f"relay circuit closed: {reason}")
        log.info("relay circuit %s closed after %d bytes: %s", splice.cid[:8], splice.bytes, reason)

    def revoke(self, peer_ids: set[str]) -> None:
        """Cut revoked identities off: their reservations, pending and spliced circuits."""
        for peer_id in peer_ids:
            self.reserved.pop(peer_id, None)
        for cid, p in list(self.pending.items()):
            if p.src.peer_id in peer_ids or p.dst in peer_ids:
                self._drop(cid, "a peer of this circuit was revoked")
        for splice in list(self.splices.values()):
            if any(c.peer_id in peer_ids for c in splice.conns):
                splice.close("a peer of this circuit was revoked")

    def close(self) -> None:
        for cid in list(self.pending):
            self._drop(cid, "relay closing")
        for splice in list(self.splices.values()):
            splice.close("relay closing")


def _socket_ip(conn: Connection) -> str:
    """The remote IP of a connection's socket ("0.0.0.0", which no punch aims at, if unknown)."""
    peer = conn.transport.get_extra_info("peername") if conn.transport is not None else None
    return str(peer[0]) if peer else "0.0.0.0"


# ---------------------------------------------------------------------------- the reserved peer's side
async def dial_circuit(host: "PeerHost", relay_id: str, relay_address: str,
                       request: Request) -> tuple[C.CircuitReady, asyncio.Transport]:
    """Open a connection to a relay, authenticate, send ``request`` (open or accept a circuit);
    returns the relay's answer and the socket, ready for the end-to-end handshake."""
    dial = CircuitDial(request)
    conn = await host.open_raw(relay_address, relay_id, dial)
    try:
        return await asyncio.wait_for(dial.answer, host.limits.relay_circuit_timeout_s + host.connect_timeout)
    except asyncio.TimeoutError:
        conn.close("circuit answer timed out", abort=True)
        raise TransportTimeout(f"relay {relay_id[:12]} did not answer the circuit request in time") from None
    except BaseException:
        conn.close("circuit failed", abort=True)
        raise


__all__ = ["RelayService", "Splice", "ByteBucket", "CircuitDial", "dial_circuit"]
