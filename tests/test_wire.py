"""Sans-IO framing: round trips, any split of the stream, and only ProtocolError on bad input."""
from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.errors import ProtocolError
from peer.wire import (FIXED_HEADER_SIZE, MAGIC, VERSION, Frame, FrameDecoder, decode_frame, encode_frame,
                       parse_fixed_header)

FIXED = struct.Struct("!2sBBBIQ")

header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
frames = st.builds(Frame, type=st.integers(0, 255), header=st.dictionaries(st.text(max_size=10), header_values, max_size=5),
                   payload=st.binary(max_size=2000), flags=st.integers(0, 255))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def same(a: Frame, b: Frame) -> bool:
    return (a.type, a.header, bytes(a.payload), a.flags) == (b.type, b.header, bytes(b.payload), b.flags)


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, min_size=1, max_size=5), st.lists(st.integers(0, 10**6), max_size=12))
def test_round_trip_any_split(fs, cuts):
    stream = b"".join(encode_frame(f) for f in fs)
    dec = FrameDecoder()
    out = [f for part in split(stream, cuts) for f in dec.feed(part)]
    assert len(out) == len(fs) and all(same(a, b) for a, b in zip(out, fs))
    assert dec.buffered == 0
    assert same(decode_frame(encode_frame(fs[0])), fs[0])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 10**6), max_size=8), st.booleans())
def test_arbitrary_bytes_only_raise_protocol_error(data, cuts, with_valid_prefix):
    if with_valid_prefix:  # garbage after/inside a plausible fixed header reaches the msgpack stage
        data = FIXED.pack(MAGIC, VERSION, 16, 0, min(len(data), 255), 0) + data
    dec = FrameDecoder(max_header=1024, max_payload=1024)
    try:
        for part in split(data, cuts):
            dec.feed(part)
    except ProtocolError:
        pass
    try:
        decode_frame(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(frames, st.integers(0, 10**6), st.integers(1, 255))
def test_corrupted_frame_decodes_or_raises_protocol_error(frame, pos, xor):
    data = bytearray(encode_frame(frame))
    data[pos % len(data)] ^= xor
    try:
        FrameDecoder().feed(bytes(data))
    except ProtocolError:
        pass


def test_oversized_length_refused_from_fixed_header_without_allocating():
    huge = FIXED.pack(MAGIC, VERSION, 16, 0, 10, 2**40)
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds limit"):
            dec.feed(huge)  # only the 17-byte fixed header: refused before any body arrives
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    with pytest.raises(ProtocolError, match="header length"):
        FrameDecoder(max_header=100).feed(FIXED.pack(MAGIC, VERSION, 16, 0, 2**31, 0))


@pytest.mark.parametrize("raw, match", [
    (FIXED.pack(b"XX", VERSION, 1, 0, 1, 0) + b"\x80", "bad magic"),
    (FIXED.pack(MAGIC, VERSION + 1, 1, 0, 1, 0) + b"\x80", "unsupported protocol version"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 0, 0), "header length 0"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 1, 0) + msgpack.packb(7), "must be a msgpack map"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 3, 0) + msgpack.packb([1, 2]), "must be a msgpack map"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 1, 0) + b"\xc1", "undecodable frame header"),
    (FIXED.pack(MAGIC, VERSION, 1, 0, 2, 0) + b"\x81\x01", "undecodable frame header"),  # int map key / truncated
])
def test_malformed_frames(raw, match):
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(raw)


def test_decode_frame_needs_exact_buffer_and_payload_is_a_view():
    data = encode_frame(Frame(16, {"a": 1}, b"xyz"))
    f = decode_frame(data)
    assert isinstance(f.payload, memoryview) and bytes(f.payload) == b"xyz"
    with pytest.raises(ProtocolError, match="buffer holds"):
        decode_frame(data + b"!")
    with pytest.raises(ProtocolError, match="fixed header needs"):
        parse_fixed_header(data[:FIXED_HEADER_SIZE - 1])


def test_take_buffer_returns_bytes_after_the_last_frame():
    dec = FrameDecoder()
    dec.receive_data(encode_frame(Frame(1, {})) + b"rest")
    assert dec.next_frame() is not None and dec.next_frame() is None
    assert dec.take_buffer() == b"rest" and dec.buffered == 0
    dec.receive_data(encode_frame(Frame(1, {}, b"abc"))[:FIXED_HEADER_SIZE + 2])
    assert dec.next_frame() is None
    with pytest.raises(ProtocolError, match="partially buffered"):
        dec.take_buffer()
