"""The coordinator's aiohttp application: composes the route groups (membership, status; runs and
checkpoints will join them) over one :class:`Store`, with JSON errors for every bad request."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from coordinator.checkpoint_routes import setup_checkpoint_routes
from coordinator.checkpoints import open_backend
from coordinator.membership import setup_membership
from coordinator.metrics import setup_metrics
from coordinator.registry import MembershipRegistry, Timing
from coordinator.runs import setup_runs
from coordinator.status import setup_status
from coordinator.store import Store
from coordinator.validation import ApiError

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

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.peer_timeout <= 0:
            raise ValueError("heartbeat interval and peer timeout must be positive")
        if self.peer_timeout < 2 * self.heartbeat_interval:
            raise ValueError(f"peer timeout {self.peer_timeout}s must be at least twice the "
                             f"heartbeat interval {self.heartbeat_interval}s")
        if not self.token:
            raise ValueError("the swarm token must not be empty")


@web.middleware
async def json_errors(request: web.Request, handler):
    """Bad input -> 4xx JSON {"error", "message"}; an unexpected bug -> 500 JSON, logged."""
    try:
        return await handler(request)
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


def create_app(config: CoordinatorConfig, store: Store) -> web.Application:
    """Build the app on an opened store (the caller owns the store's lifecycle)."""
    app = web.Application(middlewares=[json_errors], client_max_size=config.max_request_bytes)
    registry = MembershipRegistry(store, Timing(config.heartbeat_interval, config.peer_timeout))
    setup_membership(app, registry, config.token, config.max_clock_skew)
    setup_status(app, store, registry)
    backend = open_backend(config.data_dir)  # <data-dir>/checkpoints
    setup_runs(app, store, registry, backend)
    setup_checkpoint_routes(app, backend)
    setup_metrics(app)
    return app
