"""The coordinator's aiohttp application: composes the route groups (membership, status; runs and
checkpoints will join them) over one :class:`Store`, with JSON errors for every bad request."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from coordinator.checkpoint_routes import RetentionPolicy, setup_checkpoint_routes
from coordinator.checkpoints import Backend, open_backend
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.membership import setup_membership
from coordinator.metrics import setup_metrics
from coordinator.offenses import DEFAULT_BAN_AFTER, setup_offenses
from coordinator.registry import MembershipRegistry, Timing
from coordinator.runs import RunLimits, setup_runs
from coordinator.status import setup_status
from coordinator.store import Store
from coordinator.validation import RATE_LIMITERS, ApiError, RateLimited, charge
from peer.ratelimit import RateLimiter

log = logging.getLogger("lowband.coordinator")


@dataclass
class CoordinatorConfig:
    data_dir: Path
    token: str
    host: str = "127.0.0.1"
    port: int = 8470
    heartbeat_interval: float = 2.0   # told to peers on join/heartbeat
    peer_timeout: float = 10.0        # silent this long -> dead (half of it -> suspect)
    max_clock_skew: float = 300.0     # accepted |peer clock - coordinator clock| on signed requests
    max_request_bytes: int = 1024 * 1024
    # Request rates (token buckets). Signed peer requests count per peer id: a peer heartbeating
    # at 1 Hz, syncing and reporting uses a few per second, and many peers may share one address
    # (NAT, the scale bench). Every other request (status page, checkpoint chunks) counts per
    # remote address; an uploading peer sends a few 4 MiB chunks per second.
    peer_rate_per_s: float = 50.0
    peer_burst: int = 200
    address_rate_per_s: float = 200.0
    address_burst: int = 1000
    max_peers: int = 10_000  # live peers (joins beyond it: 429 too_many_peers)
    ban_after: int = DEFAULT_BAN_AFTER  # distinct reporters of poisoned updates that ban a peer (0: never)
    run_limits: RunLimits = field(default_factory=RunLimits)
    checkpoint_store: str | None = None  # s3://bucket[/prefix]; None: <data_dir>/checkpoints
    s3_endpoint_url: str | None = None   # MinIO, moto, ...; None: AWS
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.peer_timeout <= 0:
            raise ValueError("heartbeat interval and peer timeout must be positive")
        if self.peer_timeout < 2 * self.heartbeat_interval:
            raise ValueError(f"peer timeout {self.peer_timeout}s must be at least twice the "
                             f"heartbeat interval {self.heartbeat_interval}s")
        if not self.token:
            raise ValueError("the swarm token must not be empty")
        if (min(self.peer_rate_per_s, self.address_rate_per_s) <= 0
                or min(self.peer_burst, self.address_burst) < 1):
            raise ValueError("request rates must be positive and bursts at least 1")
        if self.max_peers < 1:
            raise ValueError("max_peers must be at least 1")
        if self.ban_after < 0:
            raise ValueError("ban_after must be >= 0 (0 = never ban automatically)")
        if self.s3_endpoint_url and not self.checkpoint_store:
            raise ValueError("an S3 endpoint URL needs an s3:// checkpoint store")


@web.middleware
async def json_errors(request: web.Request, handler):
    """Bad input -> 4xx JSON {"error", "message"}; an unexpected bug -> 500 JSON, logged."""
    try:
        return await handler(request)
    except RateLimited as e:
        return web.json_response({"error": e.code, "message": e.message,
                                  "retry_after": e.retry_after}, status=e.status,
                                 headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})
    except ApiError as e:
        return web.json_response({"error": e.code, "message": e.message}, status=e.status)
    except web.HTTPException as e:
        if e.status < 400 or not request.path.startswith("/api/"):
            raise
        return web.json_response({"error": e.reason.lower().replace(" ", "_"),
                                  "message": e.text or e.reason}, status=e.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal", "message": "internal error (see log)"},
                                 status=500)


# Routes whose handlers verify a peer signature and charge the peer id's bucket themselves
# (validation.check_signed_request); every other request is charged to its remote address.
SIGNED_ROUTES = frozenset({"/api/join", "/api/heartbeat", "/api/leave", "/api/runs/{run}",
                           "/api/runs/{run}/sync", "/api/runs/{run}/report", "/api/runs/{run}/leave",
                           "/api/runs/{run}/offenses"})


@web.middleware
async def rate_limit(request: web.Request, handler):
    resource = request.match_info.route.resource
    if request.method != "POST" or resource is None or resource.canonical not in SIGNED_ROUTES:
        charge(request, "address", request.remote or "?")
    return await handler(request)


def create_app(config: CoordinatorConfig, store: Store,
               backend: Backend | None = None, *, clock: Clock = SYSTEM_CLOCK) -> web.Application:
    """Build the app on an opened store (the caller owns the store's lifecycle). ``backend``:
    the checkpoint store, already opened and checked; by default opened from the config.
    ``clock``: failure detection's and rendezvous deadlines' time (tests pass a fake one)."""
    # json_errors is outermost, so refusals by rate_limit get the JSON answer too
    app = web.Application(middlewares=[json_errors, rate_limit],
                          client_max_size=config.max_request_bytes)
    app[RATE_LIMITERS] = {"peer": RateLimiter(config.peer_rate_per_s, config.peer_burst),
                          "address": RateLimiter(config.address_rate_per_s, config.address_burst)}
    registry = MembershipRegistry(store, Timing(config.heartbeat_interval, config.peer_timeout), clock=clock)
    setup_membership(app, registry, config.token, config.max_clock_skew, config.max_peers)
    setup_status(app, store, registry)
    if backend is None:
        backend = open_backend(config.data_dir, config.checkpoint_store, config.s3_endpoint_url)
    setup_runs(app, store, registry, backend, config.run_limits)
    setup_offenses(app, config.ban_after)
    setup_checkpoint_routes(app, backend, retention=config.retention)
    setup_metrics(app)
    return app
