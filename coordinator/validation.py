"""Request checking shared by every route group: body limits, JSON parsing, typed field access,
and the check that a signed request's body is the one it signed (authentication itself:
coordinator/auth.py). Every failure is an :class:`ApiError`, which the app's
middleware turns into a JSON answer ``{"error": code, "message": text}`` (never a 500)."""
from __future__ import annotations

import asyncio
import json
import math
import re

from aiohttp import web

from peer.membership import canonical_json
from peer.reqsign import H_BODY, body_sha

PEER_ID_RE = re.compile(r"^[0-9a-f]{40}$")
HEX_RE = re.compile(r"^[0-9a-f]*$")
# host:port with a DNS name, IPv4 or [IPv6] host.
ADDRESS_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]{1,253}):(\d{1,5})$")
BODY_TIMEOUT_S = 10.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class RateLimited(ApiError):
    """429 with a Retry-After: the client sent more requests than its token bucket allows
    (``rate_limited``), or a capacity limit is reached for now (another ``code``)."""

    def __init__(self, message: str, retry_after: float, code: str = "rate_limited") -> None:
        super().__init__(429, code, message)
        self.retry_after = retry_after


# Request-rate buckets of the app (peer.ratelimit.RateLimiter): "address" keyed by the remote
# address of every request, "peer" keyed by the identity of every signed one.
RATE_LIMITERS = web.AppKey("rate_limiters", dict)
# The authenticated sender of a request (coordinator/auth.py:Principal), set by the auth
# middleware on every request: None on the public routes (docs/security.md §Signed coordinator requests).
PRINCIPAL = web.RequestKey("principal", object)


def charge(request: web.Request, kind: str, key: str) -> None:
    """Take one request token of ``key`` from the app's ``kind`` bucket; RateLimited if empty."""
    limiter = request.app[RATE_LIMITERS][kind]
    wait = limiter.acquire(key)
    if wait:
        raise RateLimited(f"too many requests from this {kind} (limit {limiter.rate:g}/s, burst "
                          f"{limiter.burst}); retry after {wait:.2f}s", wait)


def bad(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: web.Request, max_bytes: int) -> dict:
    """The request body as a JSON object, at most ``max_bytes`` long, read within
    BODY_TIMEOUT_S (a stalled client cannot hold a handler forever)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "body_too_large", f"body of {request.content_length} bytes exceeds "
                                              f"the {max_bytes} byte limit")
    try:
        body = await asyncio.wait_for(_read_limited(request, max_bytes), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"body not received within {BODY_TIMEOUT_S:g}s") from None
    except ConnectionError:  # the client went away mid-body: its fault, not a server error
        raise ApiError(400, "incomplete_body", "connection lost while receiving the body") from None
    check_body(request, body)
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        canonical_json(data)  # re-encodable (no NaN, not absurdly deep): later signing cannot fail
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"malformed JSON body: {type(e).__name__}: {str(e)[:200]}", "malformed_json") from e
    if not isinstance(data, dict):
        raise bad("JSON body must be an object", "malformed_json")
    return data


async def _read_limited(request: web.Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"body exceeds the {max_bytes} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def get_str(body: dict, key: str, *, max_len: int, pattern: re.Pattern | None = None) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise bad(f"field {key!r} must be a string")
    if not value or len(value) > max_len:
        raise bad(f"field {key!r} must be 1..{max_len} characters")
    if pattern is not None and not pattern.match(value):
        raise bad(f"field {key!r} has an invalid format")
    return value


def get_number(body: dict, key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"field {key!r} must be a finite number")
    return float(value)


def get_object(body: dict, key: str, *, max_bytes: int, default: dict | None = None) -> dict:
    value = body.get(key, default)
    if not isinstance(value, dict):
        raise bad(f"field {key!r} must be an object")
    if len(canonical_json(value)) > max_bytes:
        raise ApiError(413, "field_too_large", f"field {key!r} exceeds {max_bytes} bytes")
    return value


def get_address(body: dict, key: str = "address") -> str:
    address = get_str(body, key, max_len=300, pattern=ADDRESS_RE)
    port = int(address.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise bad(f"field {key!r}: port {port} out of range")
    return address


def check_body(request: web.Request, data: bytes | bytearray | memoryview) -> None:
    """On a signed request the bytes read must be the bytes signed (``X-Lowband-Body``, see
    peer/reqsign.py); 400 ``body_mismatch`` otherwise. Every body reader calls this."""
    if request.get(PRINCIPAL) is None:
        return
    if body_sha(data) != request.headers.get(H_BODY):
        raise ApiError(400, "body_mismatch", f"body does not hash to {H_BODY} (altered in "
                                             "transit, or signed over other bytes)")
