"""Client side of admission (docs/security.md): how a peer or client gets, keeps and trusts the
credential the coordinator issues for its key. Sans-IO and cheap to import (no asyncio, aiohttp);
peer/membership.py does the HTTP.

- **What a newcomer shows** (``Admission``): a join string (an invite: id + secret, or an open
  swarm's string: URL, authority key, TLS fingerprint), the closed swarm's token, or nothing (a
  coordinator started with ``--open``). ``admit_request`` turns it into the body of
  ``POST /api/admit`` (peer/admission.py): an HMAC proof bound to the new public key, never the
  secret itself; an admitted key renews with an empty body.
- **What it trusts** (``accept_answer``): the answered credential must decode, name this key, be
  signed by the authority the join string pins (or, in token mode, an authority whose
  ``token_mac`` proves the coordinator knows the token; with neither, the first answer is
  trusted: open admission over a pinned or loopback connection).
- **Where it keeps it** (``CredentialCache``): ``<key file>.cred`` (mode 0600), JSON with the
  coordinator URL, so a restart reuses it until it nears expiry (``needs_renewal``).
- **How it connects** (``check_url``): ``http://`` only to a loopback host unless the user said
  ``--insecure``; ``https://`` with the join string's certificate fingerprint pinned.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from peer.admission import AdmitAnswer, AdmitRequest, invite_proof, macs_equal, token_mac, token_proof
from peer.credentials import Credential
from peer.errors import AuthError, LowbandError, ProtocolError
from peer.identity import Identity
from peer.joinstring import JoinString

CACHE_SUFFIX = ".cred"
CACHE_VERSION = 1
# Renew a credential once less than this share of its lifetime is left (and at most a day before).
RENEW_FRACTION = 0.25
RENEW_AT_MOST_S = 86400.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AdmissionError(LowbandError):
    """Admission is impossible as configured, or the coordinator's answer cannot be trusted."""


class InsecureCoordinatorURL(AdmissionError):
    """``http://`` to a host that is not loopback, without ``--insecure``."""


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal; names are not resolved (nothing is sent)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, insecure: bool = False) -> str:
    """The coordinator URL without a trailing slash; refuses anything but http(s)://HOST[:PORT],
    and plain http to a non-loopback host unless ``insecure``, before any connection is made."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise AdmissionError(f"coordinator URL {url!r} must look like https://HOST:PORT")
    try:
        parsed.port
    except ValueError:
        raise AdmissionError(f"coordinator URL {url!r} has an invalid port") from None
    if parsed.scheme == "http" and not insecure and not is_loopback_host(parsed.hostname):
        raise InsecureCoordinatorURL(
            f"refusing plain http:// to {parsed.hostname}: coordinator answers would travel "
            "unauthenticated and in clear. Use https:// (a join string pins the coordinator's "
            "certificate), or pass --insecure on a network you trust")
    return url.rstrip("/")


def check_fingerprint(fingerprint: str | None) -> bytes | None:
    """A sha256 certificate fingerprint as 32 bytes (hex, ':' separators allowed), or None."""
    if fingerprint is None:
        return None
    text = fingerprint.replace(":", "").lower()
    if not _HEX64.match(text):
        raise AdmissionError(f"TLS fingerprint must be 64 hex digits (sha256), got {fingerprint!r}")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class Admission:
    """What this peer shows to be admitted, and how it reaches the coordinator.

    ``join``: a parsed join string (its URL, pinned authority and fingerprint; an invite's id and
    secret when it carries one). ``token``: the closed swarm's token. Neither: open admission.
    ``url`` overrides the join string's URL (e.g. another address of the same coordinator)."""

    url: str
    join: JoinString | None = None
    token: str | None = None
    insecure: bool = False

    @classmethod
    def make(cls, *, url: str | None = None, join: JoinString | str | None = None,
             token: str | None = None, insecure: bool = False) -> "Admission":
        if isinstance(join, str):
            try:
                join = JoinString.decode(join)
            except ProtocolError as e:
                raise AdmissionError(f"invalid join string: {e}") from e
        url = url or (join.url if join is not None else None)
        if not url:
            raise AdmissionError("no coordinator: give --coordinator URL or --join STRING")
        return cls(check_url(url, insecure=insecure), join, token or None, insecure)

    @property
    def fingerprint(self) -> bytes | None:
        return check_fingerprint(self.join.fingerprint) if self.join is not None else None

    @property
    def authority(self) -> bytes | None:
        """The coordinator key the join string pins (None: learnt from the first answer)."""
        return self.join.authority if self.join is not None else None

    @property
    def mode(self) -> str:
        if self.join is not None and self.join.invite_id is not None:
            return "invite"
        return "token" if self.token else "open"


