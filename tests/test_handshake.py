"""Sans-IO handshake and record layer, both sides driven by each other in memory; identity files."""
from __future__ import annotations

import os
import stat
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.credentials import Credential, issue
from peer.errors import AuthError, ProtocolError
from peer.handshake import Handshake, State
from peer.identity import Identity, peer_id_from_public, verify_signature
from peer.secure import SecureChannel
from peer.wire import Frame, FrameDecoder, FrameType, encode_frame

TOKEN = b"swarm-token-a0bbdc35dfe2275ca82eb06a84e6b56c0f37c5ba"


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


def frame_types(data: bytes) -> list[FrameType]:
    return [FrameType(f.type) for f in FrameDecoder().feed(data)]


def test_wrong_token_fails_with_clear_error_on_both_sides():
    i, r = pair(token_r=b"other-token-5f0e1c3a9b7d")
    r_out = bytearray()
    r.receive_data(i.data_to_send())
    r_out += r.data_to_send()
    i.receive_data(bytes(r_out))  # the responder's HELLO: the initiator now proves the token
    with pytest.raises(AuthError, match="wrong swarm token"):
        r.receive_data(i.data_to_send())  # the responder checks the initiator's proof first
    reject = r.data_to_send()
    r_out += reject
    with pytest.raises(AuthError, match="rejected the handshake: wrong swarm token"):
        i.receive_data(reject)  # ...and its REJECT frame tells the initiator why
    assert i.state is State.FAILED and r.state is State.FAILED and i.data_to_send() == b""
    # no offline oracle: a dialer with a wrong token got a HELLO and a REJECT, no token-derived byte
    assert frame_types(bytes(r_out)) == [FrameType.HELLO, FrameType.REJECT]
    hello = FrameDecoder().feed(bytes(r_out))[0].header
    assert set(hello) == {"eph", "nonce", "id", "sig"}


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


# ----------------------------------------------------------------------------- credential mode
NOW = 1_800_000_000.0
AUTHORITY = Identity.generate()


def admitted(roles=("train",), *, authority=AUTHORITY, lifetime_s=3600.0, issued=NOW):
    ident = Identity.generate()
    return ident, issue(authority, ident.public_bytes, roles, now=issued, lifetime_s=lifetime_s, serial=1)


def cred_pair(token_i=None, token_r=None, cred_i=None, cred_r=None, *, auth_i=AUTHORITY.public_bytes,
              auth_r=AUTHORITY.public_bytes, revoked_r=None, now=NOW + 60):
    (a, ca), (b, cb) = cred_i or admitted(["train"]), cred_r or admitted(["serve", "train"])
    return (Handshake(a, token_i, initiator=True, credential=ca, authority=auth_i, now=lambda: now),
            Handshake(b, token_r, initiator=False, credential=cb, authority=auth_r, revoked=revoked_r,
                      now=lambda: now))


@pytest.mark.parametrize("token", [None, TOKEN])
def test_credential_mode_succeeds_and_reports_roles(token):
    i, r = cred_pair(token, token)
    run(i, r)
    assert i.result.roles == frozenset({"serve", "train"}) and r.result.roles == frozenset({"train"})
    assert i.result.peer_id == r.identity.peer_id and r.result.peer_id == i.identity.peer_id
    assert i.result.send_key == r.result.recv_key and i.result.transcript_hash == r.result.transcript_hash
    t_i, t_r = pair()  # token-only mode: roles unknown
    run(t_i, t_r)
    assert t_i.result.roles is None and t_r.result.roles is None


def test_token_and_credential_both_required_when_both_configured():
    i, r = cred_pair(TOKEN, b"other-token-5f0e1c3a9b7d")  # valid credentials, wrong token
    with pytest.raises(AuthError, match="wrong swarm token"):
        run(i, r)
    assert r.state is State.FAILED and not i.done


def fail_at_responder(i: Handshake, r: Handshake, match: str) -> None:
    """The responder refuses the initiator's AUTH; the initiator learns why; nothing else was sent."""
    r.receive_data(i.data_to_send())
    i.receive_data(r.data_to_send())
    with pytest.raises(AuthError, match=match):
        r.receive_data(i.data_to_send())
    reject = r.data_to_send()
    assert frame_types(reject) == [FrameType.REJECT]
    with pytest.raises(AuthError, match="rejected the handshake: .*" + match):
        i.receive_data(reject)


def fail_at_initiator(i: Handshake, r: Handshake, match: str) -> None:
    """The initiator refuses the responder's HELLO before it proves anything itself."""
    r.receive_data(i.data_to_send())
    with pytest.raises(AuthError, match=match):
        i.receive_data(r.data_to_send())
    reject = i.data_to_send()
    assert frame_types(reject) == [FrameType.REJECT]  # no AUTH: no token MAC, no credential
    with pytest.raises(AuthError, match="rejected the handshake: .*" + match):
        r.receive_data(reject)


