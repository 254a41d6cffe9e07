"""Async HTTP client of the coordinator's membership API, and the request-signing rule it shares
with the coordinator.

Every membership request (join, heartbeat, leave) is a JSON body carrying ``peer_id``,
``timestamp`` and an Ed25519 ``signature`` (hex) over :func:`signing_bytes`; the swarm token
travels separately as ``Authorization: Bearer <token>``. The coordinator checks that the peer
id is the hash of the public key (given on join, remembered afterwards), the signature, and
the clock skew, so a token holder cannot speak for another peer's id.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peer.errors import LowbandError
from peer.identity import Identity

if TYPE_CHECKING:
    import aiohttp

API_PREFIX = "/api"
SIGNING_CONTEXT = b"lowband-coordinator/v1\n"
# Error codes the coordinator uses when a heartbeat/leave names a peer it no longer counts.
NOT_REGISTERED_CODES = frozenset({"unknown_peer", "peer_dead", "peer_left"})


class CoordinatorError(LowbandError):
    """The coordinator answered with an error; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class CoordinatorAuthError(CoordinatorError):
    """The swarm token was missing or wrong (HTTP 401)."""


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


def signing_bytes(action: str, body: dict) -> bytes:
    """The bytes a peer signs for ``action`` ("join", "heartbeat", "leave"): the context string,
    the action, and the canonical JSON of the body without its ``signature`` field. The action is
    inside the signed bytes so a captured heartbeat cannot be replayed as a leave."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return SIGNING_CONTEXT + action.encode("ascii") + b"\n" + canonical_json(unsigned)


@dataclass
class PeerInfo:
    """One row of the membership table as the coordinator reports it."""

    peer_id: str
    address: str
    state: str
    roles: list[str] = field(default_factory=list)
    device: str | None = None
    memory: int | None = None
    throughput: float | None = None
    last_heartbeat: float | None = None
    heartbeat_age_s: float | None = None
    joined_at: float | None = None
    state_since: float | None = None
    incarnation: int | None = None
    meta: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "PeerInfo":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class CoordinatorClient:
    """Talks to one coordinator on behalf of one identity.

    Use as ``async with CoordinatorClient(url, token, identity) as c:`` or call :meth:`close`.
    Network failures raise :class:`CoordinatorUnavailable`; a rejected token
    :class:`CoordinatorAuthError`; a heartbeat for an unknown/dead peer :class:`NotRegistered`.
    """

    def __init__(self, url: str, token: str | bytes | None, identity: Identity | None, *,
                 timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        self.token = token
        self.identity = identity
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "CoordinatorClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- membership ------------------------------------------------------------------------
    async def join(self, address: str, meta: dict) -> dict:
        """Register (or re-register) at ``address`` ("host:port") with metadata ``meta``
        (device, memory, roles, throughput, ...). Returns the coordinator's answer: ``state``,
        ``heartbeat_interval``, ``peer_timeout`` and the live ``peers``."""
        identity = self._need_identity()
        return await self._signed("join", {"public_key": identity.public_bytes.hex(),
                                           "address": address, "meta": meta})

    async def heartbeat(self, stats: dict, view: str | None = None) -> dict:
        """Report liveness and ``stats`` (open dict: throughput, per-link rtt/bandwidth, ...).
        Returns ``state``, ``heartbeat_interval``, ``peer_timeout``, the ``view`` id and the live
        ``peers`` -- left out when ``view`` (the id of the last list received) is still current."""
        fields: dict = {"stats": stats}
        if view is not None:
            fields["view"] = view
        return await self._signed("heartbeat", fields)

    async def leave(self) -> None:
        await self._signed("leave", {})

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

    async def _signed(self, action: str, fields: dict, path: str | None = None) -> dict:
        """POST ``fields`` signed for ``action`` to ``path`` (default ``/{action}``)."""
        identity = self._need_identity()
        body = {"peer_id": identity.peer_id, "timestamp": time.time(), **fields}
        body["signature"] = identity.sign(signing_bytes(action, body)).hex()
        return await self._request("POST", path or f"/{action}", body)

    async def _exchange(self, method: str, path: str, data: bytes | memoryview | None = None,
                        content_type: str | None = None) -> tuple[int, bytes]:
        """One HTTP request with the swarm token: ``(status, body)``; no answer at all (refused,
        timed out, connection lost) raises ``CoordinatorUnavailable``."""
        import aiohttp  # here: `peer status` (read_status) and the parsers never load it

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        url = self.url + API_PREFIX + path
        try:
            async with self._session.request(method, url, data=data, headers=headers) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise CoordinatorUnavailable(f"coordinator {self.url} unreachable: "
                                         f"{type(e).__name__}: {e}") from e

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        if body is None:
            status, raw = await self._exchange(method, path)
        else:
            status, raw = await self._exchange(method, path, canonical_json(body), "application/json")
        return json_answer(self.url, status, raw)


def json_answer(url: str, status: int, raw: bytes) -> dict:
    """The JSON object of a coordinator answer, or its error as the matching CoordinatorError."""
    text = raw.decode("utf-8")  # the coordinator answers UTF-8 JSON (aiohttp's json_response)
    try:
        payload = json.loads(text) if text else {}
    except ValueError:
        payload = {"message": text[:200]}
    if status < 400:
        if not isinstance(payload, dict):
            raise CoordinatorError(f"coordinator {url} sent a non-object answer", status=status)
        return payload
    message = str(payload.get("message") or payload.get("error") or f"HTTP {status}")
    code = str(payload.get("error", "error"))
    if status == 401:
        raise CoordinatorAuthError(f"coordinator {url} rejected the swarm token: {message}",
                                   status=status, code=code)
    if status in (404, 410) and code in NOT_REGISTERED_CODES:
        raise NotRegistered(message, status=status, code=code)
    if status == 403 and code == "peer_banned":
        raise PeerBanned(f"coordinator {url}: {message}", status=status, code=code)
    if status >= 500:
        raise CoordinatorUnavailable(f"coordinator {url}: HTTP {status}: {message}",
                                     status=status, code=code)
    raise CoordinatorError(f"coordinator {url}: HTTP {status}: {message}", status=status, code=code)


def read_status(url: str, token: str | None, timeout: float = 10.0) -> dict:
    """GET /api/status synchronously with the standard library: what `peer status` shows, without
    loading aiohttp and an event loop for one request (so the command answers at once)."""
    import urllib.error
    import urllib.request

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url + API_PREFIX + "/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json_answer(url, resp.status, resp.read())
    except urllib.error.HTTPError as e:
        return json_answer(url, e.code, e.read())
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: a malformed URL
        raise CoordinatorUnavailable(f"coordinator {url} unreachable: {type(e).__name__}: "
                                     f"{getattr(e, 'reason', e)}") from e
