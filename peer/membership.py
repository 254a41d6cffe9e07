"""Async HTTP client of the coordinator's API on behalf of one identity (docs/security.md).

Every request is signed with the peer's Ed25519 key in headers (peer/reqsign.py: method, raw
path with query, body hash, time, nonce), so no bearer secret travels and a captured request
cannot be replayed or retargeted. Before its first signed request a new key is admitted
(``admit``: an invite, the closed swarm's token proof, or open admission; peer/access.py), which
also yields the credential the mesh handshake shows. A coordinator that no longer knows the key
(a wiped database) answers ``unknown_identity`` and the client admits again, once per request.

Transport rules (peer/access.py ``check_url``): ``https://`` with the join string's certificate
fingerprint pinned (``aiohttp.Fingerprint``), or ``http://`` to a loopback host; plain http to
anything else only with ``insecure``.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from peer.access import (Admission, AdmissionError, CredentialCache, accept_answer, admit_request,
                         fingerprint_of, needs_renewal)
from peer.credentials import Credential
from peer.errors import LowbandError
from peer.identity import Identity
from peer.joinstring import JoinString
from peer.reqsign import sign_headers

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("lowband.peer.membership")

API_PREFIX = "/api"
ADMIT = "/admit"
# Error codes the coordinator uses when a heartbeat/leave names a peer it no longer counts.
NOT_REGISTERED_CODES = frozenset({"unknown_peer", "peer_dead", "peer_left"})
# 403 codes that mean "this key, signature or admission proof is refused" (coordinator/auth.py).
AUTH_CODES = frozenset({"bad_signature", "peer_id_mismatch", "replayed", "forbidden", "bad_invite",
                        "invite_used", "invite_expired", "invite_revoked", "bad_token_proof",
                        "no_token_mode"})
C = TypeVar("C", bound="CoordinatorClient")


class CoordinatorError(LowbandError):
    """The coordinator answered with an error; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class CoordinatorAuthError(CoordinatorError):
    """The coordinator refused this identity's signature or admission (HTTP 401/403)."""


class NotAdmitted(CoordinatorAuthError):
    """The coordinator does not know this key (403 ``unknown_identity``, or ``not_admitted``
    answering a renewal): admit with a proof first."""


