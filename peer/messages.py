"""Sans-IO message layer above wire frames: no sockets, no asyncio (h11 style, like wire.py).

A message is one of four typed kinds (:class:`Mail`, :class:`Request`, :class:`Response`,
:class:`Error`) plus a raw payload. :class:`OutgoingMessage` cuts it into DATA-frame chunks on a
fixed grid; each chunk's frame header is::

    {"i": message id, "o": offset, "n": total bytes, "z": chunk size}   (+ the message's fields
                                                                         on the chunk at offset 0)

and :class:`Reassembler` turns received chunks (from any number of connections, in any order)
back into :class:`Delivery` events, enforcing the size limits before it buffers anything.
Chunks striped over a connection pool carry the :data:`STRIPED` frame flag: when one connection
of the pool dies, the striped messages begun so far are dropped (:meth:`Reassembler.connection_lost`).

RPC failures travel as an :class:`Error` with an :class:`ErrorCode` and the remote exception's
type name and text as separate fields; :func:`remote_error` maps them to the typed
:mod:`peer.errors` classes. Every decoding failure raises :class:`ProtocolError`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Callable, Iterator, Union

from peer.errors import Forbidden, NoSuchMethod, ProtocolError, RemoteBusy, RemoteError, RemoteRateLimited

__all__ = ["STRIPED", "Kind", "ErrorCode", "Mail", "Request", "Response", "Error", "Message",
           "encode_meta", "decode_meta", "remote_error", "OutgoingMessage", "Delivery", "Reassembler"]

STRIPED = 0x01  # frame flag: chunk of a message striped over the connection pool


class Kind(str, Enum):
    """The ``"k"`` field of a message's first chunk."""
    MAIL = "m"       # one-way, into the receiver's mailbox under a tag
    REQUEST = "q"    # RPC call
    RESPONSE = "r"   # RPC result
    ERROR = "e"      # RPC failure


class ErrorCode(IntEnum):
    """Why an RPC failed (the ``"x"`` field of an ERROR message)."""
    HANDLER_FAILED = 1  # the handler raised
    NO_SUCH_METHOD = 2
    BUSY = 3            # too many handlers of this caller running
    RATE_LIMITED = 4
    BAD_RESPONSE = 5    # the handler's response could not be encoded
    FORBIDDEN = 6       # the caller's credential lacks the roles the handler requires


_ERROR_CLASSES: dict[ErrorCode, type[RemoteError]] = {
    ErrorCode.NO_SUCH_METHOD: NoSuchMethod, ErrorCode.BUSY: RemoteBusy,
    ErrorCode.RATE_LIMITED: RemoteRateLimited, ErrorCode.FORBIDDEN: Forbidden}


@dataclass(frozen=True)
class Mail:
    tag: str
    header: dict


@dataclass(frozen=True)
class Request:
    call_id: int
    method: str
    header: dict


@dataclass(frozen=True)
class Response:
    call_id: int
    header: dict
    handler_s: float = 0.0  # time the handler ran (lets the caller subtract it from RTT samples)


@dataclass(frozen=True)
class Error:
    call_id: int
    code: ErrorCode
    message: str
    remote_type: str = ""  # the handler's exception type name, for HANDLER_FAILED

    @classmethod
    def from_exception(cls, call_id: int, exc: BaseException) -> "Error":
        return cls(call_id, ErrorCode.HANDLER_FAILED, str(exc), type(exc).__name__)


Message = Union[Mail, Request, Response, Error]


def encode_meta(msg: Message) -> dict:
    """The fields a message adds to its first chunk's frame header."""
    if isinstance(msg, Mail):
        return {"k": Kind.MAIL.value, "t": msg.tag, "h": msg.header}
    if isinstance(msg, Request):
        return {"k": Kind.REQUEST.value, "c": msg.call_id, "m": msg.method, "h": msg.header}
    if isinstance(msg, Response):
        return {"k": Kind.RESPONSE.value, "c": msg.call_id, "h": msg.header, "d": msg.handler_s}
    if isinstance(msg, Error):
        return {"k": Kind.ERROR.value, "c": msg.call_id, "x": int(msg.code), "y": msg.remote_type,
                "err": msg.message}
    raise TypeError(f"not a message: {type(msg).__name__}")


