"""Long-term peer identity: an Ed25519 key pair kept in a 0600 key file.

peer id = first 20 bytes of sha256(raw public key), as 40 hex characters.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def peer_id_from_public(public_bytes: bytes) -> str:
    """Peer id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(bytes(public_bytes)).digest()[:20].hex()


def verify_signature(public_bytes: bytes, sig: bytes, data: bytes) -> bool:
    """True iff ``sig`` is a valid Ed25519 signature of ``data`` by ``public_bytes``."""
    if len(public_bytes) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_bytes)).verify(bytes(sig), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 private key plus its derived public bytes and peer id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peer_id: str = peer_id_from_public(self.public_bytes)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "Identity":
        if len(raw) != 32:
            raise ValueError(f"Ed25519 private key must be 32 bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "Identity":
        """Load the key at ``path``; on first run create it (parent dirs too) with mode 0600."""
        p = Path(path).expanduser()
        if p.exists():
            return cls.from_private_bytes(_read_key_file(p))
        p.parent.mkdir(parents=True, exist_ok=True)
        ident = cls.generate()
        # O_EXCL + mode at creation: the secret is never readable by others, not even briefly;
        # if another process won the race, load its key instead.
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        except FileExistsError:
            return cls.from_private_bytes(_read_key_file(p))
        with os.fdopen(fd, "wb") as f:
            f.write(ident.private_bytes())
        return ident

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id})"


def _read_key_file(p: Path) -> bytes:
    raw = p.read_bytes()
    if len(raw) != 32:
        raise ValueError(f"key file {p} is corrupt: expected 32 raw bytes, found {len(raw)}")
    return raw
