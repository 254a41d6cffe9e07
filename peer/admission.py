"""The admission exchange (contract C3), one schema shared by the coordinator and its clients.

A new key asks ``POST /api/admit`` (signed by that key, ``X-Lowband-Key`` sent: peer/reqsign.py)
with one of three proofs, each bound to the key so it cannot be replayed for another one:

- invite: ``{"invite": id, "proof": HMAC-SHA256(invite_secret, ADMIT_CONTEXT + public_key)}``
- token (closed swarm): ``{"token_proof": HMAC-SHA256(token_key(token), ADMIT_CONTEXT + public_key)}``
- open swarm (``coordinator start --open``): ``{}``; an already admitted key also sends ``{}``
  to renew its credential.

The answer carries the credential (peer/credentials.py) and, in token mode, ``token_mac`` =
HMAC-SHA256(token_key(token), TOKEN_MAC_CONTEXT + authority + credential): proof that the
coordinator knows the token too, so a token-mode peer cannot be admitted by an impostor.

The token is never sent, only keyed MACs; ``token_key`` stretches it through HKDF-SHA256 so the
MAC key is not the token itself (tokens are checked for >= 128 bits of entropy elsewhere:
peer/tokens.py, so HKDF without a slow KDF is enough).
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peer.credentials import Credential
from peer.errors import ProtocolError

ADMIT_PATH = "/api/admit"
ADMIT_CONTEXT = b"lowband-admit/v1\n"
TOKEN_MAC_CONTEXT = b"lowband-admit-token-mac/v1\n"
OPEN_ROLES = frozenset({"train", "serve", "client"})  # what --open and token admission grant
_TOKEN_KDF_INFO = b"lowband-admit-token/v1"
_HEX_MAC = re.compile(r"^[0-9a-f]{64}$")
_INVITE_ID = re.compile(r"^[0-9a-f]{16}$")


def token_key(token: str | bytes) -> bytes:
    """The 32-byte MAC key derived from a swarm token (HKDF-SHA256, no salt, fixed info)."""
    raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_TOKEN_KDF_INFO).derive(raw)


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, sha256).hexdigest()


def invite_proof(invite_secret: bytes, public_key: bytes) -> str:
    return _mac(invite_secret, ADMIT_CONTEXT + bytes(public_key))


def token_proof(token: str | bytes, public_key: bytes) -> str:
    return _mac(token_key(token), ADMIT_CONTEXT + bytes(public_key))


def token_mac(token: str | bytes, authority: bytes, credential: bytes) -> str:
    return _mac(token_key(token), TOKEN_MAC_CONTEXT + bytes(authority) + bytes(credential))


def macs_equal(given: str, expected: str) -> bool:
    """Constant-time comparison of two hex MACs."""
    return hmac.compare_digest(given.encode("ascii", "replace"), expected.encode("ascii"))


@dataclass(frozen=True)
class AdmitRequest:
    """The body of ``POST /api/admit``: an invite proof, a token proof, or neither."""

    invite: str | None = None
    proof: str | None = None
    token_proof: str | None = None

    def to_json(self) -> dict:
        if self.invite is not None:
            return {"invite": self.invite, "proof": self.proof}
        if self.token_proof is not None:
            return {"token_proof": self.token_proof}
        return {}

    @classmethod
    def from_json(cls, doc: object) -> "AdmitRequest":
        """ProtocolError (with the reason) on anything but one of the three body shapes."""
        if not isinstance(doc, dict):
            raise ProtocolError("admit body must be a JSON object")
        keys = set(doc)
        if keys == {"invite", "proof"}:
            invite, proof = doc["invite"], doc["proof"]
            if not isinstance(invite, str) or not _INVITE_ID.match(invite):
                raise ProtocolError("field 'invite' must be a 16-hex invite id")
            if not isinstance(proof, str) or not _HEX_MAC.match(proof):
                raise ProtocolError("field 'proof' must be a 64-hex HMAC")
            return cls(invite=invite, proof=proof)
        if keys == {"token_proof"}:
            tp = doc["token_proof"]
            if not isinstance(tp, str) or not _HEX_MAC.match(tp):
                raise ProtocolError("field 'token_proof' must be a 64-hex HMAC")
            return cls(token_proof=tp)
        if not keys:
            return cls()
        raise ProtocolError("admit body must be {'invite', 'proof'}, {'token_proof'} or {} "
                            f"(got fields {sorted(keys)[:8]})")


@dataclass(frozen=True)
class AdmitAnswer:
    """The coordinator's answer to an admission: the credential and what it grants."""

    credential: Credential
    token_mac: str | None = None

    def to_json(self) -> dict:
        c = self.credential
        doc = {"credential": c.encode().hex(), "authority": c.authority.hex(),
               "roles": sorted(c.roles), "expires": c.expires}
        if self.token_mac is not None:
            doc["token_mac"] = self.token_mac
        return doc

    @classmethod
    def from_json(cls, doc: object) -> "AdmitAnswer":
        """ProtocolError on a malformed answer; the caller still checks the credential against
        its pinned authority and own key (``Credential.check``)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("credential"), str):
            raise ProtocolError("admit answer lacks a credential")
        try:
            raw = bytes.fromhex(doc["credential"])
        except ValueError:
            raise ProtocolError("admit answer: credential is not hex") from None
        cred = Credential.decode(raw)
        if doc.get("authority") != cred.authority.hex() or doc.get("roles") != sorted(cred.roles):
            raise ProtocolError("admit answer: authority or roles disagree with the credential")
        mac = doc.get("token_mac")
        if mac is not None and (not isinstance(mac, str) or not _HEX_MAC.match(mac)):
            raise ProtocolError("admit answer: token_mac must be a 64-hex HMAC")
        return cls(cred, mac)