def decode_meta(meta: dict) -> Message:
    """The typed message of a first chunk's header (extra fields, e.g. chunk fields, ignored)."""
    kind = meta.get("k")
    if kind == Kind.MAIL.value:
        tag, header = meta.get("t"), meta.get("h")
        if not isinstance(tag, str) or not isinstance(header, dict):
            raise ProtocolError("message needs a str tag and a dict header")
        return Mail(tag, header)
    call_id = meta.get("c")
    if kind in (Kind.REQUEST.value, Kind.RESPONSE.value, Kind.ERROR.value) and not _is_uint(call_id):
        raise ProtocolError(f"message of kind {kind!r} needs an int call id")
    if kind == Kind.REQUEST.value:
        method, header = meta.get("m"), meta.get("h")
        if not isinstance(method, str) or not isinstance(header, dict):
            raise ProtocolError("request needs str method, int call id, dict header")
        return Request(call_id, method, header)
    if kind == Kind.RESPONSE.value:
        header, d = meta.get("h"), meta.get("d")
        if not isinstance(header, dict):
            raise ProtocolError("response needs a dict header")
        return Response(call_id, header, float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0)
    if kind == Kind.ERROR.value:
        # peers from before error codes sent only "err" (the whole text): a handler failure
        code, text, rtype = meta.get("x", int(ErrorCode.HANDLER_FAILED)), meta.get("err"), meta.get("y", "")
        if not isinstance(code, int) or code not in ErrorCode._value2member_map_:
            raise ProtocolError(f"error message with unknown code {code!r}")
        if not isinstance(text, str) or not isinstance(rtype, str):
            raise ProtocolError("error message needs str err and str y")
        return Error(call_id, ErrorCode(code), text, rtype)
    raise ProtocolError(f"unknown message kind {kind!r}")


def remote_error(err: Error, peer_id: str) -> RemoteError:
    """The typed exception a caller raises for a received :class:`Error`."""
    cls = _ERROR_CLASSES.get(err.code, RemoteError)
    text = f"{err.remote_type}: {err.message}" if err.remote_type else err.message
    return cls(f"{peer_id[:12]}: {text}", remote_type=err.remote_type, detail=err.message)


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ------------------------------------------------------------------------------ sending
class OutgoingMessage:
    """One message cut into chunks of ``chunk_size`` (a fixed grid; chunk k at k * chunk_size).

    Chunk payloads are views into the caller's buffer: nothing is copied here.
    """

    def __init__(self, mid: int, msg: Message, payload: bytes | bytearray | memoryview, chunk_size: int,
                 striped: bool = False) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        self.mid = mid
        self.meta = encode_meta(msg)
        self.view = memoryview(payload).cast("B")
        self.total = len(self.view)
        self.chunk_size = chunk_size
        self.flags = STRIPED if striped else 0
        self.offsets = range(0, max(self.total, 1), chunk_size)

    def lane(self, lane: int, lanes: int) -> Iterator[tuple[dict, memoryview]]:
        """(frame header, payload view) of the chunks for ``lane`` of ``lanes`` (round robin)."""
        for off in self.offsets[lane::lanes]:
            header = {"i": self.mid, "o": off, "n": self.total, "z": self.chunk_size}
            if off == 0:
                header.update(self.meta)
            yield header, self.view[off:off + self.chunk_size]


# ------------------------------------------------------------------------------ receiving
@dataclass(frozen=True)
class Delivery:
    """A complete message: ``payload`` is a fresh bytearray owned by the receiver."""
    message: Message
    payload: bytearray
    elapsed_s: float | None  # first chunk to last, for multi-chunk messages (bandwidth samples)


