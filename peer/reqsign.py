"""Signed coordinator requests (contract C2): every /api request from a peer or client is signed
with the sender's Ed25519 key over what it asks for, so no bearer secret ever travels and a
captured request cannot be replayed or retargeted.

Headers (all ASCII):

- ``X-Lowband-Peer``: 40-hex peer id of the signer
- ``X-Lowband-Time``: unix seconds, decimal
- ``X-Lowband-Nonce``: 32 hex characters (16 random bytes), fresh per request
- ``X-Lowband-Body``: sha256 hex of the exact body bytes (``sha256(b"")`` without a body)
- ``X-Lowband-Key``: 64-hex public key, only on ``POST /api/admit`` (the key is not known yet)
- ``X-Lowband-Signature``: 128-hex Ed25519 signature over :func:`signing_bytes`:
  ``b"lowband-request/v2\\n" + method + "\\n" + path_qs + "\\n" + body_sha + "\\n" + peer + "\\n"
  + time + "\\n" + nonce`` (header strings as sent; path_qs is the raw request target).

The signature covers method, path with query, body hash, signer, time and nonce, so altering any
of them breaks it. The verifier checks the clock window (``max_skew_s``) and remembers every nonce
inside that window (:class:`ReplayGuard`), so each signed request is accepted at most once. The
body hash is checked by whoever reads the body (streamed uploads included), not here.

Sans-IO: no sockets, no asyncio; both the coordinator and its clients import this module.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from peer.errors import AuthError
from peer.identity import Identity, peer_id_from_public, verify_signature

CONTEXT = b"lowband-request/v2\n"
H_PEER = "X-Lowband-Peer"
H_TIME = "X-Lowband-Time"
H_NONCE = "X-Lowband-Nonce"
H_BODY = "X-Lowband-Body"
H_KEY = "X-Lowband-Key"
H_SIG = "X-Lowband-Signature"
SIGNED_HEADERS = (H_PEER, H_TIME, H_NONCE, H_BODY, H_SIG)
EMPTY_BODY_SHA = hashlib.sha256(b"").hexdigest()
DEFAULT_MAX_SKEW_S = 60.0
MAX_PATH_BYTES = 8192

_PEER_RE = re.compile(r"^[0-9a-f]{40}$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SIG_RE = re.compile(r"^[0-9a-f]{128}$")
_TIME_RE = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")
_METHOD_RE = re.compile(r"^[A-Z]{1,16}$")


class RequestAuthError(AuthError):
    """A signed request is missing, malformed, forged, stale or replayed. ``code`` is a short
    machine-readable reason (the coordinator's JSON ``error``); ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def body_sha(body: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(body).hexdigest()


def signing_bytes(method: str, path_qs: str, body_hash: str, peer: str, timestamp: str,
                  nonce: str) -> bytes:
    """The exact bytes an Ed25519 request signature covers."""
    return CONTEXT + "\n".join((method, path_qs, body_hash, peer, timestamp, nonce)).encode(
        "utf-8", "surrogateescape")


def sign_headers(identity: Identity, method: str, path_qs: str, body: bytes = b"", *,
                 with_key: bool = False, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate ``method path_qs`` with ``body`` as ``identity``.
    ``with_key``: add ``X-Lowband-Key`` (``POST /api/admit`` only)."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = os.urandom(16).hex()
    digest = body_sha(body)
    method = method.upper()
    sig = identity.sign(signing_bytes(method, path_qs, digest, identity.peer_id, timestamp, nonce))
    headers = {H_PEER: identity.peer_id, H_TIME: timestamp, H_NONCE: nonce, H_BODY: digest,
               H_SIG: sig.hex()}
    if with_key:
        headers[H_KEY] = identity.public_bytes.hex()
    return headers


@dataclass(frozen=True)
class SignedRequest:
    """The parsed, well-formed (not yet verified) authentication headers of one request."""

    peer_id: str
    timestamp: float
    time_text: str
    nonce: str
    body_sha: str
    signature: bytes
    public_key: bytes | None  # from X-Lowband-Key, when sent

    def verify(self, public_key: bytes, method: str, path_qs: str, *, now: float,
               max_skew_s: float = DEFAULT_MAX_SKEW_S) -> None:
        """Check key binding, clock window and signature; RequestAuthError otherwise. Replays
        are the caller's :class:`ReplayGuard`'s business (it must run after this check)."""
        if peer_id_from_public(public_key) != self.peer_id:
            raise RequestAuthError("peer_id_mismatch", f"{H_PEER} is not the hash of the signing key",
                                   403)
        skew = self.timestamp - now
        if abs(skew) > max_skew_s:
            raise RequestAuthError("clock_skew", f"request time is {skew:+.0f}s off the "
                                   f"coordinator clock (limit ±{max_skew_s:.0f}s); fix the clock")
        if not _METHOD_RE.match(method) or len(path_qs.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise RequestAuthError("bad_request_target", "method or path not signable", 400)
        data = signing_bytes(method, path_qs, self.body_sha, self.peer_id, self.time_text, self.nonce)
        if not verify_signature(public_key, self.signature, data):
            raise RequestAuthError("bad_signature", "request signature does not verify (signed "
                                   "over method, path with query, body hash, peer, time, nonce)",
                                   403)


def _header(headers: Mapping[str, str], name: str, pattern: re.Pattern) -> str:
    value = headers.get(name)
    if value is None:
        raise RequestAuthError("missing_signature", f"missing header {name}: sign every request "
                               "(peer/reqsign.py); bearer tokens are not accepted")
    if not pattern.match(value):
        raise RequestAuthError("malformed_signature", f"header {name} has an invalid format", 400)
    return value


def has_signature(headers: Mapping[str, str]) -> bool:
    return any(h in headers for h in SIGNED_HEADERS)


def parse_headers(headers: Mapping[str, str]) -> SignedRequest:
    """The authentication headers, format-checked; RequestAuthError on anything missing or bad."""
    key = headers.get(H_KEY)
    if key is not None and not _SHA_RE.match(key):  # 64 hex, same shape as a sha256
        raise RequestAuthError("malformed_signature", f"header {H_KEY} must be 64 hex characters", 400)
    time_text = _header(headers, H_TIME, _TIME_RE)
    return SignedRequest(peer_id=_header(headers, H_PEER, _PEER_RE), timestamp=float(time_text),
                         time_text=time_text, nonce=_header(headers, H_NONCE, _NONCE_RE),
                         body_sha=_header(headers, H_BODY, _SHA_RE),
                         signature=bytes.fromhex(_header(headers, H_SIG, _SIG_RE)),
                         public_key=None if key is None else bytes.fromhex(key))


class ReplayGuard:
    """Accepts each (peer, nonce) once inside the clock window, with bounded memory.

    Remembers every nonce whose timestamp is inside ±``max_skew_s`` of now; older ones are
    forgotten because the window check refuses their requests anyway. At most ``max_entries``
    nonces are kept: when full, the oldest is forgotten and its timestamp becomes a floor below
    which requests are refused (``replay_window_full``), so forgetting never re-opens a replay.
    Honest clients sign with the current time and stay above the floor unless the guard sees
    more than ``max_entries`` requests per window.
    """

    def __init__(self, max_skew_s: float = DEFAULT_MAX_SKEW_S, *, max_entries: int = 1 << 18) -> None:
        if max_skew_s <= 0 or max_entries < 1:
            raise ValueError("max_skew_s must be > 0 and max_entries >= 1")
        self.max_skew_s = float(max_skew_s)
        self.max_entries = max_entries
        self._seen: set[tuple[str, str]] = set()
        self._heap: list[tuple[float, str, str]] = []  # (timestamp, peer, nonce), oldest first
        self.floor = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, peer_id: str, nonce: str, timestamp: float, now: float) -> None:
        """Record the request; RequestAuthError if stale, from the future, or seen before."""
        if abs(timestamp - now) > self.max_skew_s:
            raise RequestAuthError("clock_skew", f"request time is {timestamp - now:+.0f}s off "
                                   f"(limit ±{self.max_skew_s:.0f}s); fix the clock")
        while self._heap and self._heap[0][0] < now - self.max_skew_s:
            _, p, n = heapq.heappop(self._heap)
            self._seen.discard((p, n))
        if timestamp <= self.floor:
            raise RequestAuthError("replay_window_full", "request too old for the replay window "
                                   "under the current load; send it again", 429)
        key = (peer_id, nonce)
        if key in self._seen:
            raise RequestAuthError("replayed", "this signed request was seen before (nonce "
                                   "reused); sign every request afresh", 403)
        self._seen.add(key)
        heapq.heappush(self._heap, (timestamp, peer_id, nonce))
        while len(self._heap) > self.max_entries:
            ts, p, n = heapq.heappop(self._heap)
            self._seen.discard((p, n))
            self.floor = max(self.floor, ts)


def verify_headers(headers: Mapping[str, str], method: str, path_qs: str,
                   public_key_lookup: Callable[[str], bytes | None], *, now: float,
                   max_skew_s: float = DEFAULT_MAX_SKEW_S,
                   guard: ReplayGuard | None = None) -> str:
    """Parse and verify a signed request -> the signer's peer id. The key comes from
    ``X-Lowband-Key`` when sent, else ``public_key_lookup(peer_id)`` (None: unknown signer,
    403 ``unknown_identity``). ``guard``: refuse replays too."""
    req = parse_headers(headers)
    key = req.public_key if req.public_key is not None else public_key_lookup(req.peer_id)
    if key is None:
        raise RequestAuthError("unknown_identity", f"identity {req.peer_id} is not admitted; "
                               "redeem a join string first (POST /api/admit)", 403)
    req.verify(key, method, path_qs, now=now, max_skew_s=max_skew_s)
    if guard is not None:
        guard.check(req.peer_id, req.nonce, req.timestamp, now)
    return req.peer_id
