"""Status routes: the HTML page at / (static files, no CDN) and GET /api/status, which the page
polls every second, `peer status` prints and /metrics reads.

/api/status is assembled from named *sections*. Each section is computed on its own and a failing
or missing source yields that section's empty value (plus a line in ``section_errors``), never an
error answer: the page must keep working while one part of the coordinator is broken.

Sections and their JSON shapes (documented here because peers and other route groups fill them):

``coordinator``  {version, time, started_at, uptime_s, heartbeat_interval, peer_timeout, grace_until}
``counts``       {state: number of peers} for every state (joining active suspect dead left)
``peers``        [{peer_id, address, state, device, memory, roles, throughput, meta, stats,
                   joined_at, last_heartbeat, heartbeat_age_s, state_since, incarnation}]
``events``       [{ts, peer_id, kind, detail}], newest first
``runs``         [{run_id, state, config, generation, outer_step, tokens, participants: [peer_id],
                   members_training, bytes_on_wire, utilization, hash_agreement: {step, agreed,
                   hashes: {hash: [peer_id]}}, history: [{step, loss, tokens, bytes_sent,
                   utilization, reports, ts}]}] -- read from the tables of coordinator/runs.py:
                   per-step reports (loss, tokens, bytes_sent, compute_utilization, state hash per
                   peer) of the run's current generation; totals are over that generation
``inference``    [{model, n_blocks, coverage: [servers per block], gaps: [[start, end)],
                   complete, sessions, tokens_per_s, servers: [{peer_id, state, blocks: [start, end),
                   sessions, tokens_per_s}]}] -- derived from serving peers' heartbeat stats
``links``        {peers: [peer_id], rows: {src: {dst: {rtt_s, ping_rtt_s, bandwidth_Bps}}}}
                   -- each live peer's row of the measured link matrix, from heartbeat stats
``checkpoints``  [{run, step, size_bytes, state_hash, created, tensors}], newest first
``offenses``     {ban_after, peers: [{peer_id, reports, reporters, codes, last: {ts, run, step,
                   reporter, code, detail}, banned}], bans: [{peer_id, ts, reason, source}]}
                   -- poisoned-update reports and bans (coordinator/offenses.py)
``checkpoint_store`` {backend: local|s3, keep_last, keep_every, gc_grace_s, last_prune: {run, step,
                   at, deleted_steps, chunks_removed} | null} -- retention (checkpoint_routes.py)

What a serving peer reports (``PeerDaemon.report("serve", ...)`` puts it in ``stats.serve``), one
object or a list of them for several models::

    {"model": "smollm2-135m", "n_layers": 30, "blocks": [0, 15], "sessions": 2, "tokens_per_s": 41.5}

``blocks`` is the half-open range [start, end) of transformer blocks the peer holds; ``n_layers``
is the model's total, so the map can show uncovered blocks at either end (pipeline/server.py's
``announcement()`` sends exactly this, plus fields the page ignores).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from coordinator.checkpoint_routes import CHECKPOINTS, checkpoint_store_info
from coordinator.checkpoints import (Backend, CheckpointError, CheckpointStore, Manifest, list_runs,
                                     open_backend)
from coordinator.offenses import BAN_AFTER, offense_summary
from coordinator.registry import ALL_STATES, MembershipRegistry
from coordinator.store import Store, recent_events

log = logging.getLogger("lowband.coordinator.status")

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())
VERSION = "0.1.0"
SERVING_STATES = ("active", "suspect")   # peers whose reported serve/link stats are still current
MAX_CHECKPOINTS = 50                     # newest checkpoints listed on the page
MAX_MODEL_BLOCKS = 4096                  # bound on a peer-claimed block range (untrusted input)

STATUS_STORE = web.AppKey("status_store", Store)
STATUS_REGISTRY = web.AppKey("status_registry", MembershipRegistry)
MANIFEST_CACHE = web.AppKey("status_manifest_cache", dict)

# Value of each section when its source is missing or fails.
EMPTY: dict[str, Any] = {"coordinator": {}, "counts": {}, "peers": [], "events": [], "runs": [],
                         "inference": [], "links": {"peers": [], "rows": {}}, "checkpoints": [],
                         "offenses": {"ban_after": None, "peers": [], "bans": []}}


# -- sections derived from the membership table -------------------------------------------------
def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int:
    n = _num(value)
    return int(n) if n is not None and n >= 0 else 0


def _serve_entries(serve: Any) -> list[dict]:
    """The well-formed entries of a peer's ``stats.serve`` (peers are not trusted to be tidy)."""
    entries = serve if isinstance(serve, list) else [serve]
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("model"), str) or not e["model"]:
            continue
        blocks = e.get("blocks")
        if (not isinstance(blocks, list) or len(blocks) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
                or not 0 <= blocks[0] < blocks[1] <= MAX_MODEL_BLOCKS):
            continue
        n_blocks = e.get("n_layers")
        if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or not 0 < n_blocks <= MAX_MODEL_BLOCKS:
            n_blocks = None
        out.append({"model": e["model"][:128], "blocks": blocks, "n_blocks": n_blocks,
                    "sessions": _count(e.get("sessions")),
                    "tokens_per_s": max(0.0, _num(e.get("tokens_per_s")) or 0.0)})
    return out


