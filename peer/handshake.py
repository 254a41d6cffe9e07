"""Sans-IO authenticated key exchange (SIGMA-style, in the spirit of the Noise XX pattern).

Messages (plaintext wire frames)::

    I -> R  HELLO  {eph, nonce, id}             ephemeral X25519 key, 32 random bytes, Ed25519 key
    R -> I  HELLO  {eph, nonce, id, sig, cred?} R proves its key (no token material yet)
    I -> R  AUTH   {sig, mac?, cred?}           I proves its key, the swarm token, its credential
    R -> I  AUTH   {mac?}                       only after R has verified all of I's proofs
    R -> I  ACCEPT {}                           (or REJECT {reason, by} from whichever side detects a fault)

transcript hash th = SHA-256(label | I.eph | I.nonce | I.id | R.eph | R.nonce | R.id).
sig = Ed25519(role label | th | cred or b""): the peer holds the private key of the id it
presented, and the credential it shows is the one it meant (no one can swap it in transit).
mac = HMAC-SHA256(k_mac, role label | th), k_mac = HKDF(HKDF(token) | DH, salt=th): knowledge of
the swarm token; mixing in the X25519 secret keeps a passive eavesdropper from brute-forcing the
token offline. cred = a coordinator-issued :class:`~peer.credentials.Credential`, checked
against the pinned authority key, bound to the HELLO key, unexpired and not revoked; its roles
become ``HandshakeResult.roles``. Session keys = HKDF(DH, salt=th) split per direction.

Modes. A side with a ``token`` sends a MAC and requires one; a side with an ``authority`` requires
a credential (a side with a ``credential`` sends it). Both may be set (closed swarm whose members
also hold roles). Peers of one swarm run the same mode; a mismatch is refused with a reason.

Who proves first. The initiator (the dialer) proves the token before the responder sends any
token-derived byte, so anyone who can connect learns nothing to test token guesses against
offline: a wrong guess gets HELLO, then REJECT. In return the responder proves its *key* in its
HELLO (a signature reveals nothing about the token), and the initiator checks it, the expected
peer id and, in credential mode, the responder's credential before it sends its own MAC: a
stranger listening at a dialled address cannot harvest MACs from a peer that dials a known id or
requires credentials. Dialling an unknown id in token-only mode still gives that listener one
MAC to attack offline, which is why tokens must carry >= 128 bits (peer/tokens.py). The price:
any dialer sees the responder's key and credential (its roles), as it sees its address.

The side that detects a fault queues a REJECT frame with the reason before raising, so the other
side reports the real cause instead of a bare EOF. Because the initiator checks everything about
the responder before it sends AUTH, only a broken responder can fail it after the responder has
finished (the responder then sees an undecodable first record and drops the connection).
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peer.credentials import MAX_CREDENTIAL_BYTES, Credential
from peer.errors import AuthError, ProtocolError
from peer.identity import PUBLIC_KEY_BYTES, Identity, peer_id_from_public, verify_signature
from peer.tokens import MIN_TOKEN_BYTES
from peer.wire import Frame, FrameDecoder, FrameType, encode_frame

_LABEL = b"lowband-handshake-v2"
_ROLE = {True: b"initiator", False: b"responder"}
MAX_HANDSHAKE_FRAME = 4096
MAX_REASON_CHARS = 512
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
    roles: frozenset[str] | None = None  # from the peer's checked credential; None: token-only mode


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _field(header: dict, name: str, size: int) -> bytes:
    value = header.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"handshake field {name!r} must be {size} bytes")
    return value


def _optional(header: dict, name: str, max_size: int) -> bytes | None:
    value = header.get(name)
    if value is None:
        return None
    if not isinstance(value, bytes) or not 0 < len(value) <= max_size:
        raise ProtocolError(f"handshake field {name!r} must be 1..{max_size} bytes")
    return value


class Handshake:
    """One side of the handshake. Drive it with :meth:`receive_data` / :meth:`data_to_send`.

    ``token``: the swarm token (raw bytes, >= 16; strings are checked for strength where they are
    configured, peer/tokens.py). ``authority``: the coordinator's public key; when set, the peer
    must show a credential it issued. ``credential``: ours, shown to the peer. ``revoked``: peer
    id -> True if its credential was revoked. At least one of ``token`` / ``authority``.

    ``receive_data`` raises AuthError / ProtocolError on failure; the REJECT frame for the
    peer is queued *before* raising, so callers always flush ``data_to_send()`` (e.g. in a
    ``finally``) before closing the socket.
    """

    def __init__(self, identity: Identity, token: bytes | None, *, initiator: bool,
                 expected_peer_id: str | None = None, credential: Credential | None = None,
                 authority: bytes | None = None, revoked: Callable[[str], bool] | None = None,
                 now: Callable[[], float] = time.time) -> None:
        if token is None and authority is None:
            raise ValueError("a handshake needs a swarm token, a credential authority, or both")
        if token is not None and len(token) < MIN_TOKEN_BYTES:
            raise ValueError(f"swarm token must be at least {MIN_TOKEN_BYTES} bytes, got {len(token)}")
        if authority is not None and len(authority) != PUBLIC_KEY_BYTES:
            raise ValueError(f"authority must be a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
        if credential is not None and bytes(credential.peer_public) != identity.public_bytes:
            raise ValueError(f"credential is for peer {credential.peer_id}, not for this identity "
                             f"{identity.peer_id}")
        self.identity = identity
        self.initiator = initiator
        self.expected_peer_id = expected_peer_id
        self.state = State.WAIT_HELLO
        self.result: HandshakeResult | None = None
        self._token_key = None if token is None else _hkdf(bytes(token), None, b"lowband-v1 swarm-token")
        self._cred = b"" if credential is None else credential.encode()
        self._authority = None if authority is None else bytes(authority)
        self._revoked = revoked
        self._now = now
        self._eph = X25519PrivateKey.generate()
        self._hello = {
            "eph": self._eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            "nonce": os.urandom(32),
            "id": identity.public_bytes,
        }
        self._decoder = FrameDecoder(max_header=MAX_HANDSHAKE_FRAME, max_payload=0)
        self._out = bytearray()
        self._peer: dict | None = None
        self._peer_roles: frozenset[str] | None = None
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
        self._emit(FrameType.REJECT, {"reason": reason[:MAX_REASON_CHARS], "by": self.identity.peer_id})
        self.state = State.FAILED

    def _on_frame(self, frame: Frame) -> None:
        if frame.type == FrameType.REJECT:
            reason, by = frame.header.get("reason"), frame.header.get("by")
            self.state = State.FAILED
            raise AuthError(f"peer {by[:40] if isinstance(by, str) else '?'} rejected the handshake: "
                            f"{reason[:MAX_REASON_CHARS] if isinstance(reason, str) else 'no reason given'}")
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
        if self.initiator:  # the responder's key and credential, checked before we prove anything
            self._check_identity(header)
            self._emit(FrameType.AUTH, self._proofs(with_sig=True))
        else:
            self._emit(FrameType.HELLO, {**self._hello, **self._signed()})
        self.state = State.WAIT_AUTH

    def _on_auth(self, header: dict) -> None:
        assert self._peer is not None
        if not self.initiator:
            self._check_identity(header)
        self._check_mac(header)
        keys = _hkdf(self._shared, self._th, b"lowband-v1 session keys", 2 * KEY_BYTES)
        i2r, r2i = keys[:KEY_BYTES], keys[KEY_BYTES:]
        send, recv = (i2r, r2i) if self.initiator else (r2i, i2r)
        self.result = HandshakeResult(peer_id_from_public(self._peer["id"]), self._peer["id"], send, recv,
                                      self._th, self._peer_roles)
        if self.initiator:
            self.state = State.WAIT_ACCEPT
        else:
            self._emit(FrameType.AUTH, self._proofs(with_sig=False))
            self._emit(FrameType.ACCEPT, {})
            self.state = State.DONE

    # ----------------------------------------------------------------- proofs
    def _signed(self) -> dict:
        """Our signature over the transcript and our credential (plus the credential itself)."""
        out = {"sig": self.identity.sign(_ROLE[self.initiator] + self._th + self._cred)}
        if self._cred:
            out["cred"] = self._cred
        return out

    def _proofs(self, *, with_sig: bool) -> dict:
        out = self._signed() if with_sig else {}
        if self._token_key is not None:
            out["mac"] = self._mac(_ROLE[self.initiator])
        return out

    def _mac(self, role: bytes) -> bytes:
        assert self._token_key is not None
        k_mac = _hkdf(self._token_key + self._shared, self._th, b"lowband-v1 token-mac")
        return hmac.new(k_mac, role + self._th, hashlib.sha256).digest()

    def _check_identity(self, header: dict) -> None:
        """The peer's signature (it holds its key) and, if we pin an authority, its credential."""
        assert self._peer is not None
        sig = _field(header, "sig", 64)
        cred = _optional(header, "cred", MAX_CREDENTIAL_BYTES)
        peer_id = peer_id_from_public(self._peer["id"])
        if not verify_signature(self._peer["id"], sig, _ROLE[not self.initiator] + self._th + (cred or b"")):
            raise AuthError(f"bad signature: peer {peer_id} cannot sign for the public key it presented")
        if self._authority is None:
            return  # token-only mode: a credential we cannot check is ignored
        if cred is None:
            raise AuthError(f"peer {peer_id} showed no credential, and this swarm admits only peers with "
                            "one (is it running with a bare swarm token, or not admitted yet?)")
        credential = Credential.decode(cred)  # ProtocolError if malformed
        credential.check(authority=self._authority, peer_public=self._peer["id"], now=self._now(),
                         revoked=self._revoked)
        self._peer_roles = credential.roles

    def _check_mac(self, header: dict) -> None:
        peer_id = peer_id_from_public(self._peer["id"]) if self._peer else "?"
        mac = _optional(header, "mac", 32)
        if self._token_key is None:
            if mac is not None:
                raise AuthError(f"peer {peer_id} proves a swarm token, but this peer runs without one "
                                "(the two peers were configured for different admission modes)")
            return
        if mac is None:
            raise AuthError(f"peer {peer_id} sent no swarm-token proof (it runs without a swarm token; "
                            "the two peers were configured for different admission modes)")
        if len(mac) != 32 or not hmac.compare_digest(mac, self._mac(_ROLE[not self.initiator])):
            raise AuthError(f"wrong swarm token: the token proof of peer {peer_id} did not verify "
                            "(the two peers were given different swarm tokens)")
