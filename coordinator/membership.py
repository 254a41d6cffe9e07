"""Membership routes (/api/join, /api/heartbeat, /api/leave, /api/peers), inference-offense
reports (/api/inference/offenses) and the failure detector that demotes silent peers in the
background."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3

from aiohttp import web

from coordinator.registry import ALL_STATES, LIVE_STATES, MembershipRegistry, PeerMeta
from coordinator.store import add_event
from coordinator.validation import (PEER_ID_RE, ApiError, RateLimited, bad, check_signed_request,
                                    check_token, get_address, get_object, get_public_key, get_str,
                                    read_json_object)

log = logging.getLogger("lowband.coordinator.membership")

ROLE_RE = re.compile(r"^[a-z0-9_.:\-]{1,64}$")
MAX_BODY = 128 * 1024
MAX_META = 8 * 1024
MAX_STATS = 64 * 1024
MAX_ROLES = 16

REGISTRY = web.AppKey("membership_registry", MembershipRegistry)
TOKEN = web.AppKey("swarm_token", str)
MAX_SKEW = web.AppKey("max_clock_skew", float)
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


async def _signed_request(request: web.Request, action: str) -> tuple[dict, str]:
    """Token, body and signature checks common to heartbeat and leave."""
    check_token(request, request.app[TOKEN])
    body = await read_json_object(request, MAX_BODY)
    peer_id = get_str(body, "peer_id", max_len=40, pattern=PEER_ID_RE)
    public_key = await request.app[REGISTRY].public_key(peer_id)
    if public_key is None:
        raise ApiError(404, "unknown_peer", "peer is not registered; join first")
    check_signed_request(request, body, action, public_key, request.app[MAX_SKEW])
    return body, peer_id


async def join(request: web.Request) -> web.Response:
    check_token(request, request.app[TOKEN])
    body = await read_json_object(request, MAX_BODY)
    public_key = get_public_key(body)
    peer_id = check_signed_request(request, body, "join", public_key, request.app[MAX_SKEW])
    address = get_address(body)
    meta = parse_meta(get_object(body, "meta", max_bytes=MAX_META, default={}))
    registry = request.app[REGISTRY]
    others = await registry.store.run(_count_live_others, peer_id)
    if others >= request.app[MAX_PEERS]:
        raise RateLimited(f"the swarm is full: {others} live peers (limit {request.app[MAX_PEERS]}); "
                          "retry once some leave", registry.timing.peer_timeout, "too_many_peers")
    result = await registry.join(peer_id, public_key, address, meta)
    log.info("join %s at %s (incarnation %d)", peer_id[:12], address, result["incarnation"])
    return await _membership_answer(registry, peer_id, result["state"], fresh=True,
                                    incarnation=result["incarnation"])


def _count_live_others(conn: sqlite3.Connection, peer_id: str) -> int:
    """Live peers other than ``peer_id`` (a rejoin does not count against the peer cap)."""
    marks = ",".join("?" * len(LIVE_STATES))
    return conn.execute(f"SELECT COUNT(*) FROM peers WHERE state IN ({marks}) AND peer_id != ?",
                        (*LIVE_STATES, peer_id)).fetchone()[0]


async def heartbeat(request: web.Request) -> web.Response:
    body, peer_id = await _signed_request(request, "heartbeat")
    stats = get_object(body, "stats", max_bytes=MAX_STATS, default={})
    registry = request.app[REGISTRY]
    state = await registry.heartbeat(peer_id, stats)
    return await _membership_answer(registry, peer_id, state, fresh=False,
                                    known_view=body.get("view"))


async def leave(request: web.Request) -> web.Response:
    _, peer_id = await _signed_request(request, "leave")
    await request.app[REGISTRY].leave(peer_id)
    log.info("leave %s", peer_id[:12])
    return web.json_response({"peer_id": peer_id, "state": "left"})


async def inference_offense(request: web.Request) -> web.Response:
    """POST /api/inference/offenses {peer_id, public_key, timestamp, signature, offender, detail}:
    an inference client's spot check (pipeline/client.py) caught server ``offender`` returning
    wrong activations. Signed with the reporter's own key, sent along because clients never join.
    Logged as an ``inference_offense`` event (status page); nothing is banned on it, since any
    token holder can mint keys and one report is one client's word."""
    check_token(request, request.app[TOKEN])
    body = await read_json_object(request, MAX_BODY)
    reporter = check_signed_request(request, body, "inference_offense", get_public_key(body),
                                    request.app[MAX_SKEW])
    offender = get_str(body, "offender", max_len=40, pattern=PEER_ID_RE)
    detail = get_object(body, "detail", max_bytes=MAX_META, default={})
    await request.app[REGISTRY].store.run(add_event, "inference_offense", offender,
                                          {**detail, "reporter": reporter})
    log.warning("inference offense: %s reported by client %s", offender[:12], reporter[:12])
    return web.json_response({"recorded": True})


async def list_peers(request: web.Request) -> web.Response:
    """GET /api/peers[?state=active,suspect] -> {"peers": [...]}."""
    wanted = request.query.get("state")
    states = tuple(wanted.split(",")) if wanted else ALL_STATES
    unknown = set(states) - set(ALL_STATES)
    if unknown:
        raise bad(f"unknown state(s) {sorted(unknown)}; known: {list(ALL_STATES)}")
    return web.json_response({"peers": await request.app[REGISTRY].peers(states)})


async def _failure_detector(registry: MembershipRegistry) -> None:
    period = max(0.05, min(1.0, registry.timing.peer_timeout / 10))
    while True:
        await registry.clock.sleep(period)
        try:
            for peer_id, state in await registry.sweep():
                log.info("peer %s is now %s", peer_id[:12], state)
        except Exception:  # a failed sweep must not stop failure detection for good
            log.exception("failure-detector sweep failed")


def setup_membership(app: web.Application, registry: MembershipRegistry, token: str,
                     max_clock_skew: float, max_peers: int = DEFAULT_MAX_PEERS) -> None:
    app[REGISTRY] = registry
    app[TOKEN] = token
    app[MAX_SKEW] = max_clock_skew
    app[MAX_PEERS] = max_peers
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
