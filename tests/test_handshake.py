"""Sans-IO handshake and record layer, both sides driven by each other in memory; identity files."""
from __future__ import annotations

import os
import stat
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.errors import AuthError, ProtocolError
from peer.handshake import Handshake, State
from peer.identity import Identity, peer_id_from_public, verify_signature
from peer.secure import SecureChannel
from peer.wire import Frame, FrameType, encode_frame

TOKEN = b"swarm-token"


class Impostor(Identity):
    """Claims ``victim``'s public key, signs with a different key."""

    def __init__(self, victim: Identity) -> None:
        super().__init__(Ed25519PrivateKey.generate())
        self.public_bytes, self.peer_id = victim.public_bytes, victim.peer_id


def run(i: Handshake, r: Handshake, max_rounds: int = 6) -> None:
    """Shuttle bytes between the two machines until both finish; errors propagate."""
    for _ in range(max_rounds):
        if i.done and r.done:
            return
        out = i.data_to_send()
        if out:
            r.receive_data(out)
        out = r.data_to_send()
        if out:
            i.receive_data(out)
    raise AssertionError("handshake did not converge")


def pair(token_i=TOKEN, token_r=TOKEN, ident_i=None, ident_r=None, expected=None):
    a, b = ident_i or Identity.generate(), ident_r or Identity.generate()
    return (Handshake(a, token_i, initiator=True, expected_peer_id=expected),
            Handshake(b, token_r, initiator=False))


def test_handshake_agrees_on_keys_and_ids():
    i, r = pair()
    run(i, r)
    assert i.result.peer_id == r.identity.peer_id and r.result.peer_id == i.identity.peer_id
    assert i.result.send_key == r.result.recv_key and i.result.recv_key == r.result.send_key
    assert i.result.send_key != i.result.recv_key
    assert i.result.transcript_hash == r.result.transcript_hash
    assert i.take_trailing_data() == b"" and r.take_trailing_data() == b""
    # fresh ephemeral keys and nonces: a second session between the same peers has new keys
    i2, r2 = pair(ident_i=i.identity, ident_r=r.identity)
    run(i2, r2)
    assert i2.result.send_key != i.result.send_key


def channels() -> tuple[SecureChannel, SecureChannel]:
    i, r = pair()
    run(i, r)
    return (SecureChannel(i.result.send_key, i.result.recv_key),
            SecureChannel(r.result.send_key, r.result.recv_key))


def test_records_flow_in_any_split():
    a, b = channels()
    recs = [bytes(a.seal_frame(FrameType.DATA, {"n": k}, os.urandom(100))) for k in range(3)]
    stream = b"".join(recs)
    got = [f for k in range(0, len(stream), 7) for f in b.feed(stream[k:k + 7])]
    assert [f.header["n"] for f in got] == [0, 1, 2]
    assert [f.header for f in a.feed(b.seal_frame(FrameType.PONG, {"p": 1}))] == [{"p": 1}]


@pytest.mark.parametrize("attack, match", [("replay", "replayed"), ("reorder", "out of order"),
                                           ("flip-body", "failed authentication"),
                                           ("flip-counter", "out of order"), ("reflect", "failed authentication"),
                                           ("truncate-length", "record length")])
def test_tampered_replayed_reordered_records_are_fatal(attack, match):
    a, b = channels()
    r0, r1 = bytes(a.seal_frame(FrameType.DATA, {"n": 0}, b"x" * 50)), bytes(a.seal_frame(FrameType.DATA, {"n": 1}))
    if attack == "replay":
        b.feed(r0)
        bad = r0
    elif attack == "reorder":
        bad = r1
    elif attack == "reflect":  # the receiver's own outgoing record looped back: sealed under the other key
        bad = bytes(b.seal_frame(FrameType.DATA, {}))
    else:
        flipped = bytearray(r0)
        flipped[{"flip-body": 30, "flip-counter": 11, "truncate-length": 3}[attack]] ^= 0x40
        bad = bytes(flipped)
        if attack == "truncate-length":
            bad = b"\x00\x00\x00\x01" + bad[4:]
    with pytest.raises(ProtocolError, match=match):
        b.feed(bad)
    with pytest.raises(ProtocolError, match="broken"):  # no recovery inside a broken stream
        b.feed(r1)