class _Partial:
    """A message being reassembled.

    Chunks arriving in order are appended to one growing buffer: no zero-filled preallocation
    of the whole message, so each page is touched once, as data lands, spread over the
    transfer. Chunks that overtake others (striping) wait in ``ahead`` until the gap closes.
    """

    def __init__(self, total: int, chunk: int, striped: bool, started: float) -> None:
        self.total = total
        self.chunk = chunk
        self.striped = striped
        self.started = started
        self.message: Message | None = None
        self.buf = bytearray()
        self.ahead: dict[int, bytes | bytearray] = {}
        self.conns: set[int] = set()

    def add(self, off: int, chunk: bytearray | memoryview) -> bool:
        """Place a chunk (a view is copied now, a bytearray may be kept); True once complete."""
        if off < len(self.buf) or off in self.ahead:
            raise ProtocolError(f"duplicate chunk at offset {off}")
        if off == len(self.buf):
            if off == 0 and isinstance(chunk, bytearray):
                self.buf = chunk  # the first chunk's own buffer grows into the message
            else:
                self.buf += chunk
            while (nxt := self.ahead.pop(len(self.buf), None)) is not None:
                self.buf += nxt
        else:
            self.ahead[off] = chunk if isinstance(chunk, bytearray) else bytes(chunk)
        return len(self.buf) == self.total


@dataclass
class _PeerState:
    partials: dict[int, _Partial] = field(default_factory=dict)
    declared: int = 0  # sum of the declared sizes of ``partials``
    held: int = 0  # bytes received into ``partials``
    max_striped_mid: int = -1  # highest striped message id seen
    striped_watermark: int = -1  # striped ids at or below it lost chunks with a connection


