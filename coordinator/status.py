"""Status routes: the HTML page at / (static files, no CDN) and GET /api/status, which the page
polls every second, `peer status` prints and /metrics reads.

/api/status is assembled from named *sections*. Two views (issue 14 item 5): an unauthenticated
request (``request[PRINCIPAL]`` None, set by the auth middleware) gets the *public* view, which
holds no peer addresses (announced or observed), no probe errors, no peer metadata beyond
device/memory/roles, no run configs, no state hashes and no event details that name addresses; a
principal with role ``operator`` gets everything (``"view": "operator"``).

Paging: ``peers`` (join order), ``events`` (newest first) and ``runs`` (creation order) are
returned a page at a time: query ``peers_offset``/``peers_limit`` (and ``events_``, ``runs_``),
defaults and caps in :data:`PAGE_DEFAULTS`; ``pages`` says {offset, limit, total} per list. The
``links`` matrix covers the live peers of the current page; ``counts``, ``inference`` and the
tiles are computed over everyone. Each section is computed on its own and a failing
or missing source yields that section's empty value (plus a line in ``section_errors``), never an
error answer: the page must keep working while one part of the coordinator is broken.

Sections and their JSON shapes (documented here because peers and other route groups fill them):

``coordinator``  {version, time, started_at, uptime_s, heartbeat_interval, peer_timeout, grace_until}
``counts``       {state: number of peers} for every state (joining active suspect dead left)
``peers``        [{peer_id, address, state, device, memory, roles, throughput, meta, stats,
                   joined_at, last_heartbeat, heartbeat_age_s, state_since, incarnation,
                   observed, reachable, probe_rtt_s, probe_error, probed_at}] -- ``reachable``:
                   null until the join's dial-back probe ends (coordinator/reachability.py)
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
``links``        {peers: [peer_id], rows: {src: {dst: {rtt_s, ping_rtt_s, bandwidth_Bps, path}}}}
                   -- each live peer's row of the measured link matrix, from heartbeat stats
``checkpoints``  [{run, step, size_bytes, state_hash, created, tensors}], newest first
``offenses``     {ban_after, peers: [{peer_id, reports, reporters, codes, last: {ts, run, step,
                   reporter, code, detail}, banned}], bans: [{peer_id, ts, reason, source}]}
                   -- poisoned-update reports and bans (coordinator/offenses.py)
``reachability`` {reachable, unreachable, unprobed}: live peers by dial-back outcome
``pages``        {peers|events|runs: {offset, limit, total}}
``view``         "public" | "operator"
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
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from aiohttp import web

from coordinator.checkpoint_routes import CHECKPOINTS, checkpoint_store_info
from coordinator.checkpoints import (Backend, CheckpointError, CheckpointStore, Manifest, list_runs,
                                     open_backend)
from coordinator.offenses import BAN_AFTER, offense_summary
from coordinator.registry import ALL_STATES, MembershipRegistry
from coordinator.store import Store
from coordinator.validation import PEER_ID_RE, PRINCIPAL, bad

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
EMPTY: dict[str, Any] = {"coordinator": {}, "counts": {}, "reachability": {}, "peers": ([], 0),
                         "events": ([], 0), "runs": ([], 0),
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


# How a link is connected, as a peer reports it in ``stats.links[dst]["path"]`` (issue 15: direct
# dial, connection reversal, hole punch, or through a relay); anything else is left out.
LINK_PATHS = frozenset({"direct", "reversed", "punched", "relayed"})


def links_section(peers: list[dict]) -> dict:
    """The measured link matrix: each live peer's row (RTT, bandwidth, path) to the peers it
    knows."""
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
                            "bandwidth_Bps": _num(link.get("bandwidth_Bps")),
                            "path": link["path"] if link.get("path") in LINK_PATHS else None}
        rows[p["peer_id"]] = row
    return {"peers": [p["peer_id"] for p in live], "rows": rows}


# -- training runs (tables of coordinator/runs.py, read-only) -------------------------------------
MAX_HISTORY = 500   # outer steps plotted per run


def _runs_rows(conn: sqlite3.Connection, live: set[str], offset: int = 0,
               limit: int = -1) -> tuple[list[dict], int]:
    """One page of runs (creation order; ``limit`` -1: all) and the number of runs."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'run_reports'").fetchone() is None:
        return [], 0  # the runs component is not installed in this coordinator
    (total,) = conn.execute("SELECT COUNT(*) FROM runs").fetchone()
    runs = []
    for r in conn.execute("SELECT name, config, generation, step FROM runs ORDER BY created_at, name "
                          "LIMIT ? OFFSET ?", (limit, offset)).fetchall():
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
    return runs, total


