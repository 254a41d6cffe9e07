"""Join strings: everything a new peer needs to be admitted, in one pasteable line (contract C3).

``lowband1:`` + base64url (no padding) of the canonical JSON object
``{"u": coordinator URL, "a": authority public key hex, "f": TLS cert sha256 hex | null,
"i": invite id | null, "s": invite secret hex | null}``.

The authority key pins who may issue credentials (mesh handshakes check them against it), the
fingerprint pins the coordinator's TLS certificate (a self-signed one needs no CA), and the
invite id and secret prove the right to be admitted once (``POST /api/admit``). A join string
without an invite serves an open swarm (``--open``) or a closed one whose members hold the token.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from peer.errors import ProtocolError

PREFIX = "lowband1:"
MAX_JOIN_STRING = 2048
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INVITE_ID = re.compile(r"^[0-9a-f]{16}$")
_URL = re.compile(r"^https?://[^\s/?#]{1,300}(/[^\s?#]{0,300})?$")


@dataclass(frozen=True)
class JoinString:
    url: str
    authority: bytes                # 32-byte Ed25519 public key of the coordinator
    fingerprint: str | None = None  # sha256 hex of the coordinator's TLS certificate (DER)
    invite_id: str | None = None    # 16 hex
    invite_secret: bytes | None = None  # 32 bytes

    def __post_init__(self) -> None:
        if not _URL.match(self.url):
            raise ValueError(f"join string URL must be http(s)://host[:port][/path], got {self.url!r}")
        if len(self.authority) != 32:
            raise ValueError("authority key must be 32 bytes")
        if self.fingerprint is not None and not _HEX64.match(self.fingerprint):
            raise ValueError("TLS fingerprint must be 64 lowercase hex characters (sha256)")
        if (self.invite_id is None) != (self.invite_secret is None):
            raise ValueError("an invite needs both its id and its secret")
        if self.invite_id is not None and not _INVITE_ID.match(self.invite_id):
            raise ValueError("invite id must be 16 lowercase hex characters")
        if self.invite_secret is not None and len(self.invite_secret) != 32:
            raise ValueError("invite secret must be 32 bytes")

    def encode(self) -> str:
        doc = {"u": self.url, "a": self.authority.hex(), "f": self.fingerprint,
               "i": self.invite_id,
               "s": None if self.invite_secret is None else self.invite_secret.hex()}
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")
        return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> "JoinString":
        """Parse a join string; ProtocolError with the reason on anything malformed."""
        if not isinstance(text, str):
            raise ProtocolError("join string must be text")
        text = text.strip()
        if len(text) > MAX_JOIN_STRING:
            raise ProtocolError(f"join string longer than {MAX_JOIN_STRING} characters")
        if not text.startswith(PREFIX):
            raise ProtocolError(f"not a join string (expected it to start with {PREFIX!r}; "
                                "get one with `coordinator invite`)")
        body = text[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            doc = json.loads(raw.decode("utf-8"))
        except (binascii.Error, ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"join string is corrupt (copy it again in full): {e}") from None
        if not isinstance(doc, dict) or set(doc) != {"u", "a", "f", "i", "s"}:
            raise ProtocolError("join string has the wrong fields (made by another version?)")
        u, a, f, i, s = (doc[k] for k in ("u", "a", "f", "i", "s"))
        if not isinstance(u, str) or not isinstance(a, str) or not _HEX64.match(a):
            raise ProtocolError("join string: bad coordinator URL or authority key")
        if any(v is not None and not isinstance(v, str) for v in (f, i, s)):
            raise ProtocolError("join string: fingerprint, invite id and secret must be text or null")
        if s is not None and not _HEX64.match(s):
            raise ProtocolError("join string: invite secret must be 64 hex characters")
        try:
            return cls(u, bytes.fromhex(a), f, i, None if s is None else bytes.fromhex(s))
        except ValueError as e:
            raise ProtocolError(f"join string: {e}") from None
