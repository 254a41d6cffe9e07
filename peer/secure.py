"""Sans-IO AEAD record layer used after the handshake.

Record on the wire::  length u32 | counter u64 | AES-256-GCM(ciphertext + 16-byte tag)

One record carries exactly one wire frame. The nonce is the 64-bit per-direction counter
(zero-padded to 96 bits; each direction has its own key, so nonces never repeat under a key).
The record header is the AEAD associated data, and the counter must equal the next expected
value: a reordered, replayed, dropped or tampered record raises ProtocolError and the caller
must drop the connection — there is no recovery inside a broken stream.
"""
from __future__ import annotations

import functools
import struct
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peer.errors import ProtocolError
from peer.wire import (DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD, FIXED_HEADER_SIZE, Frame,
                       decode_frame_owned, frame_prefix)

_RECORD = struct.Struct("!IQ")
RECORD_HEADER_SIZE = _RECORD.size
TAG_SIZE = 16
_MAX_COUNTER = 2**64 - 1


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


_uninitialized: Callable[[int], bytearray] = bytearray  # other interpreters: zero-filled
try:  # CPython: a bytearray without the zero fill (decryption writes every byte before any use)
    import ctypes

    _new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _new_bytearray.restype = ctypes.py_object
    _new_bytearray.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
    _uninitialized = functools.partial(_new_bytearray, None)
except (ImportError, AttributeError):
    pass