def _gaps(coverage: list[int]) -> list[list[int]]:
    """Half-open [start, end) ranges of blocks nobody serves."""
    gaps: list[list[int]] = []
    for i, n in enumerate(coverage):
        if n == 0:
            if gaps and gaps[-1][1] == i:
                gaps[-1][1] = i + 1
            else:
                gaps.append([i, i + 1])
    return gaps


def inference_section(peers: list[dict]) -> list[dict]:
    """Per model: which live peers serve which blocks, the per-block coverage (active servers
    only; a suspect server is listed but may be gone), the gaps, sessions and tokens/s."""
    models: dict[str, dict] = {}
    for p in peers:
        if p["state"] not in SERVING_STATES or not isinstance(p.get("stats"), dict):
            continue
        for e in _serve_entries(p["stats"].get("serve")):
            m = models.setdefault(e["model"], {"model": e["model"], "n_blocks": 0, "servers": []})
            m["n_blocks"] = max(m["n_blocks"], e["n_blocks"] or 0, e["blocks"][1])
            m["servers"].append({"peer_id": p["peer_id"], "state": p["state"],
                                 "blocks": e["blocks"], "sessions": e["sessions"],
                                 "tokens_per_s": e["tokens_per_s"]})
    result = []
    for name in sorted(models):
        m = models[name]
        coverage = [0] * m["n_blocks"]
        for s in m["servers"]:
            if s["state"] == "active":
                for i in range(*s["blocks"]):
                    coverage[i] += 1
        m["servers"].sort(key=lambda s: (s["blocks"][0], s["blocks"][1], s["peer_id"]))
        gaps = _gaps(coverage)
        result.append({**m, "coverage": coverage, "gaps": gaps, "complete": not gaps,
                       "sessions": sum(s["sessions"] for s in m["servers"]),
                       "tokens_per_s": round(sum(s["tokens_per_s"] for s in m["servers"]), 3)})
    return result


def links_section(peers: list[dict]) -> dict:
    """The measured link matrix: each live peer's row (RTT, bandwidth) to the peers it knows."""
    live = [p for p in peers if p["state"] in SERVING_STATES]
    ids = {p["peer_id"] for p in live}
    rows: dict[str, dict] = {}
    for p in live:
        links = p.get("stats", {}).get("links") if isinstance(p.get("stats"), dict) else None
        if not isinstance(links, dict):
            continue
        row = {}
        for dst, link in links.items():
            if dst in ids and isinstance(link, dict):
                row[dst] = {"rtt_s": _num(link.get("rtt_s")), "ping_rtt_s": _num(link.get("ping_rtt_s")),
                            "bandwidth_Bps": _num(link.get("bandwidth_Bps"))}
        rows[p["peer_id"]] = row
    return {"peers": [p["peer_id"] for p in live], "rows": rows}


# -- training runs (tables of coordinator/runs.py, read-only) -------------------------------------
MAX_HISTORY = 500   # outer steps plotted per run


def _runs_rows(conn: sqlite3.Connection, live: set[str]) -> list[dict]:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'run_reports'").fetchone() is None:
        return []  # the runs component is not installed in this coordinator
    runs = []
    for r in conn.execute("SELECT name, config, generation, step FROM runs ORDER BY created_at").fetchall():
        key = (r["name"], r["generation"])
        history = [dict(h) for h in conn.execute(
            """SELECT step, AVG(json_extract(metrics, '$.loss')) AS loss,
                      SUM(json_extract(metrics, '$.tokens')) AS tokens,
                      SUM(json_extract(metrics, '$.bytes_sent')) AS bytes_sent,
                      AVG(json_extract(metrics, '$.compute_utilization')) AS utilization,
                      COUNT(*) AS reports, MAX(ts) AS ts
               FROM run_reports WHERE run = ? AND generation = ?
               GROUP BY step ORDER BY step DESC LIMIT ?""", (*key, MAX_HISTORY))][::-1]
        tokens, wire = conn.execute(
            "SELECT SUM(json_extract(metrics, '$.tokens')), SUM(json_extract(metrics, '$.bytes_sent')) "
            "FROM run_reports WHERE run = ? AND generation = ?", key).fetchone()
        window = conn.execute("SELECT participants FROM run_windows WHERE run = ? AND generation = ? "
                              "AND closed_at IS NOT NULL ORDER BY step DESC LIMIT 1", key).fetchone()
        training = [m[0] for m in conn.execute(
            "SELECT peer_id FROM run_members WHERE run = ? AND active = 1", (r["name"],))]
        agreement = None
        if history:
            last = history[-1]["step"]
            hashes: dict[str, list[str]] = {}
            for h in conn.execute("SELECT state_hash, peer_id FROM run_reports WHERE run = ? AND "
                                  "generation = ? AND step = ? ORDER BY peer_id", (*key, last)):
                hashes.setdefault(h[0], []).append(h[1])
            agreement = {"step": last, "agreed": len(hashes) == 1, "hashes": hashes}
        live_training = [p for p in training if p in live]
        runs.append({"run_id": r["name"], "config": json.loads(r["config"]),
                     "generation": r["generation"], "outer_step": r["step"],
                     "state": "training" if live_training else "idle",
                     "members_training": len(live_training),
                     # stored as [peer_id, incarnation] pairs
                     "participants": [p for p, _ in json.loads(window[0])] if window and window[0] else [],
                     "tokens": tokens or 0, "bytes_on_wire": wire or 0,
                     "utilization": history[-1]["utilization"] if history else None,
                     "hash_agreement": agreement, "history": history})
    return runs


