"""The sans-IO message layer (peer.messages) and SecureChannel's incremental decoder, driven the
way the asyncio connection drives them: random stream splits, short kernel writes, chunks out of
order, and hostile input (only ProtocolError may escape)."""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.errors import NoSuchMethod, ProtocolError, RemoteBusy, RemoteError, RemoteRateLimited
from peer.messages import (STRIPED, Error, ErrorCode, Mail, OutgoingMessage, Reassembler, Request, Response,
                           decode_meta, encode_meta, remote_error)
from peer.secure import SecureChannel
from peer.wire import Frame, FrameType

KEY_A, KEY_B = b"\x01" * 32, b"\x02" * 32
names = st.text(max_size=12)
headers = st.dictionaries(st.text(max_size=6), st.integers(-5, 5) | st.text(max_size=6), max_size=3)
call_ids = st.integers(0, 2**40)
messages = st.one_of(
    st.builds(Mail, names, headers),
    st.builds(Request, call_ids, names, headers),
    st.builds(Response, call_ids, headers, st.floats(0, 10)),
    st.builds(Error, call_ids, st.sampled_from(list(ErrorCode)), names, names))


def reassembler(**kw) -> Reassembler:
    return Reassembler(kw.get("max_message", 1 << 20), kw.get("max_pending", 1 << 22), kw.get("max_partials", 64),
                       clock=lambda: 0.0)


def channel_pair() -> tuple[SecureChannel, SecureChannel]:
    return SecureChannel(KEY_A, KEY_B, max_payload=4096), SecureChannel(KEY_B, KEY_A, max_payload=4096)


def drive(rx: SecureChannel, stream: bytes, rng: random.Random) -> list[Frame]:
    """What Connection does: the 'kernel' writes a random prefix of recv_buffer() each time."""
    frames, pos = [], 0
    while pos < len(stream):
        buf = rx.recv_buffer()
        k = min(len(buf), len(stream) - pos, rng.randint(1, 5000))
        buf[:k] = stream[pos:pos + k]
        pos += k
        frame = rx.received(k)
        if frame is not None:
            assert isinstance(frame.payload, bytearray)  # its own buffer, which the reassembler may keep
            frames.append(frame)
    return frames


@settings(max_examples=150, deadline=None)
@given(messages)
def test_meta_round_trips(msg):
    assert decode_meta(encode_meta(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["k", "t", "h", "c", "m", "d", "x", "y", "err", "zz"]),
                       st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats() | st.text(max_size=3)
                       | st.sampled_from(["m", "q", "r", "e"]) | st.dictionaries(st.text(max_size=2), st.integers())
                       | st.lists(st.integers(), max_size=2)))
def test_decode_meta_raises_only_protocol_error(meta):
    try:
        decode_meta(meta)
    except ProtocolError:
        pass


@settings(max_examples=60, deadline=None)
@given(messages, st.integers(0, 20000), st.integers(1, 4096), st.integers(1, 4), st.randoms(use_true_random=False))
def test_messages_round_trip_through_channel_and_reassembler(msg, size, chunk, lanes, rng):
    payload = os.urandom(size)
    out = OutgoingMessage(7, msg, payload, chunk, striped=lanes > 1)
    lanes = min(lanes, len(out.offsets))
    # each lane is one connection: its own channel, chunks in order; lanes interleave at random
    pairs = [channel_pair() for _ in range(lanes)]
    streams = [b"".join(bytes(pairs[k][0].seal_frame(FrameType.DATA, h, c, out.flags)) for h, c in out.lane(k, lanes))
               for k in range(lanes)]
    per_lane = [drive(pairs[k][1], streams[k], rng) for k in range(lanes)]
    order = [k for k in range(lanes) for _ in per_lane[k]]
    rng.shuffle(order)
    asm, got, cursors = reassembler(), [], [0] * lanes
    for k in order:
        frame = per_lane[k][cursors[k]]
        cursors[k] += 1
        # production hands over the bytearray (a first chunk becomes the message's buffer); a
        # view is borrowed and copied
        chunk = frame.payload if rng.random() < 0.5 else memoryview(bytes(frame.payload))
        delivery = asm.add_chunk("peer", k, frame.header, chunk, frame.flags)
        if delivery is not None:
            got.append(delivery)
    assert len(got) == 1 and got[0].message == msg and got[0].payload == payload
    assert asm.pending("peer") == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(st.sampled_from("ionzkthcm"), st.integers(-2, 70000) | st.text(max_size=2)
                                          | st.sampled_from(["m", "q"]) | st.dictionaries(st.just("a"), st.integers())),
                          st.binary(max_size=300), st.integers(0, 3)), max_size=12))
