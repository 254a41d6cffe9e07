"""Sans-IO authenticated key exchange (SIGMA-style, in the spirit of the Noise XX pattern).

Messages (plaintext wire frames)::

    I -> R  HELLO  {eph, nonce, id}            ephemeral X25519 key, 32 random bytes, Ed25519 key
    R -> I  HELLO  {eph, nonce, id}
    R -> I  AUTH   {sig, mac}                  Ed25519 sig and swarm-token HMAC over the transcript
    I -> R  AUTH   {sig, mac}
    R -> I  ACCEPT {}                          (or REJECT {reason} from whichever side detects a fault)

transcript hash th = SHA-256(label | I.eph | I.nonce | I.id | R.eph | R.nonce | R.id).
sig = Ed25519(role label | th): proves the peer holds the private key of the id it presented.
mac = HMAC-SHA256(k_mac, role label | th) with k_mac = HKDF(HKDF(token) | DH, salt=th): proves
knowledge of the swarm token; mixing in the X25519 secret keeps a passive eavesdropper from
brute-forcing a weak token offline. Session keys = HKDF(DH, salt=th) split per direction.
The side that detects a fault queues a REJECT frame with the reason before raising, so the
other side reports the real cause instead of a bare EOF.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peer.errors import AuthError, ProtocolError
from peer.identity import Identity, peer_id_from_public, verify_signature
from peer.wire import Frame, FrameDecoder, FrameType, encode_frame

_LABEL = b"lowband-handshake-v1"
_ROLE = {True: b"initiator", False: b"responder"}
MAX_HANDSHAKE_FRAME = 4096
KEY_BYTES = 32  # AES-256-GCM


class State(enum.Enum):
    WAIT_HELLO = "wait-hello"
    WAIT_AUTH = "wait-auth"
    WAIT_ACCEPT = "wait-accept"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class HandshakeResult:
    peer_id: str
    peer_public: bytes
    send_key: bytes
    recv_key: bytes
    transcript_hash: bytes


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _field(header: dict, name: str, size: int) -> bytes:
    value = header.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"handshake field {name!r} must be {size} bytes")
    return value


class Handshake:
    """One side of the handshake. Drive it with :meth:`receive_data` / :meth:`data_to_send`.

    ``receive_data`` raises AuthError / ProtocolError on failure; the REJECT frame for the
    peer is queued *before* raising, so callers always flush ``data_to_send()`` (e.g. in a
    ``finally``) before closing the socket.
    """

    def __init__(self, identity: Identity, token: bytes, *, initiator: bool,
                 expected_peer_id: str | None = None) -> None:
        if not token:
            raise ValueError("swarm token must not be empty")
        self.identity = identity
        self.initiator = initiator
        self.expected_peer_id = expected_peer_id
        self.state = State.WAIT_HELLO
        self.result: HandshakeResult | None = None
        self._token_key = _hkdf(bytes(token), None, b"lowband-v1 swarm-token")
        self._eph = X25519PrivateKey.generate()
        self._hello = {
            "eph": self._eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            "nonce": os.urandom(32),
            "id": identity.public_bytes,
        }
        self._decoder = FrameDecoder(max_header=MAX_HANDSHAKE_FRAME, max_payload=0)
        self._out = bytearray()
        self._peer: dict | None = None
        self._th = b""
        self._shared = b""
        if initiator:
            self._emit(FrameType.HELLO, self._hello)

    # ----------------------------------------------------------------- sans-IO surface
    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def take_trailing_data(self) -> bytes:
        """Bytes received after the handshake's last frame (already session records)."""
        return self._decoder.take_buffer()

    def receive_data(self, data: bytes) -> None:
        if self.state in (State.DONE, State.FAILED):
            raise ProtocolError(f"handshake already {self.state.value}")
        try:
            self._decoder.receive_data(data)
            while self.state is not State.DONE and (frame := self._decoder.next_frame()) is not None:
                self._on_frame(frame)
        except AuthError as e:
            if self.state is not State.FAILED:  # a received REJECT is not answered with another
                self._fail(str(e))
            raise
        except ProtocolError as e:
            self._fail(f"protocol error: {e}")
            raise

    # ----------------------------------------------------------------- internals
    def _emit(self, type_: FrameType, header: dict) -> None:
        self._out += encode_frame(Frame(type_, header))

    def _fail(self, reason: str) -> None:
        self._emit(FrameType.REJECT, {"reason": reason[:512], "by": self.identity.peer_id})
        self.state = State.FAILED

    def _on_frame(self, frame: Frame) -> None:
        if frame.type == FrameType.REJECT:
            reason, by = frame.header.get("reason"), frame.header.get("by")
            self.state = State.FAILED
            raise AuthError(f"peer {by if isinstance(by, str) else '?'} rejected the handshake: "
                            f"{reason if isinstance(reason, str) else 'no reason given'}")
        expected = {State.WAIT_HELLO: FrameType.HELLO, State.WAIT_AUTH: FrameType.AUTH,
                    State.WAIT_ACCEPT: FrameType.ACCEPT}[self.state]
        if frame.type != expected:
            raise ProtocolError(f"expected {expected.name} frame during handshake, got type {frame.type}")
        if self.state is State.WAIT_HELLO:
            self._on_hello(frame.header)
        elif self.state is State.WAIT_AUTH:
            self._on_auth(frame.header)
        else:
            self.state = State.DONE

    def _on_hello(self, header: dict) -> None:
        peer = {"eph": _field(header, "eph", 32), "nonce": _field(header, "nonce", 32), "id": _field(header, "id", 32)}
        self._peer = peer
        peer_id = peer_id_from_public(peer["id"])
        if self.expected_peer_id is not None and peer_id != self.expected_peer_id:
            raise AuthError(f"unexpected peer id: expected {self.expected_peer_id}, got {peer_id}")
        i, r = (self._hello, peer) if self.initiator else (peer, self._hello)
        self._th = hashlib.sha256(b"".join([_LABEL, i["eph"], i["nonce"], i["id"],
                                            r["eph"], r["nonce"], r["id"]])).digest()
        try:
            self._shared = self._eph.exchange(X25519PublicKey.from_public_bytes(peer["eph"]))
        except ValueError as e:  # low-order point -> all-zero secret
            raise ProtocolError(f"invalid ephemeral key: {e}") from e
        if not self.initiator:
            self._emit(FrameType.HELLO, self._hello)
            self._emit_auth()
        self.state = State.WAIT_AUTH

    def _mac(self, role: bytes) -> bytes:
        k_mac = _hkdf(self._token_key + self._shared, self._th, b"lowband-v1 token-mac")
        return hmac.new(k_mac, role + self._th, hashlib.sha256).digest()

    def _emit_auth(self) -> None:
        role = _ROLE[self.initiator]
        self._emit(FrameType.AUTH, {"sig": self.identity.sign(role + self._th), "mac": self._mac(role)})

    def _on_auth(self, header: dict) -> None:
        assert self._peer is not None
        role = _ROLE[not self.initiator]
        sig, mac = _field(header, "sig", 64), _field(header, "mac", 32)
        peer_id = peer_id_from_public(self._peer["id"])
        if not verify_signature(self._peer["id"], sig, role + self._th):
            raise AuthError(f"bad signature: peer {peer_id} cannot sign for the public key it presented")
        if not hmac.compare_digest(mac, self._mac(role)):
            raise AuthError(f"wrong swarm token: the token proof of peer {peer_id} did not verify "
                            "(the two peers were given different swarm tokens)")
        keys = _hkdf(self._shared, self._th, b"lowband-v1 session keys", 2 * KEY_BYTES)
        i2r, r2i = keys[:KEY_BYTES], keys[KEY_BYTES:]
        send, recv = (i2r, r2i) if self.initiator else (r2i, i2r)
        self.result = HandshakeResult(peer_id, self._peer["id"], send, recv, self._th)
        if self.initiator:
            self._emit_auth()
            self.state = State.WAIT_ACCEPT
        else:
            self._emit(FrameType.ACCEPT, {})
            self.state = State.DONE
