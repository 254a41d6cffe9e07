"""Prometheus metrics of the coordinator, served at GET /metrics (text exposition format).

Request counts and latencies (the heartbeat latency histogram is the ``/api/heartbeat`` series of
``lowband_coordinator_request_seconds``) are recorded by a middleware as requests happen. The
swarm-level gauges -- peers per membership state, training runs, inference per model,
checkpoints -- are read from the same sections as /api/status at scrape time, so the page and
the metrics never disagree. Every app has its own registry (tests run several apps per process).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

from coordinator.status import ALL, Pages, assemble_status

# Gauges need counts and every run, never the peer or event lists.
METRICS_PAGES = Pages(peers=(0, 0), events=(0, 0), runs=(0, ALL))

# Seconds; the heartbeat target is p99 < 50 ms, so resolution is finest below that.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class CoordinatorMetrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    peers: Gauge
    reachability: Gauge
    runs: Gauge
    run_outer_step: Gauge
    run_loss: Gauge
    run_tokens: Gauge
    run_participants: Gauge
    run_bytes_on_wire: Gauge
    run_hash_agreed: Gauge
    inference_tokens_per_s: Gauge
    inference_sessions: Gauge
    inference_uncovered_blocks: Gauge
    checkpoints: Gauge

    @classmethod
    def create(cls) -> "CoordinatorMetrics":
        r = CollectorRegistry()
        run, model = ["run"], ["model"]
        return cls(
            registry=r,
            requests=Counter("lowband_coordinator_requests", "HTTP requests answered",
                             ["route", "method", "status"], registry=r),
            request_seconds=Histogram("lowband_coordinator_request_seconds",
                                      "HTTP request handling time (route /api/heartbeat: "
                                      "heartbeat latency)", ["route", "method"],
                                      buckets=LATENCY_BUCKETS, registry=r),
            peers=Gauge("lowband_coordinator_peers", "peers per membership state", ["state"],
                        registry=r),
            reachability=Gauge("lowband_coordinator_peer_reachability", "live peers by the "
                               "outcome of the join's dial-back probe (reachable, unreachable, "
                               "unprobed)", ["outcome"], registry=r),
            runs=Gauge("lowband_coordinator_runs", "training runs known", registry=r),
            run_outer_step=Gauge("lowband_run_outer_step", "latest outer step of a run", run,
                                 registry=r),
            run_loss=Gauge("lowband_run_loss", "latest reported loss of a run", run, registry=r),
            run_tokens=Gauge("lowband_run_tokens", "tokens trained in a run so far", run,
                             registry=r),
            run_participants=Gauge("lowband_run_participants", "peers in a run's latest outer step",
                                   run, registry=r),
            run_bytes_on_wire=Gauge("lowband_run_bytes_on_wire", "bytes sent by a run's "
                                    "collectives so far", run, registry=r),
            run_hash_agreed=Gauge("lowband_run_state_hash_agreed", "1 when every participant "
                                  "reported the same global-state hash at the latest step", run,
                                  registry=r),
            inference_tokens_per_s=Gauge("lowband_inference_tokens_per_second",
                                         "generated tokens/s summed over a model's servers", model,
                                         registry=r),
            inference_sessions=Gauge("lowband_inference_sessions", "open inference sessions",
                                     model, registry=r),
            inference_uncovered_blocks=Gauge("lowband_inference_uncovered_blocks",
                                             "blocks of a model no active peer serves", model,
                                             registry=r),
            checkpoints=Gauge("lowband_coordinator_checkpoints", "published checkpoints listed",
                              registry=r),
        )

    def observe_status(self, status: dict) -> None:
        """Set the swarm gauges from an assembled /api/status (stale label sets are dropped)."""
        for state, n in status["counts"].items():
            self.peers.labels(state).set(n)
        for outcome, n in (status.get("reachability") or {}).items():
            self.reachability.labels(outcome).set(n)
        runs = status["runs"] or []
        self.runs.set(len(runs))
        for gauge in (self.run_outer_step, self.run_loss, self.run_tokens, self.run_participants,
                      self.run_bytes_on_wire, self.run_hash_agreed, self.inference_tokens_per_s,
                      self.inference_sessions, self.inference_uncovered_blocks):
            gauge.clear()
        for run in runs:
            name = str(run.get("run_id"))
            for gauge, value in ((self.run_outer_step, run.get("outer_step")),
                                 (self.run_tokens, run.get("tokens")),
                                 (self.run_participants, _length(run.get("participants"))),
                                 (self.run_bytes_on_wire, run.get("bytes_on_wire"))):
                if _is_number(value):
                    gauge.labels(name).set(value)
            losses = [h.get("loss") for h in run.get("history") or [] if _is_number(h.get("loss"))]
            if losses:
                self.run_loss.labels(name).set(losses[-1])
            agreement = run.get("hash_agreement") or {}
            if isinstance(agreement.get("agreed"), bool):
                self.run_hash_agreed.labels(name).set(int(agreement["agreed"]))
        for m in status["inference"] or []:
            self.inference_tokens_per_s.labels(m["model"]).set(m["tokens_per_s"])
            self.inference_sessions.labels(m["model"]).set(m["sessions"])
            self.inference_uncovered_blocks.labels(m["model"]).set(
                sum(end - start for start, end in m["gaps"]))
        self.checkpoints.set(len(status["checkpoints"] or []))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _length(value: object) -> int | None:
    if isinstance(value, list):
        return len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


METRICS = web.AppKey("coordinator_metrics", CoordinatorMetrics)


@web.middleware
async def measure_requests(request: web.Request, handler):
    """Count and time every request, labelled by route pattern (bounded cardinality)."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        m = request.app[METRICS]
        m.request_seconds.labels(route, request.method).observe(time.perf_counter() - start)
        m.requests.labels(route, request.method, str(status)).inc()


async def metrics_endpoint(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.observe_status(await assemble_status(request.app, METRICS_PAGES))
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_metrics(app: web.Application) -> None:
    """Register GET /metrics and the request-measuring middleware (outermost, so it sees the
    final status the error middleware produced). Call after setup_status."""
    app[METRICS] = CoordinatorMetrics.create()
    app.middlewares.insert(0, measure_requests)
    app.router.add_get("/metrics", metrics_endpoint)