def test_reassembler_raises_only_protocol_error(chunks):
    asm = reassembler(max_message=65536, max_pending=100000, max_partials=3)
    for header, body, flags in chunks:
        try:
            delivery = asm.add_chunk("p", flags, header, memoryview(body), flags)
        except ProtocolError:
            continue
        if delivery is not None:
            assert isinstance(delivery.payload, bytearray) and len(delivery.payload) == header["n"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.randoms(use_true_random=False))
def test_channel_decoder_raises_only_protocol_error(garbage, rng):
    tx, rx = channel_pair()
    good = b"".join(bytes(tx.seal_frame(FrameType.DATA, {"i": i}, os.urandom(rng.randint(0, 300)))) for i in range(3))
    for stream in (garbage, good[:rng.randint(0, len(good))] + garbage):
        _, rx = channel_pair()
        try:
            drive(rx, stream, rng)
        except ProtocolError:
            with pytest.raises(ProtocolError):  # a broken channel stays broken
                rx.received(0)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.randoms(use_true_random=False))
def test_tampered_record_is_never_delivered_and_earlier_ones_are(flip, rng):
    tx, rx = channel_pair()
    records = [bytes(tx.seal_frame(FrameType.DATA, {"i": i}, bytes([i]) * 200)) for i in range(5)]
    stream = bytearray(b"".join(records))
    flip %= len(stream) - len(records[-1])
    stream[flip] ^= 0x40
    delivered: list[Frame] = []
    try:  # a tampered length may also leave the decoder waiting for bytes that never come
        for frame in rx.receive_data(bytes(stream)):
            delivered.append(Frame(frame.type, frame.header, bytes(frame.payload)))
    except ProtocolError:
        pass
    intact = sum(1 for r in range(5) if sum(map(len, records[:r + 1])) <= flip)
    assert [f.header["i"] for f in delivered] == list(range(intact))
    assert all(f.payload == bytes([f.header["i"]]) * 200 for f in delivered)


def test_feed_is_the_incremental_decoder():
    tx, rx = channel_pair()
    stream = b"".join(bytes(tx.seal_frame(FrameType.PING, {"p": i})) for i in range(5))
    got = [f.header["p"] for k in range(0, len(stream), 7) for f in rx.feed(stream[k:k + 7])]
    assert got == list(range(5))
    with pytest.raises(ProtocolError, match="out of order"):
        rx.feed(stream[:40])  # a replayed record
    with pytest.raises(ProtocolError, match="broken"):
        rx.feed(b"\x00" * 12)


def test_limits_are_checked_before_buffering():
    asm = reassembler(max_message=1000, max_pending=1500, max_partials=2)
    with pytest.raises(ProtocolError, match="exceeds limit"):
        asm.add_chunk("p", 1, {"i": 1, "o": 0, "n": 1001, "z": 10}, memoryview(b"x" * 10))
    asm.add_chunk("p", 1, {"i": 1, "o": 0, "n": 1000, "z": 10, **encode_meta(Mail("a", {}))}, memoryview(b"x" * 10))
    with pytest.raises(ProtocolError, match="would exceed 1500"):
        asm.add_chunk("p", 1, {"i": 2, "o": 10, "n": 600, "z": 10}, memoryview(b"x" * 10))
    asm.add_chunk("p", 1, {"i": 3, "o": 10, "n": 400, "z": 10}, memoryview(b"x" * 10))
    with pytest.raises(ProtocolError, match="more than 2 partial"):
        asm.add_chunk("p", 1, {"i": 4, "o": 10, "n": 20, "z": 10}, memoryview(b"x" * 10))
    with pytest.raises(ProtocolError, match="duplicate"):
        asm.add_chunk("p", 1, {"i": 3, "o": 10, "n": 400, "z": 10}, memoryview(b"x" * 10))
    with pytest.raises(ProtocolError, match="grid"):
        asm.add_chunk("p", 1, {"i": 3, "o": 15, "n": 400, "z": 10}, memoryview(b"x" * 10))
    assert asm.discard_tag("a") == 1 and asm.pending("p") == 1