class Revoked(CoordinatorAuthError):
    """The coordinator revoked this identity (403 ``revoked``): a new invite is needed."""


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator could not be reached or did not answer in time."""


class NotRegistered(CoordinatorError):
    """The coordinator does not (or no longer) count this peer as a member: join again."""


class PeerBanned(CoordinatorError):
    """The coordinator banned this peer id (HTTP 403 ``peer_banned``): asking again is futile."""


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, ASCII only, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


@dataclass
class PeerInfo:
    """One row of the membership table as the coordinator reports it."""

    peer_id: str
    address: str | None = None  # None in the public view (only operators see addresses)
    state: str = "unknown"
    roles: list[str] = field(default_factory=list)
    device: str | None = None
    memory: int | None = None
    throughput: float | None = None
    last_heartbeat: float | None = None
    heartbeat_age_s: float | None = None
    joined_at: float | None = None
    state_since: float | None = None
    incarnation: int | None = None
    # The coordinator dialled the address back (None: not probed yet). Peers and clients dial
    # only verified addresses, so a joiner cannot aim the swarm at a third party.
    reachable: bool | None = None
    observed: str | None = None
    relays: list = field(default_factory=list)  # relays it reserved at (peer.reach.Reach)
    meta: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def dialable(self) -> bool:
        return self.reachable is True and self.address is not None

    @classmethod
    def from_dict(cls, d: dict) -> "PeerInfo":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class CoordinatorClient:
    """Talks to one coordinator on behalf of one identity.

    ``url``, ``token`` (closed swarm), ``join`` (a join string) and ``insecure`` say how it is
    admitted and connects (peer/access.py ``Admission``; ``access`` passes one ready-made);
    ``cache``: where the credential is kept between runs (``<key>.cred``). Use as
    ``async with CoordinatorClient(url, token, identity) as c:`` or call :meth:`close`; a client
    of the same coordinator and identity is :meth:`derive`d from it. Network failures raise
    :class:`CoordinatorUnavailable`; a refused identity :class:`CoordinatorAuthError`
    (:class:`Revoked`, :class:`NotAdmitted`); a heartbeat for an unknown/dead peer
    :class:`NotRegistered`. A client without identity reads the public status only.
    """

    def __init__(self, url: str | None, token: str | bytes | None = None,
                 identity: Identity | None = None, *, timeout: float = 10.0,
                 join: JoinString | str | None = None, insecure: bool = False,
                 access: Admission | None = None, cache: CredentialCache | None = None,
                 credential: Credential | None = None) -> None:
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        try:
            self.access = access or Admission.make(url=url, join=join, token=token, insecure=insecure)
        except AdmissionError as e:
            raise CoordinatorError(str(e), code="bad_coordinator") from e
        self.url = self.access.url
        self._prefix = urlparse(self.url).path + API_PREFIX  # a coordinator under a path prefix
        self.identity = identity
        self.timeout = timeout
        self.cache = cache
        self.credential = credential
        self._session: aiohttp.ClientSession | None = None
        self._admitting: asyncio.Lock | None = None

    def derive(self, cls: type[C] | None = None, **kwargs: Any) -> C:
        """A new client (``cls``, default this class) of the same coordinator, identity and
        credential, with its own HTTP session (``kwargs``: e.g. ``timeout``)."""
        kwargs.setdefault("timeout", self.timeout)
        return (cls or type(self))(None, None, self.identity, access=self.access, cache=self.cache,
                                   credential=self.credential, **kwargs)

    async def __aenter__(self: C) -> C:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- admission -------------------------------------------------------------------------
    async def admit(self, *, fresh: bool = False) -> Credential:
        """This identity's credential: the cached one while it is valid and not due for renewal
        (unless ``fresh``), else one from the coordinator (``POST /api/admit``), cached. A key
        that held a credential renews it with an empty request; a new key (or one the
        coordinator forgot) shows its invite or token proof. Raises
        :class:`CoordinatorAuthError` when the coordinator refuses (used invite, wrong token,
        :class:`Revoked` key) or its answer cannot be trusted (code ``untrusted_answer``)."""
        identity = self._need_identity()
        if self._admitting is None:
            self._admitting = asyncio.Lock()
        async with self._admitting:
            known = self.credential
            if known is None and self.cache is not None:
                known = self.cache.load(self.access, identity)
            if known is not None and not fresh and not needs_renewal(known):
                self.credential = known
                return known
            try:
                cred = await self._redeem(identity, known, renew=known is not None)
            except NotAdmitted:
                if known is None:
                    raise
                cred = await self._redeem(identity, None, renew=False)  # a wiped coordinator
            self.credential = cred
            if self.cache is not None:
                try:
                    self.cache.save(self.access, cred)
                except OSError as e:  # works without: the next start is admitted again
                    log.warning("cannot keep the credential in %s: %s", self.cache.path, e)
            return cred

    async def _redeem(self, identity: Identity, known: Credential | None, *,
                      renew: bool) -> Credential:
        request = admit_request(self.access, identity.public_bytes, renew=renew)
        body = canonical_json(request.to_json())
        status, raw = await self._exchange("POST", ADMIT, body, "application/json", with_key=True)
        answer = json_answer(self.url, status, raw)
        try:
            return accept_answer(self.access, identity, request, answer,
                                 known_authority=known.authority if known is not None else None)
        except AdmissionError as e:
            raise CoordinatorAuthError(str(e), status=status, code="untrusted_answer") from e

    # -- membership ------------------------------------------------------------------------
    async def join(self, address: str, meta: dict) -> dict:
        """Register (or re-register) at ``address`` ("host:port") with metadata ``meta``
        (device, memory, roles, throughput, ...). Returns the coordinator's answer: ``state``,
        ``heartbeat_interval``, ``peer_timeout`` and the live ``peers``."""
        return await self._request("POST", "/join", {"address": address, "meta": meta})

    async def heartbeat(self, stats: dict, view: str | None = None) -> dict:
        """Report liveness and ``stats`` (open dict: throughput, per-link rtt/bandwidth, ...).
        Returns ``state``, ``heartbeat_interval``, ``peer_timeout``, the ``view`` id, the live
        ``peers`` -- left out when ``view`` (the id of the last list received) is still current --
        and ``revoked``: identities revoked since the coordinator started."""
        fields: dict = {"stats": stats}
        if view is not None:
            fields["view"] = view
        return await self._request("POST", "/heartbeat", fields)

    async def leave(self) -> None:
        await self._request("POST", "/leave", {})

    async def peers(self) -> list[PeerInfo]:
        data = await self._request("GET", "/peers")
        return [PeerInfo.from_dict(p) for p in data["peers"]]

    async def status(self) -> dict:
        return await self._request("GET", "/status")

    # -- plumbing --------------------------------------------------------------------------
    def _need_identity(self) -> Identity:
        if self.identity is None:
            raise CoordinatorError("this client has no identity; it can only read status")
        return self.identity

    def _ssl(self) -> Any:
        """aiohttp's ``ssl=`` for this coordinator: the pinned certificate when the join
        string has one (a self-signed certificate needs no CA), else the default checks."""
        import aiohttp

        fingerprint = self.access.fingerprint
        return aiohttp.Fingerprint(fingerprint) if fingerprint is not None else True

    async def _exchange(self, method: str, path: str, data: bytes | memoryview | None = None,
                        content_type: str | None = None, *,
                        with_key: bool = False) -> tuple[int, bytes]:
        """One signed HTTP request: ``(status, body)``; no answer at all (refused, timed out,
        connection lost) raises ``CoordinatorUnavailable``. Without an identity, unsigned."""
        import aiohttp  # here: `peer status` (read_status) and the parsers never load it
        from yarl import URL

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = b"" if data is None else bytes(data)
        target = self._prefix + path
        headers = {} if self.identity is None else \
            sign_headers(self.identity, method, target, body, with_key=with_key)
        if content_type is not None:
            headers["Content-Type"] = content_type
        # encoded=True: the request target goes out exactly as signed (no re-quoting).
        url = URL(self.url + API_PREFIX + path, encoded=True)
        try:
            async with self._session.request(method, url, data=body if data is not None else None,
                                             headers=headers, ssl=self._ssl()) as resp:
                return resp.status, await resp.read()
        except aiohttp.ServerFingerprintMismatch as e:
            raise CoordinatorAuthError(
                f"coordinator {self.url} presented another TLS certificate than the join "
                f"string pins (got sha256 {e.got.hex()}): refusing to talk to it",
                code="fingerprint_mismatch") from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise CoordinatorUnavailable(f"coordinator {self.url} unreachable: "
                                         f"{type(e).__name__}: {e}") from e

    async def _send(self, method: str, path: str, data: bytes | memoryview | None = None,
                    content_type: str | None = None) -> tuple[int, bytes]:
        """``_exchange``, admitting (and asking again, once) when the coordinator does not know
        this key: a new key, or a coordinator that lost its database; ``(status, body)``."""
        status, raw = await self._exchange(method, path, data, content_type)
        if self.identity is not None and status == 403 and error_code(raw) == "unknown_identity":
            await self.admit(fresh=True)
            status, raw = await self._exchange(method, path, data, content_type)
        return status, raw

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        if body is None:
            status, raw = await self._send(method, path)
        else:
            status, raw = await self._send(method, path, canonical_json(body), "application/json")
        return json_answer(self.url, status, raw)


def error_code(raw: bytes) -> str | None:
    """The ``error`` field of a coordinator's JSON error answer, if any."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    return payload.get("error") if isinstance(payload, dict) else None


