"""Prometheus metrics of one peer process, and the small HTTP server that exposes them.

peer/ is the bottom layer, so the registry lives here and the layers above record into it
without knowing about each other::

    from peer import metrics
    with metrics.time_collective("all_reduce"):        # duration histogram
        ...
    metrics.record_collective_bytes("all_reduce", sent=n_out, received=n_in)
    metrics.record_outer_step(step, loss=2.31)         # diloco, after each outer step
    metrics.set_inference("smollm2-135m", tokens_per_s=41.5, sessions=2)   # pipeline servers

The daemon records its own coordinator heartbeats and mesh size. `peer join --metrics-port PORT`
serves GET /metrics on the listen host (0 = any free port; the flag absent = no server).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

REGISTRY = CollectorRegistry()

# Coordinator round trips are sub-10 ms on a LAN and up to seconds over bad links.
HEARTBEAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Collectives run from milliseconds (small tensors) to minutes (an outer step over a WAN).
COLLECTIVE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)

HEARTBEATS = Counter("lowband_peer_heartbeats", "heartbeats sent to the coordinator, by result "
                     "(ok, unregistered, unavailable, refused)", ["result"], registry=REGISTRY)
HEARTBEAT_SECONDS = Histogram("lowband_peer_heartbeat_seconds", "coordinator heartbeat round trip",
                              buckets=HEARTBEAT_BUCKETS, registry=REGISTRY)
MESH_PEERS = Gauge("lowband_peer_mesh_peers", "live peers in this peer's mesh view (self excluded)",
                   registry=REGISTRY)
COLLECTIVE_BYTES = Counter("lowband_peer_collective_bytes", "payload bytes moved by collectives",
                           ["op", "direction"], registry=REGISTRY)
COLLECTIVE_SECONDS = Histogram("lowband_peer_collective_seconds", "wall time of one collective",
                               ["op", "outcome"], buckets=COLLECTIVE_BUCKETS, registry=REGISTRY)
OUTER_STEPS = Counter("lowband_peer_outer_steps", "outer (synchronising) steps completed",
                      registry=REGISTRY)
OUTER_STEP = Gauge("lowband_peer_outer_step", "index of the latest outer step", registry=REGISTRY)
LOSS = Gauge("lowband_peer_loss", "latest training loss", registry=REGISTRY)
INFERENCE_TOKENS_PER_S = Gauge("lowband_peer_inference_tokens_per_second",
                               "tokens/s this peer generated or forwarded, per model", ["model"],
                               registry=REGISTRY)
INFERENCE_SESSIONS = Gauge("lowband_peer_inference_sessions", "open inference sessions, per model",
                           ["model"], registry=REGISTRY)


def record_collective_bytes(op: str, *, sent: int = 0, received: int = 0) -> None:
    """Add the payload bytes one collective (``op``: all_reduce, broadcast, ...) moved."""
    if sent:
        COLLECTIVE_BYTES.labels(op, "sent").inc(sent)
    if received:
        COLLECTIVE_BYTES.labels(op, "received").inc(received)


@contextmanager
def time_collective(op: str) -> Iterator[None]:
    """Time the enclosed collective; the outcome label is ``ok`` or the exception's type name."""
    start = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as e:
        outcome = type(e).__name__
        raise
    finally:
        COLLECTIVE_SECONDS.labels(op, outcome).observe(time.perf_counter() - start)


def record_outer_step(step: int, loss: float | None = None) -> None:
    OUTER_STEPS.inc()
    OUTER_STEP.set(step)
    if loss is not None:
        LOSS.set(loss)


def set_inference(model: str, *, tokens_per_s: float, sessions: int) -> None:
    INFERENCE_TOKENS_PER_S.labels(model).set(tokens_per_s)
    INFERENCE_SESSIONS.labels(model).set(sessions)


def exposition() -> bytes:
    """The current metrics in Prometheus text format."""
    return generate_latest(REGISTRY)


async def _serve_metrics(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_metrics_server(host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve GET /metrics on host:port (0 = any free port); returns the runner (call
    ``cleanup()`` to stop) and the bound port. Raises OSError when it cannot listen."""
    app = web.Application()
    app.router.add_get("/metrics", _serve_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