def test_lost_connection_drops_striped_messages_and_their_late_chunks():
    asm = reassembler()
    mail = encode_meta(Mail("t", {}))
    asm.add_chunk("p", 1, {"i": 5, "o": 0, "n": 20, "z": 10, **mail}, memoryview(b"a" * 10), STRIPED)
    asm.add_chunk("p", 1, {"i": 6, "o": 0, "n": 20, "z": 10, **mail}, memoryview(b"a" * 10))  # one lane only
    asm.connection_lost("p", 2, last=False)
    assert asm.pending("p") == 1  # the striped one is gone, the lane message on a live conn stays
    assert asm.add_chunk("p", 1, {"i": 5, "o": 10, "n": 20, "z": 10}, memoryview(b"b" * 10), STRIPED) is None
    assert asm.pending("p") == 0 + 1
    done = asm.add_chunk("p", 1, {"i": 6, "o": 10, "n": 20, "z": 10}, memoryview(b"b" * 10))
    assert done is not None and done.payload == b"a" * 10 + b"b" * 10 and done.message == Mail("t", {})
    asm.connection_lost("p", 1, last=True)
    assert asm.pending("p") == 0


def test_error_codes_map_to_typed_errors():
    cases = {ErrorCode.BUSY: RemoteBusy, ErrorCode.RATE_LIMITED: RemoteRateLimited,
             ErrorCode.NO_SUCH_METHOD: NoSuchMethod, ErrorCode.HANDLER_FAILED: RemoteError}
    for code, cls in cases.items():
        err = remote_error(decode_meta(encode_meta(Error(3, code, "why: it broke", "KeyError"))), "a" * 40)
        assert type(err) is cls and err.remote_type == "KeyError" and err.detail == "why: it broke"
        assert str(err) == "aaaaaaaaaaaa: KeyError: why: it broke"
    err = Error.from_exception(9, ValueError("bad value"))
    assert (err.code, err.remote_type, err.message) == (ErrorCode.HANDLER_FAILED, "ValueError", "bad value")
    with pytest.raises(ProtocolError, match="unknown code"):
        decode_meta({"k": "e", "c": 1, "x": 99, "err": "?"})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_owned_frame_decoding_matches_the_view_decoder(data, valid):
    from peer.wire import decode_frame, decode_frame_owned, encode_frame
    buf = bytes(encode_frame(Frame(FrameType.DATA, {"a": len(data)}, data))) if valid else data
    try:
        expected = decode_frame(buf)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decode_frame_owned(bytearray(buf))
        return
    got = decode_frame_owned(bytearray(buf))
    assert isinstance(got.payload, bytearray) and got.payload == expected.payload
    assert (got.type, got.header, got.flags) == (expected.type, expected.header, expected.flags)


def test_every_record_hands_over_a_buffer_of_its_own():
    tx, rx = channel_pair()  # max_payload 4096
    small, full = os.urandom(1000), os.urandom(4096)
    first = list(rx.receive_data(bytes(tx.seal_frame(FrameType.DATA, {}, small))))[0].payload
    second = list(rx.receive_data(bytes(tx.seal_frame(FrameType.DATA, {}, full))))[0].payload
    assert isinstance(first, bytearray) and isinstance(second, bytearray)
    assert first == small and second == full  # the later record did not overwrite the earlier payload
