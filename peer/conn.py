"""One authenticated TCP connection as an asyncio protocol: the handshake, then AEAD records.

The connection knows nothing about pools, messages or RPC: it runs the sans-IO
:class:`~peer.handshake.Handshake`, then lets the kernel write straight into the buffer that
:class:`~peer.secure.SecureChannel`'s incremental decoder asks for, and hands each decoded frame
to its :class:`ConnOwner` (the PeerHost), which it reaches only through that interface.

Backpressure. Every write waits while the transport's write buffer is above its high mark.
Replies are stricter, since a peer that sends requests and never reads would otherwise make
us buffer replies without bound: an RPC response waits *before* it is written, and while it
waits we also stop reading from the connection (TCP then pushes back on the requester),
unless we await something on this connection ourselves. That exception
keeps two honest peers that serve each other large replies on one connection from both
stopping to read (a deadlock); pausing on any full buffer would deadlock plain bidirectional
bulk traffic. Small control replies (PONG, refusals) are never queued: :meth:`Connection.write_now`
writes them at once or drops them. A connection that stays paused hears nothing, so the
host's keepalive drops it after its dead-peer timeout.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from peer.errors import AuthError, LowbandError, PeerUnavailable, ProtocolError, TransportTimeout
from peer.handshake import MAX_HANDSHAKE_FRAME, Handshake
from peer.linkstats import LinkStats
from peer.secure import SecureChannel
from peer.wire import Frame

log = logging.getLogger("lowband.transport")

_RING_MIN_PAYLOAD = 128 * 1024  # smaller records are cheap to allocate fresh
_RING_GRAIN = 64 * 1024  # record buffers are allocated in multiples of this (fewer size classes)


class ConnOwner(Protocol):
    """What a connection tells its host: ``conn_made`` first and ``conn_lost`` last (also after
    ``conn_made`` refused it); ``conn_ready`` / ``conn_frame`` only after a successful handshake."""

    def conn_made(self, conn: "Connection", remote_ip: str | None) -> bool:
        """A TCP connection is up (``remote_ip`` for inbound ones); False: refuse it."""

    def conn_ready(self, conn: "Connection") -> LinkStats:
        """The handshake is done: the stats to count this connection's bytes in. Raises a
        LowbandError (its text is the reason) to refuse the connection."""

    def conn_frame(self, conn: "Connection", frame: Frame) -> None:
        """A session frame; its payload is a bytearray the owner may keep."""

    def conn_lost(self, conn: "Connection", reason: str) -> None:
        """The connection is gone (handshaking or registered)."""


@dataclass(frozen=True)
class ConnConfig:
    max_payload: int  # largest frame payload (the host's chunk size)
    write_buffer_bytes: int  # backpressure mark of the transport's write buffer
    handshake_timeout: float


class Connection(asyncio.BufferedProtocol):
    """A BufferedProtocol lets the kernel copy each record straight into the channel's reused
    ciphertext buffer, which is decrypted into the payload's own buffer, handed to the owner:
    no stream-buffer copies, and no plaintext copy for a single-chunk message."""

    _ids = itertools.count(1)

    def __init__(self, owner: ConnOwner, config: ConnConfig, handshake: Handshake, where: str, *,
                 path: str = "direct", relayed: bool = False) -> None:
        """``path``: how the link is connected (direct | reversed | punched | relayed);
        ``relayed``: the socket is a relay circuit (its remote address is the relay's, so it is
        not counted as an inbound connection from that address)."""
        self.id = next(self._ids)
        self.path = path
        self.relayed = relayed
        self.owner = owner
        self.config = config
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
        self.stats = LinkStats()  # replaced by the peer's shared stats once registered
        self.calls: dict[int, asyncio.Future] = {}  # call/ping id -> future, for requests sent here
        self.inbound_ip: str | None = None  # remote IP while the owner counts it against its limits
        # the far end's IP: its socket's, or for a relay circuit the one the relay saw (set by the owner)
        self.remote_ip: str | None = None
        self.last_rx = time.monotonic()
        self.ping_strikes = 0  # PINGs dropped by the host's rate limit
        self._reading_paused = False  # while a reply waits for the peer to read
        self._held = False  # reading stopped for good here (a relay holds the socket for a circuit)
        self._reason = f"closed by the peer or its relay ({where})" if relayed else "closed by peer"
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._hs_buf = bytearray(MAX_HANDSHAKE_FRAME)
        self._timer: asyncio.TimerHandle | None = None
        self._ring: list[list] = []  # [record buffer, stream position of its end] for large records
        self._ring_bytes = 0  # bytes held by the ring; bounded by what the write buffer can hold
        self._written = 0  # bytes handed to the transport so far

    # ---------------------------------------------------------------- asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is not a subclass)
        ip = None
        if not self.relayed:
            peer = transport.get_extra_info("peername")
            self.remote_ip = str(peer[0]) if peer else None
            if not self.hs.initiator:
                self.where = f"{peer[0]}:{peer[1]}" if peer else self.where
                ip = peer[0] if peer else "?"
        if not self.owner.conn_made(self, ip):
            self.closed = True
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.config.write_buffer_bytes)
        self._timer = asyncio.get_running_loop().call_later(self.config.handshake_timeout, self._handshake_timeout)
        self._flush_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._hs_buf) if self.channel is None else self.channel.recv_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        try:
            if self.channel is None:
                self._on_handshake_bytes(bytes(self._hs_buf[:nbytes]))
                return
            self.stats.bytes_received += nbytes
            frame = self.channel.received(nbytes)
            if frame is not None:
                self.owner.conn_frame(self, frame)
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
        if self._reading_paused and not self._held:
            self._reading_paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()  # wake writers; they see ``closed``
        if self._timer is not None:
            self._timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(PeerUnavailable(f"{self.where} closed the connection during the handshake"))
        self.owner.conn_lost(self, self._reason if exc is None else f"{self._reason}: {exc}")

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
                                     max_payload=self.config.max_payload)
        try:
            self.stats = self.owner.conn_ready(self)
        except LowbandError as e:
            self._fail_handshake(e)
            return
        self.registered = True
        self.ready.set_result(self)
        # records that arrived with the last handshake frame go through the same decoder
        for frame in self.channel.receive_data(self.hs.take_trailing_data()):
            if self.closed:
                break
            self.owner.conn_frame(self, frame)

    def _fail_handshake(self, err: LowbandError) -> None:
        if not self.hs.initiator:
            log.warning("rejected inbound connection from %s: %s", self.where, err)
        if not self.ready.done():
            self.ready.set_exception(err)
        self.close(str(err))

    def _handshake_timeout(self) -> None:
        if not self.ready.done():
            self._fail_handshake(TransportTimeout(
                f"handshake with {self.where} timed out after {self.config.handshake_timeout}s"))

    # ---------------------------------------------------------------- sending
    def write_now(self, type_: int, header: dict, payload: bytes | memoryview = b"", flags: int = 0, *,
                  even_if_full: bool = False) -> bool:
        """Seal and write a small frame at once if the connection is open and (unless
        ``even_if_full``) its write buffer is below its high mark; False: not written (dropped)."""
        if (self.closed or self.channel is None or self.transport is None
                or not (even_if_full or self._can_write.is_set())):
            return False
        record = self.channel.seal_frame(type_, header, payload, flags)
        self.transport.write(record)
        self._written += len(record)
        self.stats.bytes_sent += len(record)
        return True

    async def send_frame(self, type_: int, header: dict, payload: bytes | memoryview = b"", flags: int = 0,
                         reply: bool = False) -> None:
        """Seal one frame into a record and write it; waits while the write buffer is full
        (a ``reply`` waits before it is written, see the module docstring)."""
        if reply and not self._can_write.is_set():
            await self._wait_to_reply()
        if self.closed or self.channel is None or self.transport is None:
            raise PeerUnavailable(f"connection to {self.peer_id[:12]} is closed")
        # seal + write without an await in between: counters follow the byte order on the socket
        slot = self._free_slot(len(payload)) if len(payload) >= _RING_MIN_PAYLOAD else None
        record = self.channel.seal_frame(type_, header, payload, flags, None if slot is None else slot[0])
        self.transport.write(record)
        self._written += len(record)
        if slot is not None:
            slot[1] = self._written  # reusable once the transport has flushed this far
        self.stats.bytes_sent += len(record)
        if not self._can_write.is_set():  # backpressure: the write buffer is above its high mark
            await self._can_write.wait()
        if self.closed:
            raise PeerUnavailable(f"connection to {self.peer_id[:12]} lost while sending ({self._reason})")

    def hold_reading_if_full(self) -> None:
        """A request arrived or a reply waits: stop reading while the write buffer is over its
        mark, unless we await something on this connection (see the module docstring)."""
        if (not self._can_write.is_set() and not self.calls and not self._reading_paused
                and not self.closed and self.transport is not None):
            self._reading_paused = True  # resume_writing resumes reading
            self.transport.pause_reading()

    async def _wait_to_reply(self) -> None:
        self.hold_reading_if_full()
        await self._can_write.wait()

    def _free_slot(self, payload_len: int) -> list | None:
        """A record buffer for a ``payload_len`` frame that the transport no longer references.

        Transports flush FIFO and drop their reference to a buffer once it is fully handed to
        the kernel, so a buffer whose last byte lies before the flushed mark is free again.
        The ring holds about what the write buffer can (its high mark plus a record per
        concurrent writer), so a steady sender never pays for fresh, page-faulting records.
        """
        assert self.transport is not None and self.channel is not None
        need = self.channel.record_size(payload_len)
        flushed = self._written - self.transport.get_write_buffer_size()
        small = None
        for slot in self._ring:
            if slot[1] <= flushed:
                if len(slot[0]) >= need:
                    return slot
                small = slot
        size = min(-(-need // _RING_GRAIN) * _RING_GRAIN, self.channel.max_record_bytes)
        if small is not None and self._ring_bytes + size - len(small[0]) <= self._ring_limit():
            self._ring_bytes += size - len(small[0])
            small[0] = bytearray(size)  # records grew: replace a free buffer that is too small
            return small
        if self._ring_bytes + size <= self._ring_limit():
            self._ring_bytes += size
            self._ring.append([bytearray(size), 0])
            return self._ring[-1]
        return None  # all in flight: this record gets a fresh buffer

    def _ring_limit(self) -> int:
        assert self.channel is not None
        return self.config.write_buffer_bytes + 2 * self.channel.max_record_bytes  # ~6 MiB by default

    def detach(self) -> asyncio.Transport:
        """Stop being the socket's protocol (a relay circuit takes it over, :mod:`peer.relay`):
        reading pauses until the new protocol resumes it, and this object sends nothing more.
        Records are read exactly to their end, so no byte of what follows was consumed here."""
        assert self.transport is not None
        self.hold()
        self.closed = True
        self._can_write.set()  # wake writers; they see ``closed``
        if self._timer is not None:
            self._timer.cancel()
        return self.transport

    def hold(self) -> None:
        """Read nothing more until the socket changes hands (:meth:`detach`)."""
        if not self._reading_paused and not self.closed and self.transport is not None:
            self.transport.pause_reading()
        self._reading_paused = self._held = True

    def close(self, reason: str, abort: bool = False) -> None:
        if self.closed or self.transport is None:
            return
        self._reason = reason
        if abort:
            self.transport.abort()
        else:
            self.transport.close()