class Reassembler:
    """Chunks in, :class:`Delivery` out, for every peer of a host.

    Limits: per peer, the partial messages in flight and the sum of their declared sizes; for
    the whole host, the bytes actually held in partial messages (``max_buffered_bytes``: with
    free identities per-peer caps bound nothing, and counting received bytes rather than
    declared sizes means a sender cannot reserve memory it never sends). A chunk over a limit
    raises ProtocolError, which costs the sender its connection and frees what it held; at the
    host-wide limit, a peer holding more than the sender is evicted first (its partial messages
    dropped, ``evict(peer_id, reason)`` cuts it off), so parked bytes cannot shut others out.
    """

    def __init__(self, max_message_bytes: int, max_pending_bytes_per_peer: int, max_partials_per_peer: int,
                 clock: Callable[[], float] = time.perf_counter, *, max_buffered_bytes: int = 1 << 62,
                 evict: Callable[[str, str], object] = lambda peer_id, reason: None) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes_per_peer = max_pending_bytes_per_peer
        self.max_partials_per_peer = max_partials_per_peer
        self.max_buffered_bytes = max_buffered_bytes
        self._evict = evict
        self.buffered = 0  # bytes held in partial messages, all peers
        self._clock = clock
        self._peers: dict[str, _PeerState] = {}

    def add_chunk(self, peer_id: str, conn_id: int, header: dict, chunk: bytearray | memoryview,
                  flags: int = 0) -> Delivery | None:
        """Place one DATA frame's chunk: a bytearray is handed over (a whole message is delivered
        as that very buffer), anything else is borrowed and copied here."""
        mid, off, total, size = header.get("i"), header.get("o"), header.get("n"), header.get("z")
        if not (_is_uint(mid) and _is_uint(off) and _is_uint(total) and _is_uint(size)) or size == 0:
            raise ProtocolError("DATA chunk needs integers i, o, n >= 0 and z > 0")
        if total > self.max_message_bytes:
            raise ProtocolError(f"message of {total} bytes exceeds limit {self.max_message_bytes}")
        # fixed chunk grid: chunk k covers [k*z, min((k+1)*z, n)), so distinct offsets never overlap
        if off % size or off >= max(total, 1) or len(chunk) != min(size, total - off):
            raise ProtocolError(f"chunk at {off} of {len(chunk)} bytes is off the {size}-byte grid of {total}")
        if off == 0 and len(chunk) == total:  # fast path: the whole message in one chunk
            return Delivery(decode_meta(header), chunk if isinstance(chunk, bytearray) else bytearray(chunk), None)
        if self.buffered + len(chunk) > self.max_buffered_bytes:
            self._make_room(peer_id, len(chunk))
        state = self._peers.get(peer_id)
        if state is None:
            state = self._peers[peer_id] = _PeerState()
        p = state.partials.get(mid)
        if p is None:
            if flags & STRIPED:
                if mid <= state.striped_watermark:
                    return None  # part of a striped message broken by a lost connection
                state.max_striped_mid = max(mid, state.max_striped_mid)
            if len(state.partials) >= self.max_partials_per_peer:
                raise ProtocolError(f"more than {self.max_partials_per_peer} partial messages in flight")
            if state.declared + total > self.max_pending_bytes_per_peer:
                raise ProtocolError(f"partial messages would exceed {self.max_pending_bytes_per_peer} bytes")
            p = state.partials[mid] = _Partial(total, size, bool(flags & STRIPED), self._clock())
            state.declared += total
        if p.total != total or p.chunk != size:
            raise ProtocolError(f"chunk of message {mid} disagrees with its earlier chunks on sizes")
        if off == 0:
            p.message = decode_meta(header)
        p.conns.add(conn_id)
        done = p.add(off, chunk)
        self.buffered += len(chunk)
        state.held += len(chunk)
        if not done:
            return None
        del state.partials[mid]
        state.declared -= total
        state.held -= total
        self.buffered -= total
        assert p.message is not None  # all grid chunks present, so offset 0 is too
        return Delivery(p.message, p.buf, self._clock() - p.started)

    def _drop(self, state: _PeerState, mid: int) -> None:
        p = state.partials.pop(mid)
        held = len(p.buf) + sum(len(c) for c in p.ahead.values())
        state.declared -= p.total
        state.held -= held
        self.buffered -= held

    def _make_room(self, sender: str, size: int) -> None:
        """Evict peers holding more than the sender until ``size`` more bytes fit; ProtocolError
        (the sender's) once the sender would hold the most."""
        mine = self._peers[sender].held if sender in self._peers else 0
        while self.buffered + size > self.max_buffered_bytes:
            holder = max(self._peers, key=lambda p: self._peers[p].held, default=sender)
            if holder == sender or mine + size >= self._peers[holder].held:
                raise ProtocolError(f"host-wide limit of {self.max_buffered_bytes} bytes in partial messages reached")
            reason = (f"host-wide limit of {self.max_buffered_bytes} bytes in partial messages reached, and "
                      f"this peer holds the most ({self._peers[holder].held}): its partial messages are dropped")
            self.connection_lost(holder, -1, last=True)
            self._evict(holder, reason)

    def connection_lost(self, peer_id: str, conn_id: int, last: bool) -> None:
        """A connection to ``peer_id`` died (``last``: it was the peer's only one): drop the
        messages that had chunks on it and every striped message begun so far."""
        state = self._peers.get(peer_id)
        if state is None:
            return
        state.striped_watermark = state.max_striped_mid
        doomed = list(state.partials) if last else [
            m for m, p in state.partials.items() if p.striped or conn_id in p.conns]
        for mid in doomed:
            self._drop(state, mid)
        if last:
            # nothing of this peer can arrive any more (its chunks rode on the dead connections,
            # new connections bring new message ids): forget it, so free identities cost nothing
            del self._peers[peer_id]

    def discard_tag(self, prefix: str) -> int:
        """Drop partially received mail whose tag starts with ``prefix``; how many were dropped."""
        dropped = 0
        for state in self._peers.values():
            doomed = [m for m, p in state.partials.items()
                      if isinstance(p.message, Mail) and p.message.tag.startswith(prefix)]
            for mid in doomed:
                self._drop(state, mid)
            dropped += len(doomed)
        return dropped

    def pending(self, peer_id: str) -> int:
        """Messages of ``peer_id`` being reassembled."""
        state = self._peers.get(peer_id)
        return 0 if state is None else len(state.partials)
