"""The serving side of RPC: registered handlers, per-peer admission (roles, busy / rate limits)
and running one request into the typed reply message of :mod:`peer.messages`.

A request counts against its peer's handler limit from admission until :meth:`RpcServer.done`,
which the transport calls once the reply is written: a caller that never reads its replies
therefore runs out of slots instead of piling replies up in the host's memory.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Iterable

from peer.limits import HostLimits
from peer.messages import Error, ErrorCode, Request, Response
from peer.ratelimit import RateLimiter

log = logging.getLogger("lowband.transport")

# handler(peer_id, header, payload) -> (header, payload); received payloads are bytearrays
Handler = Callable[[str, dict, bytearray], Awaitable[tuple[dict, bytes | bytearray | memoryview]]]
Reply = tuple[Response | Error, bytes | bytearray | memoryview]


class RpcServer:
    def __init__(self, limits: HostLimits, roles_of: Callable[[str], frozenset[str] | None] = lambda _: None) -> None:
        self.limits = limits
        self._roles_of = roles_of  # a peer's credential roles; None: token-only mode, no roles
        self._handlers: dict[str, Handler] = {}
        self._required: dict[str, frozenset[str]] = {}  # method -> roles, any one of which may call it
        self._rate = RateLimiter(limits.rpc_rate_per_s, limits.rpc_burst)
        self._serving: dict[str, int] = {}  # peer id -> requests admitted, reply not yet written

    def handle(self, method: str, fn: Handler, roles: Iterable[str] | None = None) -> None:
        self._handlers[method] = fn
        if roles is None:
            self._required.pop(method, None)
        else:
            self._required[method] = frozenset(roles)

    def admit(self, peer_id: str, req: Request) -> Error | None:
        """Refusal of a request (None: admitted, and counted until :meth:`done`)."""
        required = self._required.get(req.method)
        if required is not None:
            held = self._roles_of(peer_id)
            if held is not None and not held & required:
                return Error(req.call_id, ErrorCode.FORBIDDEN,
                             f"forbidden: {req.method!r} needs one of the roles {sorted(required)}, "
                             f"the caller's credential grants {sorted(held)}")
        lim, running = self.limits, self._serving.get(peer_id, 0)
        if running >= lim.max_handlers_per_peer:
            return Error(req.call_id, ErrorCode.BUSY,
                         f"busy: {lim.max_handlers_per_peer} requests of this peer are already being handled")
        wait = self._rate.acquire(peer_id)
        if wait:
            return Error(req.call_id, ErrorCode.RATE_LIMITED,
                         f"rate limited: more than {lim.rpc_rate_per_s:g} requests/s (burst {lim.rpc_burst}); "
                         f"retry after {wait:.3f}s")
        self._serving[peer_id] = running + 1
        return None

    async def serve(self, peer_id: str, req: Request, payload: bytearray) -> Reply:
        """Run the handler of an admitted request; its failure becomes an Error reply."""
        fn = self._handlers.get(req.method)
        if fn is None:
            return Error(req.call_id, ErrorCode.NO_SUCH_METHOD, f"no handler for method {req.method!r}",
                         "LookupError"), b""
        t0 = time.perf_counter()
        try:
            rhdr, out = await fn(peer_id, req.header, payload)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported to the caller as RemoteError
            log.debug("handler %s failed", req.method, exc_info=True)
            return Error.from_exception(req.call_id, e), b""
        return Response(req.call_id, rhdr, time.perf_counter() - t0), out

    def done(self, peer_id: str) -> None:
        """An admitted request's reply is written (or can no longer be): free its slot."""
        left = self._serving.get(peer_id, 0) - 1
        if left > 0:
            self._serving[peer_id] = left
        else:
            self._serving.pop(peer_id, None)