def test_wrong_authority():
    other = Identity.generate()
    fail_at_initiator(*cred_pair(cred_r=admitted(authority=other)), "issued by another coordinator")
    fail_at_responder(*cred_pair(cred_i=admitted(authority=other)), "issued by another coordinator")
    # a side pinning another coordinator refuses credentials of this one
    fail_at_initiator(*cred_pair(auth_i=other.public_bytes), "issued by another coordinator")


def test_expired_and_not_yet_valid():
    fail_at_responder(*cred_pair(cred_i=admitted(lifetime_s=30.0)), "expired")
    fail_at_initiator(*cred_pair(cred_r=admitted(lifetime_s=30.0)), "expired")
    fail_at_responder(*cred_pair(cred_i=admitted(issued=NOW + 3600)), "not yet valid")


def test_revoked():
    a, ca = admitted()
    fail_at_responder(*cred_pair(cred_i=(a, ca), revoked_r=lambda pid: pid == a.peer_id), "was revoked")
    i, r = cred_pair(cred_i=(a, ca), revoked_r=lambda pid: pid == "00" * 20)  # someone else revoked
    run(i, r)


def test_credential_of_another_key():
    victim, stolen = admitted(["operator"])
    thief = Identity.generate()
    with pytest.raises(ValueError, match="not for this identity"):  # our own side refuses to send it
        Handshake(thief, None, initiator=True, credential=stolen, authority=AUTHORITY.public_bytes)
    i, r = cred_pair(cred_i=admitted())
    i._cred = stolen.encode()  # a hostile initiator shows the stolen credential (signed by the thief's key)
    fail_at_responder(i, r, "bound to another key")
    i, r = cred_pair(cred_r=admitted())
    r._cred = stolen.encode()
    fail_at_initiator(i, r, "bound to another key")


def test_missing_credential_when_authority_set():
    a = Identity.generate()
    i = Handshake(a, None, initiator=True, authority=AUTHORITY.public_bytes, now=lambda: NOW)
    _, r = cred_pair()
    fail_at_responder(i, r, "showed no credential")
    b = Identity.generate()  # a responder with an authority but no credential of its own
    i, _ = cred_pair()
    r = Handshake(b, None, initiator=False, authority=AUTHORITY.public_bytes, now=lambda: NOW)
    fail_at_initiator(i, r, "showed no credential")


def test_mode_mismatch_is_named():
    i, _ = pair()                       # token only
    _, r = cred_pair()                  # credentials only
    fail_at_responder(i, r, "showed no credential")
    a, ca = admitted()
    i = Handshake(a, TOKEN, initiator=True, credential=ca)  # token + a credential r can check
    _, r = cred_pair()
    fail_at_responder(i, r, "proves a swarm token, but this peer runs without one")
    i, _ = cred_pair()
    _, r = cred_pair(token_r=TOKEN)
    fail_at_responder(i, r, "sent no swarm-token proof")


def test_credential_swapped_in_transit_breaks_the_signature():
    (a, ca), (_, cb) = admitted(["client"]), admitted()
    more = issue(AUTHORITY, a.public_bytes, ["operator"], now=NOW, lifetime_s=3600.0, serial=2)  # also valid
    i, r = cred_pair(cred_i=(a, ca))
    r.receive_data(i.data_to_send())
    i.receive_data(r.data_to_send())
    auth = FrameDecoder().feed(i.data_to_send())[0]
    assert Credential.decode(auth.header["cred"]) == ca
    swapped = encode_frame(Frame(FrameType.AUTH, {**auth.header, "cred": more.encode()}))
    with pytest.raises(AuthError, match="bad signature"):
        r.receive_data(swapped)


def test_malformed_credential_on_the_wire_is_a_protocol_error():
    i, r = cred_pair()
    i._cred = b"\x98" + b"\x00" * 20  # signed by the initiator, but not a credential
    r.receive_data(i.data_to_send())
    i.receive_data(r.data_to_send())
    with pytest.raises(ProtocolError, match="credential"):
        r.receive_data(i.data_to_send())
    assert r.state is State.FAILED and frame_types(r.data_to_send()) == [FrameType.REJECT]
    _, r = cred_pair()
    hello = FrameDecoder().feed(Handshake(Identity.generate(), TOKEN, initiator=True).data_to_send())[0]
    r.receive_data(encode_frame(hello))
    with pytest.raises(ProtocolError, match="'cred' must be 1..400 bytes"):
        r.receive_data(encode_frame(Frame(FrameType.AUTH, {"sig": bytes(64), "cred": b"c" * 401})))


def test_constructor_refuses_bad_configuration():
    ident = Identity.generate()
    with pytest.raises(ValueError, match="needs a swarm token, a credential authority, or both"):
        Handshake(ident, None, initiator=True)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Handshake(ident, b"short-token", initiator=False)
    with pytest.raises(ValueError, match="32-byte"):
        Handshake(ident, None, initiator=False, authority=b"k" * 31)
