"""Membership routes (/api/join, /api/heartbeat, /api/leave, /api/peers), inference-offense
reports (/api/inference/offenses) and the failure detector that demotes silent peers in the
background. Requests are authenticated by coordinator/auth.py (signed headers); bodies carry
only what the route is about (peer id, key and signature fields, if sent, are ignored)."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3

from aiohttp import web

from coordinator.auth import AUTH, require_role
from coordinator.registry import ALL_STATES, LIVE_STATES, MembershipRegistry, PeerMeta
from coordinator.store import add_event
from coordinator.validation import (PEER_ID_RE, ApiError, RateLimited, bad, get_address, get_object,
                                    get_str, read_json_object)

log = logging.getLogger("lowband.coordinator.membership")

ROLE_RE = re.compile(r"^[a-z0-9_.:\-]{1,64}$")
MAX_BODY = 128 * 1024
MAX_META = 8 * 1024
MAX_STATS = 64 * 1024
MAX_ROLES = 16

REGISTRY = web.AppKey("membership_registry", MembershipRegistry)
MAX_PEERS = web.AppKey("max_peers", int)
DEFAULT_MAX_PEERS = 10_000  # live peers; the scale target is 1,000


def parse_meta(meta: dict) -> PeerMeta:
    """Pull the well-known fields out of a join's ``meta``; the rest is kept as-is."""
    extra = {k: v for k, v in meta.items() if k not in ("device", "memory", "roles", "throughput")}
    device = meta.get("device")
    if device is not None and (not isinstance(device, str) or not 0 < len(device) <= 64):
        raise bad("meta.device must be a string of 1..64 characters")
    memory = meta.get("memory")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory < 0):
        raise bad("meta.memory must be a non-negative integer (bytes)")
    roles = meta.get("roles", [])
    if (not isinstance(roles, list) or len(roles) > MAX_ROLES
            or not all(isinstance(r, str) and ROLE_RE.match(r) for r in roles)):
        raise bad(f"meta.roles must be a list of at most {MAX_ROLES} names matching {ROLE_RE.pattern}")
    throughput = meta.get("throughput")
    if throughput is not None and (isinstance(throughput, bool)
                                   or not isinstance(throughput, (int, float)) or throughput < 0):
        raise bad("meta.throughput must be a non-negative number")
    return PeerMeta(device=device, memory=memory, roles=roles,
                    throughput=None if throughput is None else float(throughput), extra=extra)


async def _membership_answer(registry: MembershipRegistry, peer_id: str, state: str, *,
                             fresh: bool, known_view: object = None,
                             **extra: object) -> web.Response:
    """{peer_id, state, heartbeat_interval, peer_timeout, view, **extra, peers: [live view]}.
    ``fresh``: joins wait for a view that includes the joiner; heartbeats may get the previous
    view while a newer one is built (one heartbeat of lag during churn). ``peers`` is left out
    when the peer says it holds view ``known_view`` and that is still the current one: at 1,000 peers the list is ~110 kB, sent 1,000 times a second otherwise. The
    view is spliced in already encoded (it is shared by every answer until membership changes)."""
    view_id, view = await registry.live_view(fresh=fresh)
    head = json.dumps({"peer_id": peer_id, "state": state,
                       "heartbeat_interval": registry.timing.heartbeat_interval,
                       "peer_timeout": registry.timing.peer_timeout, "view": view_id,
                       **extra}).encode()
    if known_view == view_id:
        return web.Response(body=head, content_type="application/json")
    body = b"".join((head[:-1], b', "peers": ', view, b"}"))
    return web.Response(body=body, content_type="application/json")


async def _member_request(request: web.Request) -> tuple[dict, str]:
    """The body and peer id of a heartbeat or leave (any admitted identity; the registry
    answers 404 ``unknown_peer`` for one that never joined)."""
    principal = require_role(request)
    return await read_json_object(request, MAX_BODY), principal.peer_id


async def join(request: web.Request) -> web.Response:
    principal = require_role(request, "train", "serve")
    peer_id, public_key = principal.peer_id, principal.public_key
    body = await read_json_object(request, MAX_BODY)
    address = get_address(body)
    meta = parse_meta(get_object(body, "meta", max_bytes=MAX_META, default={}))
    registry = request.app[REGISTRY]
    others = await registry.store.run(_count_live_others, peer_id)
    if others >= request.app[MAX_PEERS]:
        raise RateLimited(f"the swarm is full: {others} live peers (limit {request.app[MAX_PEERS]}); "
                          "retry once some leave", registry.timing.peer_timeout, "too_many_peers")
    result = await registry.join(peer_id, public_key, address, meta, observed=request.remote)
    log.info("join %s at %s (incarnation %d)", peer_id[:12], address, result["incarnation"])
    # ``observed``: the joiner's address as we see it (its default --announce host, issue 15)
    return await _membership_answer(registry, peer_id, result["state"], fresh=True,
                                    incarnation=result["incarnation"], observed=request.remote)