def admit_request(admission: Admission, public_key: bytes, *, renew: bool = False) -> AdmitRequest:
    """What to send to ``POST /api/admit`` (peer/admission.py): a proof bound to ``public_key``,
    never a secret; ``renew``: nothing, as an admitted key renews its credential."""
    if renew or admission.mode == "open":
        return AdmitRequest()
    if admission.mode == "invite":
        join = admission.join
        return AdmitRequest(invite=join.invite_id, proof=invite_proof(join.invite_secret, public_key))
    return AdmitRequest(token_proof=token_proof(admission.token, public_key))


def accept_answer(admission: Admission, identity: Identity, request: AdmitRequest, answer: dict,
                  *, known_authority: bytes | None = None, now: float | None = None) -> Credential:
    """The credential of an admit answer, once it is proven to be ours and from the right
    coordinator: the authority the join string pins, else the one of our previous credential
    (``known_authority``), else -- answering a token proof -- one whose ``token_mac`` shows the
    coordinator knows the token; with none of these (open admission) the first answer is
    trusted. :class:`AdmissionError` saying why otherwise."""
    now = time.time() if now is None else now
    try:
        cred = AdmitAnswer.from_json(answer).credential
    except ProtocolError as e:
        raise AdmissionError(f"coordinator sent a malformed admission answer: {e}") from e
    pinned = admission.authority or known_authority
    if pinned is not None and cred.authority != pinned:
        raise AdmissionError("the coordinator's authority key differs from the one "
                             + ("in the join string" if admission.authority else "it admitted this "
                                "peer with") + ": another server answers at this address")
    if request.token_proof is not None:
        mac = answer.get("token_mac")
        if not isinstance(mac, str) or not macs_equal(mac, token_mac(admission.token, cred.authority,
                                                                     cred.encode())):
            raise AdmissionError("the coordinator did not prove it knows the swarm token "
                                 "(token_mac missing or wrong): another server answers at this address")
    try:
        cred.check(authority=cred.authority, peer_public=identity.public_bytes, now=now)
    except AuthError as e:
        raise AdmissionError(f"coordinator issued an unusable credential: {e}") from e
    return cred


def needs_renewal(cred: Credential, now: float | None = None) -> bool:
    """True once less than RENEW_FRACTION of the lifetime (at most a day) is left."""
    now = time.time() if now is None else now
    margin = min(RENEW_AT_MOST_S, RENEW_FRACTION * (cred.expires - cred.issued))
    return now >= cred.expires - margin


class CredentialCache:
    """``<key>.cred``: the last credential of this key, per coordinator URL (0600, JSON)."""

    def __init__(self, key_path: str | os.PathLike) -> None:
        self.path = Path(str(Path(key_path).expanduser()) + CACHE_SUFFIX)

    def load(self, admission: Admission, identity: Identity, *,
             now: float | None = None) -> Credential | None:
        """The cached credential if it still fits: same coordinator, this key, the pinned
        authority and valid (maybe due for renewal). A stale or damaged file is ignored."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != CACHE_VERSION or data.get("coordinator") != admission.url:
                return None
            cred = Credential.decode(bytes.fromhex(data["credential"]))
            pinned = admission.authority or cred.authority
            cred.check(authority=pinned, peer_public=identity.public_bytes,
                       now=time.time() if now is None else now)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LowbandError):
            return None
        return cred

    def read(self) -> Credential | None:
        """The cached credential as stored, unchecked (None: no readable cache)."""
        try:
            return Credential.decode(bytes.fromhex(json.loads(self.path.read_text())["credential"]))
        except (OSError, ValueError, KeyError, TypeError, LowbandError):
            return None

    def save(self, admission: Admission, cred: Credential) -> None:
        """Write atomically with mode 0600 from creation (it names this key's rights)."""
        payload = json.dumps({"version": CACHE_VERSION, "coordinator": admission.url,
                              "credential": cred.encode().hex()}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def fingerprint_of(der_cert: bytes) -> bytes:
    """sha256 of a DER certificate, as aiohttp.Fingerprint and join strings use it."""
    return hashlib.sha256(der_cert).digest()