# -- checkpoints ----------------------------------------------------------------------------------
def _checkpoint_rows(backend: Backend, cache: dict) -> list[dict]:
    """Newest checkpoints of every run in the coordinator's checkpoint store. Manifests are
    immutable once published, so each is read once and cached by (run, step)."""
    found = []
    for run in list_runs(backend):
        store = CheckpointStore(backend, run)
        found += [(run, step, store) for step in store.list()[-MAX_CHECKPOINTS:]]
    rows = []
    for run, step, store in found:
        key = (run, step)
        if key not in cache:
            m: Manifest = store.load_manifest(step)
            cache[key] = {"run": run, "step": step, "size_bytes": m.nbytes, "state_hash": m.state_hash,
                          "created": m.created, "tensors": len(m.tensors)}
        rows.append(cache[key])
    for key in set(cache) - {(run, step) for run, step, _ in found}:
        del cache[key]  # pruned checkpoints
    rows.sort(key=lambda r: (r["created"], r["step"]), reverse=True)
    return rows[:MAX_CHECKPOINTS]


# -- assembly -------------------------------------------------------------------------------------
async def assemble_status(app: web.Application) -> dict:
    """Every section of /api/status; one failing source empties only its own section."""
    registry, store = app[STATUS_REGISTRY], app[STATUS_STORE]
    errors: dict[str, str] = {}

    async def guarded(name: str, compute: Callable[[], Any]) -> Any:
        try:
            value = compute()
            return await value if inspect.isawaitable(value) else value
        except Exception as e:  # a broken source must not take the page down
            log.warning("status section %s failed: %s: %s", name, type(e).__name__, e,
                        exc_info=not isinstance(e, (OSError, CheckpointError)))
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            return EMPTY[name] if name in EMPTY else None

    peers = await guarded("peers", registry.peers)
    now = time.time()
    counts = Counter(p["state"] for p in peers)
    status = {
        "coordinator": {
            "version": VERSION,
            "time": now,
            "started_at": registry.started_at,
            "uptime_s": round(now - registry.started_at, 3),
            "heartbeat_interval": registry.timing.heartbeat_interval,
            "peer_timeout": registry.timing.peer_timeout,
            "grace_until": registry.grace_until,
        },
        "counts": {s: counts.get(s, 0) for s in ALL_STATES},
        "peers": peers,
        "events": await guarded("events", lambda: store.run(recent_events, 20)),
    }

    status["inference"] = await guarded("inference", lambda: inference_section(peers))
    status["links"] = await guarded("links", lambda: links_section(peers))
    backend = app.get(CHECKPOINTS) or open_backend(store.data_dir)
    status["checkpoints"] = await guarded("checkpoints", lambda: asyncio.to_thread(
        _checkpoint_rows, backend, app[MANIFEST_CACHE]))
    status["checkpoint_store"] = checkpoint_store_info(app)
    live = {p["peer_id"] for p in peers if p["state"] in SERVING_STATES}
    status["runs"] = await guarded("runs", lambda: store.run(_runs_rows, live))
    offenses = await guarded("offenses", lambda: store.run(offense_summary))
    status["offenses"] = {**offenses, "ban_after": app.get(BAN_AFTER)}
    status["section_errors"] = errors
    return status


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """One of the page's own files. A fixed list rather than ``add_static``: a request path never
    reaches the filesystem (aiohttp's static route answers a 300-character name with a 500)."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name)


async def api_status(request: web.Request) -> web.Response:
    return web.json_response(await assemble_status(request.app))


def setup_status(app: web.Application, store: Store, registry: MembershipRegistry) -> None:
    app[STATUS_STORE] = store
    app[STATUS_REGISTRY] = registry
    app[MANIFEST_CACHE] = {}
    app.router.add_get("/", index)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/static/{name}", static_file)