class SecureChannel:
    """Seals outgoing frames into records and opens incoming records into frames."""

    def __init__(self, send_key: bytes, recv_key: bytes, *, max_header: int = DEFAULT_MAX_HEADER,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._send_ctr = 0
        self._recv_ctr = 0
        self.max_header = max_header
        self.max_payload = max_payload
        self.max_record = FIXED_HEADER_SIZE + max_header + max_payload + TAG_SIZE
        self._scratch = bytearray()
        self._head = bytearray(RECORD_HEADER_SIZE)  # incremental decoder state, see recv_buffer()
        self._body = bytearray()
        self._filled = 0
        self._need = 0  # ciphertext length of the record being read; 0 while reading its header
        self._broken: str | None = None

    # ---------------------------------------------------------------- sending
    @property
    def max_record_bytes(self) -> int:
        """Largest record on the wire, header included (a buffer this big fits any record)."""
        return RECORD_HEADER_SIZE + self.max_record

    def record_size(self, payload_len: int, header_len: int = 256) -> int:
        """Bytes of the record for a frame with this payload and a header of about ``header_len``."""
        return RECORD_HEADER_SIZE + FIXED_HEADER_SIZE + header_len + payload_len + TAG_SIZE

    def seal_frame(self, type_: int, header: dict, payload: bytes | memoryview = b"", flags: int = 0,
                   out: bytearray | None = None) -> bytearray | memoryview:
        """Encode a frame and encrypt it into one record, ready for a single socket write.

        The plaintext is gathered in a reused scratch buffer and encrypted straight into the
        record: into ``out`` when it is large enough (a view of its first bytes is returned; see
        :meth:`record_size`), else into a new bytearray, so a sender can recycle large record
        buffers instead of paying page faults for a fresh megabyte per record.
        """
        prefix = frame_prefix(type_, header, len(payload), flags)
        n = len(prefix) + len(payload)
        if n + TAG_SIZE > self.max_record:
            raise ProtocolError(f"frame of {n} bytes exceeds the record limit {self.max_record}")
        if self._send_ctr > _MAX_COUNTER:
            raise ProtocolError("record counter exhausted; reconnect")
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        plain = memoryview(self._scratch)[:n]
        plain[:len(prefix)] = prefix
        plain[len(prefix):] = payload
        size = RECORD_HEADER_SIZE + n + TAG_SIZE
        record = bytearray(size) if out is None or len(out) < size else memoryview(out)[:size]
        _RECORD.pack_into(record, 0, n + TAG_SIZE, self._send_ctr)
        view = memoryview(record)
        self._send.encrypt_into(_nonce(self._send_ctr), plain, view[:RECORD_HEADER_SIZE], view[RECORD_HEADER_SIZE:])
        self._send_ctr += 1
        return record

    # ---------------------------------------------------------------- receiving
    def _fatal(self, reason: str) -> ProtocolError:
        self._broken = reason
        return ProtocolError(reason)

    def record_length(self, header: bytes | memoryview) -> int:
        """Validate a record header and return the ciphertext length that follows it."""
        if self._broken is not None:
            raise ProtocolError(f"channel is broken: {self._broken}")
        clen, counter = _RECORD.unpack_from(header)
        if clen < TAG_SIZE or clen > self.max_record:
            raise self._fatal(f"record length {clen} outside {TAG_SIZE}..{self.max_record}")
        if counter != self._recv_ctr:
            raise self._fatal(f"record out of order or replayed: counter {counter}, expected {self._recv_ctr}")
        return clen

    def _open(self, clen: int, header: bytes | memoryview, ciphertext: bytes | memoryview) -> Frame:
        """Authenticate + decrypt into a new buffer that becomes the frame's own payload (a
        bytearray, no copy)."""
        if len(ciphertext) != clen:
            raise self._fatal(f"record body is {len(ciphertext)} bytes, header says {clen}")
        owned = _uninitialized(clen - TAG_SIZE)
        plain = memoryview(owned)
        try:
            self._recv.decrypt_into(_nonce(self._recv_ctr), ciphertext, bytes(header[:RECORD_HEADER_SIZE]), plain)
        except InvalidTag:
            raise self._fatal(f"record {self._recv_ctr} failed authentication (tampered or forged)") from None
        finally:
            plain.release()  # the buffer is trimmed in place below: no export may remain
        self._recv_ctr += 1
        try:
            return decode_frame_owned(owned, self.max_header, self.max_payload)
        except ProtocolError as e:
            raise self._fatal(str(e)) from e

    # ---------------------------------------------------------------- incremental decoder
    # One decoder for every receive path: the asyncio connection lets the kernel write straight
    # into recv_buffer() (a BufferedProtocol), tests and the fuzzer go through feed(); both end
    # in received(). A read never crosses a record boundary, so no bytes are ever moved twice.
    def recv_buffer(self) -> memoryview:
        """Where the next stream bytes go: fill any prefix of it, then call :meth:`received`."""
        if self._need == 0:
            return memoryview(self._head)[self._filled:]
        return memoryview(self._body)[self._filled:self._need]

    def received(self, nbytes: int) -> Frame | None:
        """Account ``nbytes`` written into :meth:`recv_buffer`; the frame of a record they complete.

        The frame's payload is a bytearray of its own (no copy was made to produce it).
        """
        if self._broken is not None:
            raise ProtocolError(f"channel is broken: {self._broken}")
        self._filled += nbytes
        if self._need == 0:
            if self._filled < RECORD_HEADER_SIZE:
                return None
            self._need = self.record_length(self._head)
            self._filled = 0
            if len(self._body) < self._need:
                self._body = bytearray(self._need)  # grows to the largest record once
            return None
        if self._filled < self._need:
            return None
        clen, self._need, self._filled = self._need, 0, 0
        # decrypted into a buffer of its own, the payload is handed over without a copy (a whole
        # message's is delivered as is, a first chunk becomes its message's buffer)
        return self._open(clen, self._head, memoryview(self._body)[:clen])  # header checked above

    def receive_data(self, data: bytes | memoryview) -> Iterator[Frame]:
        """Push already-received stream bytes through :meth:`received`, yielding each frame."""
        mv, pos = memoryview(data).cast("B"), 0
        while pos < len(mv):
            buf = self.recv_buffer()
            k = min(len(buf), len(mv) - pos)
            buf[:k] = mv[pos:pos + k]
            pos += k
            frame = self.received(k)
            if frame is not None:
                yield frame

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Buffer stream bytes and return every frame from the complete records in them
        (payloads copied out, so the frames outlive later calls)."""
        return [Frame(f.type, f.header, bytes(f.payload), f.flags) for f in self.receive_data(data)]
