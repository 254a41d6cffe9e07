"""Sans-IO AEAD record layer used after the handshake.

Record on the wire::  length u32 | counter u64 | AES-256-GCM(ciphertext + 16-byte tag)

One record carries exactly one wire frame. The nonce is the 64-bit per-direction counter
(zero-padded to 96 bits; each direction has its own key, so nonces never repeat under a key).
The record header is the AEAD associated data, and the counter must equal the next expected
value: a reordered, replayed, dropped or tampered record raises ProtocolError and the caller
must drop the connection — there is no recovery inside a broken stream.
"""
from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peer.errors import ProtocolError
from peer.wire import (DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD, FIXED_HEADER_SIZE, Frame, decode_frame,
                       frame_prefix)

_RECORD = struct.Struct("!IQ")
RECORD_HEADER_SIZE = _RECORD.size
TAG_SIZE = 16
_MAX_COUNTER = 2**64 - 1


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


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
        self._inbuf = bytearray()
        self._scratch = bytearray()
        self._broken: str | None = None

    # ---------------------------------------------------------------- sending
    @property
    def max_record_bytes(self) -> int:
        """Largest record on the wire, header included (a buffer this big fits any record)."""
        return RECORD_HEADER_SIZE + self.max_record

    def seal_frame(self, type_: int, header: dict, payload: bytes | memoryview = b"", flags: int = 0,
                   out: bytearray | None = None) -> bytearray | memoryview:
        """Encode a frame and encrypt it into one record, ready for a single socket write.

        The plaintext is gathered in a reused scratch buffer and encrypted straight into the
        record: into a new bytearray, or into ``out`` (at least ``max_record_bytes`` long; a
        view of its first bytes is returned) so a sender can recycle large record buffers
        instead of paying page faults for a fresh megabyte per record.
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
        record = bytearray(size) if out is None else memoryview(out)[:size]
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

    def open_record_into(self, header: bytes | memoryview, ciphertext: bytes | memoryview,
                         out: bytearray | memoryview) -> Frame:
        """Authenticate + decrypt one record into ``out`` (at least ciphertext length - 16 bytes).

        The frame's payload is a view into ``out``: consume it before reusing the buffer.
        """
        clen = self.record_length(header)
        if len(ciphertext) != clen:
            raise self._fatal(f"record body is {len(ciphertext)} bytes, header says {clen}")
        plain = memoryview(out)[:clen - TAG_SIZE]
        try:
            self._recv.decrypt_into(_nonce(self._recv_ctr), ciphertext, bytes(header[:RECORD_HEADER_SIZE]), plain)
        except InvalidTag:
            raise self._fatal(f"record {self._recv_ctr} failed authentication (tampered or forged)") from None
        self._recv_ctr += 1
        try:
            return decode_frame(plain, self.max_header, self.max_payload)
        except ProtocolError as e:
            raise self._fatal(str(e)) from e

    def open_record(self, header: bytes | memoryview, ciphertext: bytes | memoryview) -> Frame:
        """Like :meth:`open_record_into`, into a new buffer owned by the returned frame."""
        return self.open_record_into(header, ciphertext, bytearray(max(0, len(ciphertext) - TAG_SIZE)))

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Buffer stream bytes and return every frame from the complete records in them."""
        self._inbuf += data
        frames = []
        while len(self._inbuf) >= RECORD_HEADER_SIZE:
            clen = self.record_length(self._inbuf)
            end = RECORD_HEADER_SIZE + clen
            if len(self._inbuf) < end:
                break
            frames.append(self.open_record(bytes(self._inbuf[:RECORD_HEADER_SIZE]), bytes(self._inbuf[RECORD_HEADER_SIZE:end])))
            del self._inbuf[:end]
        return frames