def json_answer(url: str, status: int, raw: bytes) -> dict:
    """The JSON object of a coordinator answer, or its error as the matching CoordinatorError."""
    text = raw.decode("utf-8", "replace")  # the coordinator answers UTF-8 JSON (json_response)
    try:
        payload = json.loads(text) if text else {}
    except ValueError:
        payload = {"message": text[:200]}
    if status < 400:
        if not isinstance(payload, dict):
            raise CoordinatorError(f"coordinator {url} sent a non-object answer", status=status)
        return payload
    if not isinstance(payload, dict):
        payload = {"message": text[:200]}
    message = str(payload.get("message") or payload.get("error") or f"HTTP {status}")
    code = str(payload.get("error", "error"))
    if status == 403 and code == "revoked":
        raise Revoked(f"coordinator {url} revoked this peer's identity ({message}); ask the "
                      "operator for a new invite (and use a new --key)", status=status, code=code)
    if status == 403 and code in ("unknown_identity", "not_admitted"):
        raise NotAdmitted(f"coordinator {url}: {message}", status=status, code=code)
    if status == 403 and code == "peer_banned":
        raise PeerBanned(f"coordinator {url}: {message}", status=status, code=code)
    if status == 401 or (status == 403 and code in AUTH_CODES):
        raise CoordinatorAuthError(f"coordinator {url} refused this peer: {message}",
                                   status=status, code=code)
    if status in (404, 410) and code in NOT_REGISTERED_CODES:
        raise NotRegistered(message, status=status, code=code)
    if status >= 500:
        raise CoordinatorUnavailable(f"coordinator {url}: HTTP {status}: {message}",
                                     status=status, code=code)
    raise CoordinatorError(f"coordinator {url}: HTTP {status}: {message}", status=status, code=code)