def test_wrong_token_fails_with_clear_error_on_both_sides():
    i, r = pair(token_r=b"other-token")
    r.receive_data(i.data_to_send())
    with pytest.raises(AuthError, match="wrong swarm token"):
        i.receive_data(r.data_to_send())  # initiator checks the responder's proof first
    with pytest.raises(AuthError, match="rejected the handshake: wrong swarm token"):
        r.receive_data(i.data_to_send())  # ...and its REJECT frame tells the responder why
    assert i.state is State.FAILED and r.state is State.FAILED and r.data_to_send() == b""


@pytest.mark.parametrize("impostor_side", ["initiator", "responder"])
def test_key_it_cannot_sign_for_is_rejected_on_both_sides(impostor_side):
    victim = Identity.generate()
    if impostor_side == "initiator":
        i, r = pair(ident_i=Impostor(victim))
        detector, other = r, i
    else:
        i, r = pair(ident_r=Impostor(victim))
        detector, other = i, r
    with pytest.raises(AuthError, match=f"bad signature: peer {victim.peer_id} cannot sign"):
        run(i, r)
    assert detector.state is State.FAILED
    with pytest.raises(AuthError, match=f"peer {detector.identity.peer_id} rejected the handshake: bad signature"):
        other.receive_data(detector.data_to_send())
    assert other.state is State.FAILED


def test_expected_peer_id_mismatch_and_garbage():
    i, r = pair(expected="ab" * 20)
    r.receive_data(i.data_to_send())
    with pytest.raises(AuthError, match="unexpected peer id"):
        i.receive_data(r.data_to_send())
    assert b"unexpected peer id" in i.data_to_send()  # REJECT queued for the responder
    _, r = pair()
    with pytest.raises(ProtocolError):
        r.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert r.data_to_send()  # a REJECT with the protocol error
    _, r = pair()
    with pytest.raises(ProtocolError, match="expected HELLO"):
        r.receive_data(encode_frame(Frame(FrameType.AUTH, {"sig": b"x", "mac": b"y"})))
    _, r = pair()
    with pytest.raises(ProtocolError, match="'eph' must be 32 bytes"):
        r.receive_data(encode_frame(Frame(FrameType.HELLO, {"eph": b"short", "nonce": b"n" * 32, "id": b"i" * 32})))
    _, r = pair()
    with pytest.raises(ProtocolError, match="invalid ephemeral key"):  # low-order X25519 point
        r.receive_data(encode_frame(Frame(FrameType.HELLO, {"eph": bytes(32), "nonce": b"n" * 32, "id": b"i" * 32})))


def test_identity_file_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "nested" / "peer.key"
    a = Identity.load_or_create(path)
    b = Identity.load_or_create(path)
    assert a.peer_id == b.peer_id and len(a.peer_id) == 40
    assert a.peer_id == peer_id_from_public(a.public_bytes)
    if sys.platform != "win32":
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sig = a.sign(b"data")
    assert verify_signature(b.public_bytes, sig, b"data")
    assert not verify_signature(b.public_bytes, sig, b"datA")
    assert not verify_signature(b.public_bytes[:5], sig, b"data")
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="corrupt"):
        Identity.load_or_create(path)


def test_records_sent_right_after_accept_are_kept_as_trailing_data():
    i, r = pair()
    r.receive_data(i.data_to_send())
    i.receive_data(r.data_to_send())
    r.receive_data(i.data_to_send())
    assert r.done
    tx = SecureChannel(r.result.send_key, r.result.recv_key)
    i.receive_data(r.data_to_send() + bytes(tx.seal_frame(FrameType.DATA, {"early": True})))  # one TCP read
    assert i.done
    rx = SecureChannel(i.result.send_key, i.result.recv_key)
    assert [f.header for f in rx.feed(i.take_trailing_data())] == [{"early": True}]
