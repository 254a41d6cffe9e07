"""Coordinator-issued credentials: a signed statement "this Ed25519 key holds these roles until T".

A credential is issued by a coordinator (the *authority*, its own Ed25519 key) when a peer is
admitted, and shown by that peer in every mesh handshake (peer/handshake.py). A verifier needs
only the authority's public key, pinned from the join string, and a revocation predicate; no call
to the coordinator is made.

Encoding (msgpack array, <= MAX_CREDENTIAL_BYTES)::

    [version=1, peer_public(32), roles(sorted unique str), issued f64, expires f64, serial u63,
     authority(32), signature(64)]

signature = Ed25519(authority, CONTEXT + msgpack(the same array without the signature)). The
decoder accepts only the canonical form (roles sorted and unique, floats as float64), so one
credential has exactly one encoding, and ``decode(x).encode() == x``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import msgpack

from peer.errors import AuthError, ProtocolError
from peer.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_from_public, verify_signature

ROLES = frozenset({"train", "serve", "client", "operator"})
CONTEXT = b"lowband-credential/v1\n"
VERSION = 1
MAX_CREDENTIAL_BYTES = 400
# A credential issued this far in the future of the verifier's clock is refused (clock skew bound).
MAX_CLOCK_SKEW_S = 300.0
_MAX_SERIAL = 2**63 - 1
_FIELDS = 8


@dataclass(frozen=True)
class Credential:
    peer_public: bytes        # 32-byte Ed25519 public key of the holder
    roles: frozenset[str]     # subset of ROLES
    issued: float             # unix seconds
    expires: float            # unix seconds
    serial: int               # coordinator's running credential number
    authority: bytes          # 32-byte Ed25519 public key of the issuing coordinator
    signature: bytes          # 64 bytes: authority's signature over signed_bytes()

    @property
    def peer_id(self) -> str:
        return peer_id_from_public(self.peer_public)

    def _fields(self) -> list:
        return [VERSION, bytes(self.peer_public), sorted(self.roles), float(self.issued),
                float(self.expires), int(self.serial), bytes(self.authority)]

    def signed_bytes(self) -> bytes:
        return CONTEXT + msgpack.packb(self._fields(), use_bin_type=True)

    def encode(self) -> bytes:
        return msgpack.packb(self._fields() + [bytes(self.signature)], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Credential":
        """Parse a credential; :class:`ProtocolError` on anything malformed (the signature is
        checked by :meth:`check`, not here)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"credential must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_CREDENTIAL_BYTES:
            raise ProtocolError(f"credential is {len(data)} bytes, limit {MAX_CREDENTIAL_BYTES}")
        try:
            fields = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                                     max_array_len=_FIELDS, max_map_len=0, max_ext_len=0)
        except Exception as e:  # msgpack raises many types (ValueError, ExtraData, StackError, ...)
            raise ProtocolError(f"undecodable credential: {type(e).__name__}: {e}") from e
        if not isinstance(fields, list) or len(fields) != _FIELDS:
            raise ProtocolError(f"credential must be a msgpack array of {_FIELDS} fields")
        version, peer_public, roles, issued, expires, serial, authority, signature = fields
        if version != VERSION or type(version) is not int:
            raise ProtocolError(f"unsupported credential version {version!r} (this peer reads {VERSION})")
        _check_bytes("peer key", peer_public, PUBLIC_KEY_BYTES)
        _check_bytes("authority key", authority, PUBLIC_KEY_BYTES)
        _check_bytes("signature", signature, SIGNATURE_BYTES)
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ProtocolError("credential roles must be a list of strings")
        if unknown := set(roles) - ROLES:
            raise ProtocolError(f"credential names unknown roles {sorted(unknown)!r}")
        if roles != sorted(set(roles)):
            raise ProtocolError("credential roles are not sorted and unique (non-canonical encoding)")
        for name, t in (("issued", issued), ("expires", expires)):
            if type(t) is not float or not math.isfinite(t):  # float64 only: the canonical form
                raise ProtocolError(f"credential {name} time must be a finite float, got {t!r}")
        if expires < issued:
            raise ProtocolError(f"credential expires ({expires}) before it was issued ({issued})")
        if type(serial) is not int or not 0 <= serial <= _MAX_SERIAL:
            raise ProtocolError(f"credential serial must be an integer in 0..2^63-1, got {serial!r}")
        cred = cls(peer_public, frozenset(roles), issued, expires, serial, authority, signature)
        if cred.encode() != data:  # e.g. a float32 or a wider int type than needed
            raise ProtocolError("credential is not canonically encoded")
        return cred

    def check(self, *, authority: bytes, peer_public: bytes, now: float,
              revoked: Callable[[str], bool] | None = None) -> None:
        """Raise :class:`AuthError` unless this credential is valid for ``peer_public`` right now,
        signed by the pinned ``authority`` and not revoked."""
        if bytes(self.authority) != bytes(authority):
            raise AuthError(f"credential of peer {self.peer_id} was issued by another coordinator "
                            f"(authority {bytes(self.authority).hex()[:16]}..., expected "
                            f"{bytes(authority).hex()[:16]}...)")
        if not verify_signature(self.authority, self.signature, self.signed_bytes()):
            raise AuthError(f"credential of peer {self.peer_id}: signature invalid (forged or altered)")
        if bytes(self.peer_public) != bytes(peer_public):
            raise AuthError(f"credential is bound to another key: it names peer {self.peer_id}, "
                            f"presented by peer {peer_id_from_public(peer_public)}")
        if now >= self.expires:
            raise AuthError(f"credential of peer {self.peer_id} expired {now - self.expires:.0f}s ago "
                            "(ask the coordinator for a new one)")
        if self.issued > now + MAX_CLOCK_SKEW_S:
            raise AuthError(f"credential of peer {self.peer_id} is not yet valid: issued "
                            f"{self.issued - now:.0f}s in the future (clock skew?)")
        if revoked is not None and revoked(self.peer_id):
            raise AuthError(f"credential of peer {self.peer_id} was revoked")

    def has(self, role: str) -> bool:
        return role in self.roles


def issue(authority: Identity, peer_public: bytes, roles: Iterable[str], *, now: float,
          lifetime_s: float, serial: int) -> Credential:
    """Sign a credential for ``peer_public``; ValueError on an unknown role or a bad argument."""
    roles = frozenset(roles)
    if unknown := roles - ROLES:
        raise ValueError(f"unknown roles {sorted(unknown)!r}; known: {sorted(ROLES)!r}")
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise ValueError(f"peer public key must be {PUBLIC_KEY_BYTES} bytes, got {len(peer_public)}")
    if not (math.isfinite(now) and math.isfinite(lifetime_s) and lifetime_s > 0):
        raise ValueError(f"need a finite time and a positive lifetime, got now={now!r} lifetime_s={lifetime_s!r}")
    if not 0 <= serial <= _MAX_SERIAL:
        raise ValueError(f"serial must be in 0..2^63-1, got {serial}")
    unsigned = Credential(bytes(peer_public), roles, float(now), float(now + lifetime_s), int(serial),
                          authority.public_bytes, b"")
    return replace(unsigned, signature=authority.sign(unsigned.signed_bytes()))


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"credential {name} must be {size} bytes")