def _count_live_others(conn: sqlite3.Connection, peer_id: str) -> int:
    """Live peers other than ``peer_id`` (a rejoin does not count against the peer cap)."""
    marks = ",".join("?" * len(LIVE_STATES))
    return conn.execute(f"SELECT COUNT(*) FROM peers WHERE state IN ({marks}) AND peer_id != ?",
                        (*LIVE_STATES, peer_id)).fetchone()[0]


async def heartbeat(request: web.Request) -> web.Response:
    """Liveness and stats; the answer also lists ``revoked`` identities (their credentials are
    still unexpired: peers cut them from the mesh)."""
    body, peer_id = await _member_request(request)
    stats = get_object(body, "stats", max_bytes=MAX_STATS, default={})
    registry = request.app[REGISTRY]
    state = await registry.heartbeat(peer_id, stats)
    return await _membership_answer(registry, peer_id, state, fresh=False,
                                    known_view=body.get("view"),
                                    revoked=await request.app[AUTH].revoked_list())


async def leave(request: web.Request) -> web.Response:
    _, peer_id = await _member_request(request)
    await request.app[REGISTRY].leave(peer_id)
    log.info("leave %s", peer_id[:12])
    return web.json_response({"peer_id": peer_id, "state": "left"})


async def inference_offense(request: web.Request) -> web.Response:
    """POST /api/inference/offenses {offender, detail} from an identity with role client or
    serve: an inference client's spot check (pipeline/client.py) caught server ``offender``
    returning wrong activations. Logged as an ``inference_offense`` event (status page); nothing
    is banned on it, since identities may be free (open swarm) and one report is one client's word."""
    reporter = require_role(request, "client", "serve").peer_id
    body = await read_json_object(request, MAX_BODY)
    offender = get_str(body, "offender", max_len=40, pattern=PEER_ID_RE)
    detail = get_object(body, "detail", max_bytes=MAX_META, default={})
    await request.app[REGISTRY].store.run(add_event, "inference_offense", offender,
                                          {**detail, "reporter": reporter})
    log.warning("inference offense: %s reported by client %s", offender[:12], reporter[:12])
    return web.json_response({"recorded": True})


# /api/peers fields only an operator sees: under open admission every key is "admitted", and
# these say where a peer really connects from and what the probe found there (docs/security.md
# §Resource limits); what a peer published itself (address, meta, stats) stays visible.
OPERATOR_ONLY_FIELDS = ("observed", "probe_error")
MAX_PEERS_PAGE = 10_000


def _query_int(request: web.Request, key: str, default: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= hi:
        raise bad(f"query {key!r} must be an integer in 0..{hi}")
    return int(raw)


async def list_peers(request: web.Request) -> web.Response:
    """GET /api/peers[?state=active,suspect][&offset=N&limit=M] -> {"peers": [...], "total",
    "offset", "limit"} (any admitted identity; a page in join order, at most MAX_PEERS_PAGE
    rows; without role operator the rows leave out OPERATOR_ONLY_FIELDS)."""
    principal = require_role(request)
    wanted = request.query.get("state")
    states = tuple(wanted.split(",")) if wanted else ALL_STATES
    unknown = set(states) - set(ALL_STATES)
    if unknown:
        raise bad(f"unknown state(s) {sorted(unknown)}; known: {list(ALL_STATES)}")
    offset = _query_int(request, "offset", 0, 10**9)
    limit = _query_int(request, "limit", MAX_PEERS_PAGE, MAX_PEERS_PAGE)
    rows, total = await request.app[REGISTRY].page(offset, limit, states)
    if "operator" not in principal.roles:
        rows = [{k: v for k, v in row.items() if k not in OPERATOR_ONLY_FIELDS} for row in rows]
    return web.json_response({"peers": rows, "total": total, "offset": offset, "limit": limit})


async def _failure_detector(registry: MembershipRegistry) -> None:
    period = max(0.05, min(1.0, registry.timing.peer_timeout / 10))
    while True:
        await registry.clock.sleep(period)
        try:
            for peer_id, state in await registry.sweep():
                log.info("peer %s is now %s", peer_id[:12], state)
        except Exception:  # a failed sweep must not stop failure detection for good
            log.exception("failure-detector sweep failed")


def setup_membership(app: web.Application, registry: MembershipRegistry,
                     max_peers: int = DEFAULT_MAX_PEERS) -> None:
    """Register the membership routes (after setup_auth: they read ``request[PRINCIPAL]``)."""
    app[REGISTRY] = registry
    app[MAX_PEERS] = max_peers

    async def revoked(peer_id: str) -> None:  # a revoked member leaves, as a banned one does
        try:
            await registry.leave(peer_id)
        except ApiError:  # never joined
            pass
    app[AUTH].revocation_listeners.append(revoked)
    app.router.add_post("/api/join", join)
    app.router.add_post("/api/heartbeat", heartbeat)
    app.router.add_post("/api/leave", leave)
    app.router.add_get("/api/peers", list_peers)
    app.router.add_post("/api/inference/offenses", inference_offense)

    async def detector_ctx(app: web.Application):
        task = asyncio.create_task(_failure_detector(registry))
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    app.cleanup_ctx.append(detector_ctx)