def read_status(url: str | None, identity: Identity | None = None, *, join: str | None = None,
                insecure: bool = False, timeout: float = 10.0) -> dict:
    """GET /api/status synchronously with the standard library: what `peer status` shows, without
    loading aiohttp and an event loop for one request (so the command answers at once). With an
    ``identity`` the request is signed (an operator's credential sees the full view); a join
    string's certificate fingerprint is pinned; a key the coordinator does not know yet is
    admitted with the join string's invite."""
    client = BlockingClient(url, identity, join=join, insecure=insecure, timeout=timeout)
    if identity is not None:
        return client.get("/status")
    status, raw = sync_exchange(client.access, None, "GET", "/status", timeout=timeout)
    return json_answer(client.url, status, raw)


class BlockingClient:
    """A blocking, standard-library client of the coordinator for one identity: what one-shot
    commands (`peer status --key`), the demo and tests use to read (or write) a few routes
    without an event loop. Every request is signed; a key the coordinator does not know is
    admitted then (``admit``: the same sans-IO steps as ``CoordinatorClient``), so an admitted
    key needs no invite again."""

    def __init__(self, url: str | None = None, identity: Identity | None = None, *,
                 token: str | None = None, join: str | None = None, insecure: bool = False,
                 timeout: float = 10.0) -> None:
        try:
            self.access = Admission.make(url=url, join=join, token=token, insecure=insecure)
        except AdmissionError as e:
            raise CoordinatorError(str(e), code="bad_coordinator") from e
        self.url = self.access.url
        self.identity = identity or Identity.generate()
        self.timeout = timeout
        self.credential: Credential | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def admit(self) -> Credential:
        request = admit_request(self.access, self.identity.public_bytes)
        status, raw = sync_exchange(self.access, self.identity, "POST", ADMIT,
                                    canonical_json(request.to_json()), "application/json",
                                    with_key=True, timeout=self.timeout)
        try:
            self.credential = accept_answer(self.access, self.identity, request,
                                            json_answer(self.url, status, raw))
        except AdmissionError as e:
            raise CoordinatorAuthError(str(e), status=status, code="untrusted_answer") from e
        return self.credential

    def raw(self, method: str, path: str, body: bytes = b"",
            content_type: str | None = None) -> tuple[int, bytes]:
        """One signed request to ``/api{path}`` (``/api`` may be included): ``(status, body)``
        whatever the status."""
        path = path[len(API_PREFIX):] if path.startswith(API_PREFIX + "/") else path
        status, raw = sync_exchange(self.access, self.identity, method, path, body, content_type,
                                    timeout=self.timeout)
        if status == 403 and error_code(raw) == "unknown_identity":
            self.admit()
            status, raw = sync_exchange(self.access, self.identity, method, path, body,
                                        content_type, timeout=self.timeout)
        return status, raw

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """A signed JSON request: the answer object, or its error as a CoordinatorError."""
        if body is None:
            status, raw = self.raw(method, path)
        else:
            status, raw = self.raw(method, path, canonical_json(body), "application/json")
        return json_answer(self.url, status, raw)

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)


def sync_exchange(access: Admission, identity: Identity | None, method: str, path: str,
                  body: bytes = b"", content_type: str | None = None, *, with_key: bool = False,
                  timeout: float = 10.0) -> tuple[int, bytes]:
    """One blocking request to ``/api{path}`` (signed when ``identity`` is given, pinned to the
    join string's certificate): ``(status, body)``; no answer raises CoordinatorUnavailable.
    The standard-library twin of ``CoordinatorClient._exchange`` for one-shot commands."""
    import http.client
    import ssl

    parsed = urlparse(access.url)
    target = parsed.path + API_PREFIX + path
    headers = {} if identity is None else \
        sign_headers(identity, method, target, body, with_key=with_key)
    if content_type is not None:
        headers["Content-Type"] = content_type
    pinned = access.fingerprint
    try:
        if parsed.scheme == "https":
            context = ssl.create_default_context()
            if pinned is not None:  # the pin replaces CA checks (a self-signed certificate)
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, timeout=timeout,
                                               context=context)
        else:
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        try:
            conn.connect()
            if pinned is not None:
                got = fingerprint_of(conn.sock.getpeercert(binary_form=True))
                if got != pinned:
                    raise CoordinatorAuthError(
                        f"coordinator {access.url} presented another TLS certificate than the "
                        f"join string pins (got sha256 {got.hex()})", code="fingerprint_mismatch")
            conn.request(method, target, body=body if body or method != "GET" else None,
                         headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as e:
        raise CoordinatorUnavailable(f"coordinator {access.url} unreachable: "
                                     f"{type(e).__name__}: {e}") from e
