"""The coordinator's aiohttp application: composes the route groups (admission, membership,
status, runs, checkpoints, offenses, metrics) over one :class:`Store`, behind two middlewares:
JSON errors for every bad request, then authentication and rate limits (coordinator/auth.py)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from coordinator.auth import Admission, authenticate, load_authority, setup_auth
from coordinator.defaults import (DEFAULT_ADMIT_RATE, DEFAULT_CREDENTIAL_LIFETIME_S,
                                  DEFAULT_MAX_CLOCK_SKEW_S, DEFAULT_MAX_PEERS_PER_ADDRESS)
from coordinator.checkpoint_routes import RetentionPolicy, setup_checkpoint_routes
from coordinator.checkpoints import Backend, open_backend
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.membership import setup_membership
from coordinator.metrics import setup_metrics
from coordinator.offenses import DEFAULT_BAN_AFTER, setup_offenses
from coordinator.reachability import credential_handshakes, setup_reachability
from coordinator.registry import Limits, MembershipRegistry, Timing
from coordinator.runs import RunLimits, setup_runs
from coordinator.status import setup_status
from coordinator.store import Store
from coordinator.validation import RATE_LIMITERS, ApiError, RateLimited
from peer.ratelimit import RateLimiter

log = logging.getLogger("lowband.coordinator")


@dataclass
class CoordinatorConfig:
    data_dir: Path
    token: str | None = None  # closed swarm: token proofs admit (>= 128 bits, peer/tokens.py)
    open: bool = False        # open swarm: anyone is admitted (roles train, serve, client)
    credential_lifetime_s: float = DEFAULT_CREDENTIAL_LIFETIME_S
    host: str = "127.0.0.1"
    port: int = 8470
    heartbeat_interval: float = 2.0   # told to peers on join/heartbeat
    peer_timeout: float = 10.0        # silent this long -> dead (half of it -> suspect)
    # accepted |peer clock - coordinator clock| on signed requests (= the replay window)
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_S
    max_request_bytes: int = 1024 * 1024
    # Request rates (token buckets). Every request counts against its remote address, and signed
    # ones also against their identity: a peer heartbeating at 1 Hz, syncing and reporting uses a
    # few per second, an uploading peer a few 4 MiB chunks per second; several peers may share an
    # address (NAT). Admissions have their own, slower bucket per address, so one address cannot
    # mint thousands of identities in an open swarm.
    peer_rate_per_s: float = 50.0
    peer_burst: int = 200
    address_rate_per_s: float = 200.0
    address_burst: int = 1000
    admit_rate_per_s: float = DEFAULT_ADMIT_RATE
    admit_burst: int = round(40 * DEFAULT_ADMIT_RATE)
    max_peers: int = 10_000  # live peers (joins beyond it: 429 too_many_peers)
    # live peers joined from one address (None: no cap)
    max_peers_per_address: int | None = DEFAULT_MAX_PEERS_PER_ADDRESS
    probe_reachability: bool = True  # dial back each joiner's announced address (reachability.py)
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
        if self.token is not None:
            from peer.tokens import check_token_strength
            check_token_strength(self.token)  # ValueError that says how to make a strong one
        if not self.credential_lifetime_s > 0:
            raise ValueError("credential lifetime must be positive")
        if self.max_clock_skew <= 0:
            raise ValueError("max clock skew must be positive")
        if (min(self.peer_rate_per_s, self.address_rate_per_s, self.admit_rate_per_s) <= 0
                or min(self.peer_burst, self.address_burst, self.admit_burst) < 1):
            raise ValueError("request rates must be positive and bursts at least 1")
        if self.max_peers < 1 or (self.max_peers_per_address is not None
                                  and self.max_peers_per_address < 1):
            raise ValueError("max_peers and max_peers_per_address must be at least 1")
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


def create_app(config: CoordinatorConfig, store: Store,
               backend: Backend | None = None, *, clock: Clock = SYSTEM_CLOCK) -> web.Application:
    """Build the app on an opened store (the caller owns the store's lifecycle). ``backend``:
    the checkpoint store, already opened and checked; by default opened from the config.
    ``clock``: failure detection's and rendezvous deadlines' time (tests pass a fake one)."""
    # json_errors is outermost, so refusals by authenticate get the JSON answer too
    app = web.Application(middlewares=[json_errors, authenticate],
                          client_max_size=config.max_request_bytes)
    app[RATE_LIMITERS] = {"peer": RateLimiter(config.peer_rate_per_s, config.peer_burst),
                          "address": RateLimiter(config.address_rate_per_s, config.address_burst)}
    authority = load_authority(config.data_dir)
    setup_auth(app, store, authority,
               Admission(token=config.token, open=config.open,
                         credential_lifetime_s=config.credential_lifetime_s,
                         max_skew_s=config.max_clock_skew),
               RateLimiter(config.admit_rate_per_s, config.admit_burst))
    registry = MembershipRegistry(store, Timing(config.heartbeat_interval, config.peer_timeout),
                                  clock=clock,
                                  limits=Limits(max_live_per_address=config.max_peers_per_address))
    setup_membership(app, registry, config.max_peers)
    setup_status(app, store, registry)
    if config.probe_reachability:
        # the mesh admits by credential (peers run no swarm token on it): the probe key holds
        # an operator credential from this coordinator's authority
        setup_reachability(app, registry, credential_handshakes(authority, None))
    if backend is None:
        backend = open_backend(config.data_dir, config.checkpoint_store, config.s3_endpoint_url)
    setup_runs(app, store, registry, backend, config.run_limits)
    setup_offenses(app, config.ban_after)
    setup_checkpoint_routes(app, backend, retention=config.retention)
    setup_metrics(app)
    return app
