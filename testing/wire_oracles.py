"""Oracles for the sans-IO wire code, shared by the fuzz bench (bench/fuzz.py) and the hypothesis
tests (tests/test_hostile_input.py): the frame decoder, the handshake and the AEAD record layer
may raise only their typed errors, frames obey the limits, a clean exchange round-trips, a
failed state machine stays failed."""
from __future__ import annotations

import struct
from typing import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peer.errors import AuthError, ProtocolError
from peer.handshake import Handshake, State
from peer.identity import Identity
from peer.secure import RECORD_HEADER_SIZE, SecureChannel
from peer.wire import DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD, Frame, FrameDecoder, decode_frame
from testing.fuzzgen import pieces


def check_decoder(data: bytes, splits: list[int] = (), max_header: int = DEFAULT_MAX_HEADER,
                  max_payload: int = DEFAULT_MAX_PAYLOAD) -> list[Frame]:
    """Feed ``data`` in pieces; only ProtocolError may escape and every frame obeys the limits.
    After a ProtocolError the decoder is abandoned (the connection would be dropped)."""
    dec = FrameDecoder(max_header=max_header, max_payload=max_payload)
    frames: list[Frame] = []
    try:
        for piece in pieces(data, list(splits)):
            frames += dec.feed(piece)
    except ProtocolError:
        pass
    for f in frames:
        assert isinstance(f.header, dict), f"header is {type(f.header).__name__}"
        assert len(f.payload) <= max_payload, "payload over the limit"
        assert 0 <= f.type < 256 and 0 <= f.flags < 256
    return frames


def check_roundtrip(frames: list[bytes], splits: list[int]) -> None:
    """Untampered frames fed in any split decode to exactly what was encoded."""
    stream = b"".join(frames)
    got = check_decoder(stream, splits)
    want = [decode_frame(f) for f in frames]
    assert len(got) == len(want), f"decoded {len(got)} of {len(want)} frames"
    for g, w in zip(got, want):
        assert (g.type, g.header, bytes(g.payload), g.flags) == (w.type, w.header, bytes(w.payload), w.flags)


def check_decode_frame(data: bytes) -> None:
    try:
        f = decode_frame(data)
    except ProtocolError:
        return
    assert isinstance(f.header, dict) and len(f.payload) <= DEFAULT_MAX_PAYLOAD


Tamper = Callable[[int, bytes], bytes]


def run_handshake(ident_i: Identity, ident_r: Identity, token_i: bytes, token_r: bytes,
                  tamper: Tamper | None = None, splitter: Callable[[bytes], list[bytes]] | None = None,
                  expected_peer_id: str | None = None) -> tuple[Handshake, Handshake]:
    """Drive an initiator and a responder to completion, passing each flight through ``tamper``
    (flight index, bytes) -> bytes. Raises only what the oracle allows: nothing — AuthError and
    ProtocolError are part of the protocol and are swallowed here; the caller checks outcomes."""
    i = Handshake(ident_i, token_i, initiator=True, expected_peer_id=expected_peer_id)
    r = Handshake(ident_r, token_r, initiator=False)
    sides = (i, r)
    turn = 0
    for k in range(8):
        src, dst = sides[turn], sides[1 - turn]
        data = src.data_to_send()
        if tamper is not None:
            data = tamper(k, data)
        if not data or dst.state in (State.DONE, State.FAILED):
            break
        try:
            for piece in (splitter(data) if splitter else [data]):
                if dst.state is State.DONE:  # later bytes are session records, not handshake input
                    break
                dst.receive_data(piece)
        except (AuthError, ProtocolError):
            assert dst.state is State.FAILED, f"error raised but state is {dst.state}"
        turn = 1 - turn
    return i, r


def check_handshake_outcome(i: Handshake, r: Handshake, *, tampered: bool, same_token: bool) -> None:
    """Security properties: both sides done => same transcript and crossed keys; a wrong token
    never completes; an untampered exchange with the right token always completes."""
    if i.done and r.done:
        assert i.result and r.result
        assert i.result.transcript_hash == r.result.transcript_hash, "sides finished on different transcripts"
        assert i.result.send_key == r.result.recv_key and i.result.recv_key == r.result.send_key
        assert i.result.peer_id == r.identity.peer_id and r.result.peer_id == i.identity.peer_id
    if not same_token:
        assert not i.done and not r.done, "handshake completed with different swarm tokens"
    if not tampered and same_token:
        assert i.done and r.done, f"clean handshake did not complete: {i.state} / {r.state}"
    for side in (i, r):  # a finished or failed handshake refuses further input with the typed error
        if side.state in (State.DONE, State.FAILED):
            try:
                side.receive_data(b"LB")
                raise AssertionError("terminal handshake accepted more input")
            except ProtocolError:
                pass


def seal_raw(key: bytes, counter: int, plaintext: bytes) -> bytes:
    """An AEAD record around arbitrary plaintext (what an authenticated but hostile peer can send)."""
    clen = len(plaintext) + 16
    head = struct.pack("!IQ", clen, counter)
    return head + AESGCM(key).encrypt(counter.to_bytes(12, "big"), plaintext, head)


def check_channel(recv: SecureChannel, stream: bytes, splits: list[int]) -> list[Frame]:
    """Feed a record stream; only ProtocolError may escape, and a broken channel stays broken."""
    frames: list[Frame] = []
    try:
        for piece in pieces(stream, splits):
            frames += recv.feed(piece)
    except ProtocolError:
        try:
            recv.feed(b"\x00" * RECORD_HEADER_SIZE)
            raise AssertionError("channel accepted records after a fatal error")
        except ProtocolError:
            pass
    for f in frames:
        assert isinstance(f.header, dict) and len(f.payload) <= recv.max_payload
    return frames