def _events_page(conn: sqlite3.Connection, offset: int, limit: int) -> tuple[list[dict], int]:
    (total,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
    rows = conn.execute("SELECT ts, peer_id, kind, detail FROM events ORDER BY id DESC "
                        "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
    return [{"ts": r["ts"], "peer_id": r["peer_id"], "kind": r["kind"],
             "detail": json.loads(r["detail"])} for r in rows], total


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


# -- views and pages ------------------------------------------------------------------------------
# list -> (default limit, largest limit a request may ask for)
PAGE_DEFAULTS = {"peers": (200, 1000), "events": (20, 500), "runs": (20, 100)}
ALL = -1  # SQLite's "no limit"


@dataclass(frozen=True)
class Pages:
    """(offset, limit) per paged list; limit ALL = everything (internal callers only)."""

    peers: tuple[int, int] = (0, PAGE_DEFAULTS["peers"][0])
    events: tuple[int, int] = (0, PAGE_DEFAULTS["events"][0])
    runs: tuple[int, int] = (0, PAGE_DEFAULTS["runs"][0])

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> "Pages":
        """Parse ``<list>_offset`` / ``<list>_limit``; ApiError 400 on anything else."""
        pages = {}
        for name, (default, cap) in PAGE_DEFAULTS.items():
            offset = _int_param(query, f"{name}_offset", 0, 0, 10**9)
            limit = _int_param(query, f"{name}_limit", default, 0, cap)
            pages[name] = (offset, limit)
        return cls(**pages)


DIGITS = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() accepts "²", which int() refuses


def _int_param(query: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise bad(f"query parameter {key!r} must be an integer in [{low}, {high}]")
    return int(raw)


# Peer fields the public view keeps; stats keep only the measured link rows (numbers).
PUBLIC_PEER_FIELDS = ("peer_id", "state", "device", "memory", "roles", "throughput", "joined_at",
                      "last_heartbeat", "heartbeat_age_s", "state_since", "incarnation",
                      "reachable", "probe_rtt_s", "probed_at")
# Event details that may name addresses (or carry a probe error that does).
PRIVATE_DETAIL = frozenset({"address", "observed", "announced", "error"})


def public_view(status: dict) -> dict:
    """The /api/status an unauthenticated caller sees (see the module docstring)."""
    out = dict(status)
    out["view"] = "public"
    out["peers"] = [{**{k: p.get(k) for k in PUBLIC_PEER_FIELDS},
                     "stats": {"links": _links_of(p)}} for p in status["peers"]]
    out["events"] = [{**e, "detail": {k: v for k, v in e["detail"].items() if k not in PRIVATE_DETAIL}
                      if isinstance(e.get("detail"), dict) else {}} for e in status["events"]]
    out["runs"] = [_public_run(r) for r in status["runs"]]
    out["checkpoints"] = [{k: v for k, v in c.items() if k != "state_hash"}
                          for c in status["checkpoints"]]
    out["section_errors"] = {name: "unavailable" for name in status["section_errors"]}
    return out


def _links_of(peer: dict) -> dict:
    """A peer's measured links as published: peer-id keys and the numbers the page reads only
    (the row is peer-supplied; the public view repeats no free-form text from it)."""
    stats = peer.get("stats")
    links = stats.get("links") if isinstance(stats, dict) else None
    if not isinstance(links, dict):
        return {}
    return {dst: {k: _num(link.get(k)) for k in ("rtt_s", "ping_rtt_s", "bandwidth_Bps")}
            for dst, link in links.items()
            if isinstance(dst, str) and PEER_ID_RE.match(dst) and isinstance(link, dict)}


def _public_run(run: dict) -> dict:
    out = {k: v for k, v in run.items() if k not in ("config", "hash_agreement")}
    agreement = run.get("hash_agreement")
    if agreement is not None:  # how many peers hold each distinct hash, not the hashes
        out["hash_agreement"] = {"step": agreement["step"], "agreed": agreement["agreed"],
                                 "groups": sorted((len(p) for p in agreement["hashes"].values()),
                                                  reverse=True)}
    else:
        out["hash_agreement"] = None
    return out


def is_operator(request: web.Request) -> bool:
    principal = request.get(PRINCIPAL)
    return principal is not None and "operator" in (getattr(principal, "roles", None) or ())


# -- assembly -------------------------------------------------------------------------------------
async def assemble_status(app: web.Application, pages: Pages | None = None) -> dict:
    """Every section of /api/status (the operator view); one failing source empties only its own
    section. ``pages``: which page of each list (default: the first of each)."""
    registry, store = app[STATUS_REGISTRY], app[STATUS_STORE]
    pages = pages or Pages()
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

    page_info = {}

    async def paged(name: str, compute: Callable[[], Any]) -> list:
        offset, limit = getattr(pages, name)
        rows, total = await guarded(name, compute) or ([], 0)
        page_info[name] = {"offset": offset, "limit": limit, "total": total}
        return rows

    peers = await paged("peers", lambda: registry.page(*pages.peers))
    serving, live = await guarded("inference", lambda: registry.serving(SERVING_STATES)) or ([], set())
    counts = await guarded("counts", registry.counts)
    now = time.time()
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
        "reachability": await guarded("reachability", registry.reachability),
        "peers": peers,
        "events": await paged("events", lambda: store.run(_events_page, *pages.events)),
    }

    status["inference"] = await guarded("inference", lambda: inference_section(serving))
    status["links"] = await guarded("links", lambda: links_section(peers))
    backend = app.get(CHECKPOINTS) or open_backend(store.data_dir)
    status["checkpoints"] = await guarded("checkpoints", lambda: asyncio.to_thread(
        _checkpoint_rows, backend, app[MANIFEST_CACHE]))
    status["checkpoint_store"] = checkpoint_store_info(app)
    status["runs"] = await paged("runs", lambda: store.run(_runs_rows, live, *pages.runs))
    offenses = await guarded("offenses", lambda: store.run(offense_summary))
    status["offenses"] = {**offenses, "ban_after": app.get(BAN_AFTER)}
    status["pages"] = page_info
    status["view"] = "operator"
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
    status = await assemble_status(request.app, Pages.from_query(request.query))
    return web.json_response(status if is_operator(request) else public_view(status))


def setup_status(app: web.Application, store: Store, registry: MembershipRegistry) -> None:
    app[STATUS_STORE] = store
    app[STATUS_REGISTRY] = registry
    app[MANIFEST_CACHE] = {}
    app.router.add_get("/", index)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/static/{name}", static_file)
