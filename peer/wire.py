"""Sans-IO framing (h11 style): bytes in, frames out; frames in, bytes out. No sockets, no asyncio.

Frame on the wire::

    fixed header (17 bytes, big endian)  magic "LB" | version u8 | type u8 | flags u8 |
                                          header length u32 | payload length u64
    header                               msgpack map (small; metadata such as dtype/shape)
    payload                              raw bytes (tensors travel here, never as msgpack lists)

Every length is checked against the decoder's limits from the fixed header alone, before a
single byte of the body is buffered or allocated. Decoding raises only :class:`ProtocolError`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import msgpack

from peer.errors import ProtocolError

__all__ = ["MAGIC", "VERSION", "FIXED_HEADER_SIZE", "FrameType", "Frame", "ProtocolError",
           "encode_frame", "frame_prefix", "parse_fixed_header", "decode_frame", "decode_frame_owned", "FrameDecoder",
           "DEFAULT_MAX_HEADER", "DEFAULT_MAX_PAYLOAD"]

MAGIC = b"LB"
VERSION = 1
_FIXED = struct.Struct("!2sBBBIQ")
FIXED_HEADER_SIZE = _FIXED.size
DEFAULT_MAX_HEADER = 64 * 1024
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024


class FrameType(IntEnum):
    # handshake (plaintext)
    HELLO = 1
    AUTH = 2
    ACCEPT = 3
    REJECT = 4
    # session (inside AEAD records)
    DATA = 16      # one chunk of a message (request, response, error or tagged one-way)
    PING = 17
    PONG = 18


@dataclass(frozen=True)
class Frame:
    type: int
    header: dict
    payload: bytes | bytearray | memoryview = b""  # a bytearray is owned by the frame, a view borrowed
    flags: int = 0


def frame_prefix(type_: int, header: dict, payload_len: int, flags: int = 0) -> bytes:
    """Fixed header + packed msgpack header; the payload follows it verbatim."""
    hdr = msgpack.packb(header, use_bin_type=True)
    return _FIXED.pack(MAGIC, VERSION, type_, flags, len(hdr), payload_len) + hdr


def encode_frame(frame: Frame) -> bytes:
    if not isinstance(frame.header, dict):
        raise TypeError("frame header must be a dict")
    prefix = frame_prefix(frame.type, frame.header, len(memoryview(frame.payload).cast("B")), frame.flags)
    return b"".join((prefix, frame.payload))


def parse_fixed_header(data: bytes | memoryview, max_header: int = DEFAULT_MAX_HEADER,
                       max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[int, int, int, int]:
    """Validate a fixed header and return (type, flags, header_len, payload_len)."""
    if len(data) < FIXED_HEADER_SIZE:
        raise ProtocolError(f"fixed header needs {FIXED_HEADER_SIZE} bytes, got {len(data)}")
    magic, version, type_, flags, hlen, plen = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not a lowband peer?)")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this peer speaks {VERSION})")
    if hlen == 0 or hlen > max_header:
        raise ProtocolError(f"frame header length {hlen} outside 1..{max_header}")
    if plen > max_payload:
        raise ProtocolError(f"frame payload length {plen} exceeds limit {max_payload}")
    return type_, flags, hlen, plen


def _unpack_header(raw: bytes | memoryview) -> dict:
    try:
        header = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, StackError, ...)
        raise ProtocolError(f"undecodable frame header: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header must be a msgpack map, got {type(header).__name__}")
    return header


def decode_frame(data: bytes | memoryview, max_header: int = DEFAULT_MAX_HEADER,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame:
    """Decode exactly one frame filling ``data``; the payload is a zero-copy view into it."""
    mv = memoryview(data).cast("B")
    type_, flags, hlen, plen = parse_fixed_header(mv, max_header, max_payload)
    if len(mv) != FIXED_HEADER_SIZE + hlen + plen:
        raise ProtocolError(f"frame declares {FIXED_HEADER_SIZE + hlen + plen} bytes, buffer holds {len(mv)}")
    header = _unpack_header(mv[FIXED_HEADER_SIZE:FIXED_HEADER_SIZE + hlen])
    return Frame(type_, header, mv[FIXED_HEADER_SIZE + hlen:], flags)


def decode_frame_owned(buf: bytearray, max_header: int = DEFAULT_MAX_HEADER,
                       max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame:
    """Decode exactly one frame filling ``buf`` and make ``buf`` itself the payload: the prefix
    is cut off its front (O(1) for a bytearray), so the payload needs no copy of its own."""
    type_, flags, hlen, plen = parse_fixed_header(buf, max_header, max_payload)
    if len(buf) != FIXED_HEADER_SIZE + hlen + plen:
        raise ProtocolError(f"frame declares {FIXED_HEADER_SIZE + hlen + plen} bytes, buffer holds {len(buf)}")
    header = _unpack_header(bytes(buf[FIXED_HEADER_SIZE:FIXED_HEADER_SIZE + hlen]))
    del buf[:FIXED_HEADER_SIZE + hlen]
    return Frame(type_, header, buf, flags)


class FrameDecoder:
    """Incremental decoder: ``feed`` any split of the byte stream, get whole frames back."""

    def __init__(self, max_header: int = DEFAULT_MAX_HEADER, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self._buf = bytearray()
        self._need: tuple[int, int, int, int] | None = None  # parsed fixed header of the frame in progress

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        self._buf += data
        frames = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def receive_data(self, data: bytes | memoryview) -> None:
        """Buffer bytes without decoding (pair with :meth:`next_frame`)."""
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame from the buffer, or None if more bytes are needed."""
        if self._need is None:
            if len(self._buf) < FIXED_HEADER_SIZE:
                return None
            # checked as soon as the fixed header is in: a huge declared length fails here
            self._need = parse_fixed_header(self._buf, self.max_header, self.max_payload)
        type_, flags, hlen, plen = self._need
        end = FIXED_HEADER_SIZE + hlen + plen
        if len(self._buf) < end:
            return None
        header = _unpack_header(bytes(self._buf[FIXED_HEADER_SIZE:FIXED_HEADER_SIZE + hlen]))
        payload = bytes(self._buf[FIXED_HEADER_SIZE + hlen:end])
        del self._buf[:end]
        self._need = None
        return Frame(type_, header, payload, flags)

    def take_buffer(self) -> bytes:
        """Remove and return bytes buffered past the last decoded frame (e.g. after a handshake)."""
        if self._need is not None:
            raise ProtocolError("a frame is partially buffered")
        data, self._buf = bytes(self._buf), bytearray()
        return data

    @property
    def buffered(self) -> int:
        return len(self._buf)
