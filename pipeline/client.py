"""InferenceClient: generate text with a model split over stage servers.

Discovery: servers announce ``{model, blocks: [a, b], ...}`` in their heartbeat stats; the
client reads them from the coordinator. Routing: a shortest path over block boundaries
0..n_layers where a server holding [a, b) offers an edge x -> y for every a <= x < y <= b,
costing its measured round trip (``PeerHost.link_stats`` / a ping) plus a per-hop overhead —
the chain of servers covering every block with the least latency.

The client drives the chain (as in Petals, Borzunov et al. 2023): it sends each hop its input
and gets the hop's output back, and keeps every hop's inputs (token ids for block 0, hidden
states after). Failover: when a hop fails (connection lost, timeout, lost session), the client
routes that hop's blocks over the remaining servers, replays the hop's stored inputs through
them chunk by chunk exactly as first sent (rebuilding their KV caches at the right positions,
bit-identically), and retries the step. Greedy output is therefore identical to a run without
failure, and to ``pipeline.generate`` in one process (activations travel in fp32 by default).

A batch of prompts is one session of several rows, left-padded as in ``pipeline.generate``
(``arows``; ``generate`` with a list). For greedy decoding the last server returns each row's
argmax token id rather than its fp32 logits (B ints instead of B x vocab floats: 1.5 MB per
step at batch 8 for SmolLM2, several round trips of TCP slow start on a long link).

Spot checks (``spot_check=P``, off by default): after each hop's reply, with probability P the
client replays that hop's inputs so far plus this step's input on another server holding the
whole span, in a fresh session from position 0 (its KV cache must be built from the same
prefix), and compares the step's output (hidden states or logits; greedy token ids exactly).
Outputs agree when max|a − b| <= rtol · max(max|a|, max|b|), rtol = max(1e-3, 2·eps of the wire dtype): fp32
kernels on different machines differ by far less, a perturbation a liar would bother with by far
more. Verdict rule: on disagreement a third server of the span is asked; a server whose output
agrees with no other compared output is distrusted (so with no third server, both are). A
distrusted server is avoided by every later route of this client and reported to the
coordinator (``POST /api/inference/offenses``, logged as an ``inference_offense`` event). When
the hop's own server is distrusted, its span is routed over trusted servers and every later hop
of the chain is rebuilt from position 0 (their KV caches may hold the liar's unchecked outputs),
then the step is redone, so the tokens that follow are those of an honest chain. With P = 1
every hop of every step is verified; with P < 1 a liar's unchecked steps may already have
shaped earlier tokens. A check replays the span's whole prefix: its cost grows with the
context, which is why it is opt-in.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import secrets
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from tokenizers import Tokenizer as _HFTokenizer
from torch import Tensor

from peer.errors import LowbandError, PeerUnavailable, RemoteError, TransportTimeout
from peer.access import CredentialCache
from peer.identity import Identity
from peer.membership import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from peer.reach import route_for
from peer.transport import PeerHost
from pipeline.generate import Completions, Prompt, Sampler, _is_batch, _prompt_ids
from pipeline.protocol import (CLOSE, HEAD_OUTPUTS, INFO, STATS_KEY, STEP, TOKENIZER, WIRE_DTYPES, BadRequest,
                               ClientQuotaExceeded, ContextLimitExceeded, ModelNotFound, NoRoute, ServingError,
                               SessionError, pack_tensor, unpack_tensor)
from pipeline.tokenizer import Tokenizer

log = logging.getLogger("lowband.pipeline.client")

HOP_OVERHEAD_S = 0.002      # per-hop cost beyond the RTT (serialization, scheduling): prefer fewer hops
SPOT_CHECK_RTOL = 1e-3      # spot-check agreement, relative to the outputs' max |value| (module docstring)
_FAILURES = (PeerUnavailable, TransportTimeout, SessionError, RemoteError)  # -> failover
_REMOTE_TYPES = {"BadRequest": BadRequest, "ContextLimitExceeded": ContextLimitExceeded,
                 "ModelNotFound": ModelNotFound, "SessionError": SessionError,
                 "ClientQuotaExceeded": ClientQuotaExceeded}


@dataclass(frozen=True)
class ServerInfo:
    peer_id: str
    address: str
    model: str
    start: int
    end: int
    n_layers: int
    max_seq_len: int
    vocab_size: int
    reachable: bool = True                         # dialled directly; else through its relays
    relays: tuple[tuple[str, str], ...] = ()       # (relay peer id, address) it reserved at


@dataclass
class Hop:
    """One link of a session's chain: ``server`` runs blocks [start, end); ``history`` holds the
    inputs sent so far, as (header, raw bytes, tokens) per step."""
    server: ServerInfo
    start: int
    end: int
    history: list[tuple[dict, bytes, int]] = field(default_factory=list)


def _remote(e: RemoteError) -> LowbandError:
    """A server-side error as the typed error it was (the ERROR message names its type)."""
    cls = _REMOTE_TYPES.get(e.remote_type)
    return cls(e.detail) if cls is not None else e


def plan_route(servers: list[ServerInfo], start: int, end: int, cost: dict[str, float]) -> list[tuple[ServerInfo, int, int]]:
    """Cheapest chain covering blocks [start, end): Dijkstra over block boundaries. ``cost``:
    peer id -> seconds per hop (servers missing from it are unusable)."""
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    back: dict[int, tuple[int, ServerInfo]] = {}
    heap = [(0.0, 0, start)]
    while heap:
        c, hops, x = heapq.heappop(heap)
        if x == end:
            break
        if (c, hops) > best.get(x, (float("inf"), 0)):
            continue
        for s in servers:
            if s.peer_id not in cost or not s.start <= x < s.end:
                continue
            for y in range(x + 1, min(s.end, end) + 1):
                cand = (c + cost[s.peer_id], hops + 1)
                if cand < best.get(y, (float("inf"), 0)):
                    best[y], back[y] = cand, (x, s)
                    heapq.heappush(heap, (*cand, y))
    if end not in back and start != end:
        covered = sorted({i for s in servers if s.peer_id in cost for i in range(s.start, s.end)})
        missing = [i for i in range(start, end) if i not in covered]
        raise NoRoute(f"no live server covers blocks {missing[0]}..{missing[-1]} of {start}:{end}"
                      if missing else f"no chain of reachable servers covers blocks {start}:{end}")
    chain, y = [], end
    while y != start:
        x, s = back[y]
        chain.append((s, x, y))
        y = x
    return chain[::-1]


def outputs_agree(a: Tensor | None, b: Tensor | None, rtol: float) -> bool:
    """max|a − b| <= rtol · max(max|a|, max|b|), token ids exactly equal; a missing/malformed
    output (None), a shape or kind mismatch or a NaN never agrees."""
    if a is None or b is None or a.shape != b.shape or a.is_floating_point() != b.is_floating_point():
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    if a.numel() == 0:
        return True
    scale = torch.maximum(a.abs().max(), b.abs().max())
    return bool((a - b).abs().max() <= rtol * scale)


def outvoted(outputs: dict[str, Tensor | None], rtol: float) -> set[str]:
    """The spot-check verdict: the servers whose output agrees with no other's. Two that differ
    are both outvoted; with a third, the one the other two agree against (all three when none
    agree). Needs at least two outputs."""
    return {p for p, a in outputs.items()
            if not any(outputs_agree(a, b, rtol) for q, b in outputs.items() if q != p)}


def _as_tensor(reply: tuple[dict, bytes]) -> Tensor | None:
    try:
        t = unpack_tensor(*reply)
        return t.float() if t.is_floating_point() else t
    except BadRequest:
        return None  # a malformed reply is a wrong answer


class _Coordinator(CoordinatorClient):
    """``CoordinatorClient`` plus the inference client's one write: reporting a liar."""

    async def report_inference_offense(self, offender: str, detail: dict) -> dict:
        """Signed with the client's admitted key; coordinator/membership.py
        ``inference_offense`` checks it and logs the report."""
        return await self._request("POST", "/inference/offenses", {"offender": offender, "detail": detail})


class _Session:
    """One generation's chain of hop sessions; steps and failover (see module docstring)."""

    def __init__(self, client: "InferenceClient", model: str, servers: list[ServerInfo], capacity: int,
                 pad: tuple[int, ...] = (0,), head_out: str = "logits"):
        self.client, self.model, self.capacity, self.pad = client, model, capacity, pad
        self.head_out = head_out  # the last hop's output: "logits", or "argmax" for greedy decoding
        self.n_layers = servers[0].n_layers
        self.sid = secrets.token_hex(8)
        self.pos = 0
        self.excluded: set[str] = set()
        self.failovers = 0
        self.checks = 0                         # spot checks compared (observability, tests)
        self.compute_s: list[float] = []        # per step: servers' reported compute (replays, checks included)
        self.route: list[Hop] = []
        self.pool: list[ServerInfo] = []        # reachable servers when opened: the spot checkers

    async def open(self) -> None:
        servers, cost = await self.client.candidates(self.model, self.excluded)
        self.pool = [s for s in servers if s.peer_id in cost]
        self.route = [Hop(s, a, b) for s, a, b in plan_route(servers, 0, self.n_layers, cost)]

    async def step(self, ids: Tensor) -> Tensor:
        """Run token ids [rows, T] through the chain; returns the last position's logits
        [rows, vocab] (fp32), or with ``head_out`` "argmax" its greedy token ids [rows]."""
        meta, raw = pack_tensor(ids.to(torch.long))
        t = ids.shape[1]
        x, i = (meta, raw), 0
        self.compute_s.append(0.0)
        while i < len(self.route):
            hop = self.route[i]
            if hop.server.peer_id in self.client.untrusted:
                await self._evict(i)
                continue
            out = self.head_out if hop.end == self.n_layers else "hidden"
            try:
                x_next = await self._call(hop, x[0], x[1], [t], out)
            except _FAILURES as e:
                await self._repair(i, e)
                continue
            if self.client.spot_check and self.client.rng.random() < self.client.spot_check \
                    and await self._spot_check(i, x, t, x_next):
                continue  # this hop's server was outvoted: evicted above, then the hop is redone
            hop.history.append((x[0], x[1], t))
            x, i = x_next, i + 1
        self.pos += t
        return unpack_tensor(*x)

    async def _call(self, hop: Hop, meta: dict, raw: bytes, chunks: list[int], out: str,
                    pos: int | None = None) -> tuple[dict, bytes]:
        header = {**meta, "sid": self.sid, "start": hop.start, "end": hop.end, "chunks": chunks,
                  "pos": self.pos if pos is None else pos, "out": out, "wire": self.client.wire,
                  "input": "tokens" if meta["dtype"] == "int64" else "hidden", "capacity": self.capacity,
                  "pad": list(self.pad)}
        try:
            rh, rp = await self.client.host.call(hop.server.peer_id, STEP, header, raw,
                                                 timeout=self.client.step_timeout)
        except RemoteError as e:
            raise _remote(e) from e
        ms = rh.get("compute_ms")
        if self.compute_s and isinstance(ms, (int, float)) and math.isfinite(ms) and ms >= 0:
            self.compute_s[-1] += ms / 1e3
        return {"dtype": rh.get("dtype"), "shape": rh.get("shape")}, bytes(rp)

    async def _repair(self, i: int, error: Exception) -> list[tuple[dict, bytes, int]]:
        """Replace hop i by a chain over the other servers, rebuilding its KV caches by replay;
        returns the new chain's replayed outputs (the next hop's inputs so far)."""
        failed = self.route[i]
        bad = failed.server.peer_id
        while True:
            self.excluded.add(bad)
            self.client.forget(bad)
            self.failovers += 1
            if self.failovers > self.client.max_failovers:
                raise ServingError(f"giving up after {self.failovers - 1} failovers; last error: {error}") from error
            try:
                servers, cost = await self.client.candidates(self.model, self.excluded)
            except ModelNotFound:  # every server failed: say why, not "unknown model"
                raise ServingError(f"no server of {self.model!r} left after failures; "
                                   f"last error: {error}") from error
            hist, new = failed.history, []
            try:
                for s, a, b in plan_route(servers, failed.start, failed.end, cost):
                    new.append(Hop(s, a, b, list(hist)))
                    if hist:
                        hist = await self._replay(new[-1], hist)
            except _FAILURES as e:
                bad, error = new[-1].server.peer_id, e
                continue
            self.route[i:i + 1] = new
            return hist

    async def _evict(self, i: int) -> None:
        """Hop i's server is distrusted: route its span over trusted servers, then rebuild every
        later hop from position 0 with the new outputs (their KV caches may hold the liar's
        unchecked outputs). A server failing meanwhile is failed over as usual."""
        error: Exception | None = ServingError(f"server {self.route[i].server.peer_id[:12]} is distrusted")
        hist: list[tuple[dict, bytes, int]] = []
        while i < len(self.route) and (error is not None or hist):
            if error is not None:
                n = len(self.route)
                hist, error = await self._repair(i, error), None
                i += len(self.route) - n + 1
                continue
            self.route[i].history = hist
            try:
                hist = await self._replay(self.route[i], hist)
                i += 1
            except _FAILURES as e:
                error = e

    async def _replay(self, hop: Hop, hist: list[tuple[dict, bytes, int]],
                      last: str = "none") -> list[tuple[dict, bytes, int]]:
        """Send a hop all its past inputs in one call (run chunk by chunk, from position 0);
        returns its outputs split the same way (the next hop's history). The last block's
        server returns ``last``: nothing, or one entry (the last position's logits / argmax)."""
        chunks = [t for _, _, t in hist]
        meta, raw = pack_tensor(torch.cat([unpack_tensor(h, r) for h, r, _ in hist], dim=1))
        out = "hidden" if hop.end < self.n_layers else last
        rh, rp = await self._call(hop, meta, raw, chunks, out, pos=0)
        if out == "none":
            return []
        if out in HEAD_OUTPUTS:
            return [(rh, rp, chunks[-1])]
        y = unpack_tensor(rh, rp)
        if y.dim() != 3 or y.shape[:2] != (len(self.pad), sum(chunks)):
            raise BadRequest(f"server {hop.server.peer_id[:12]} replied hidden states of shape {list(y.shape)}")
        return [(*pack_tensor(part), t) for part, t in zip(y.split(chunks, dim=1), chunks)]

    async def _spot_check(self, i: int, x: tuple[dict, bytes], n: int, got: tuple[dict, bytes]) -> bool:
        """Re-run hop i's step (input ``x`` of ``n`` tokens, reply ``got``) on other servers of
        its span and apply the verdict rule (module docstring); True when the hop's own server
        is outvoted."""
        hop, client = self.route[i], self.client
        primary = hop.server.peer_id
        others = [s for s in self.pool if s.start <= hop.start and hop.end <= s.end and s.peer_id != primary
                  and s.peer_id not in self.excluded and s.peer_id not in client.untrusted]
        client.rng.shuffle(others)  # unpredictable to the servers: a liar cannot tell who checks it
        rtol = max(SPOT_CHECK_RTOL, 2 * torch.finfo(WIRE_DTYPES[client.wire]).eps)
        outputs = {primary: _as_tensor(got)}
        for s in others:
            try:
                outputs[s.peer_id] = _as_tensor(await self._rerun(s, hop, x, n))
            except LowbandError:
                continue  # an unreachable, full or erring server checks nothing
            if len(outputs) == 3 or not outvoted(outputs, rtol):
                break  # agreement, or a referee has spoken
        if len(outputs) == 1:
            return False  # no other server of this span: unchecked
        self.checks += 1
        bad = outvoted(outputs, rtol)
        for peer_id in bad:
            client.distrust(peer_id, {"model": self.model, "blocks": [hop.start, hop.end], "pos": self.pos,
                                      "compared": sorted(outputs)})
        return primary in bad

    async def _rerun(self, server: ServerInfo, hop: Hop, x: tuple[dict, bytes], n: int) -> tuple[dict, bytes]:
        """``server``'s output for this step of ``hop``: the hop's inputs so far plus ``x``,
        replayed in a session of its own (closing it leaves the route's sessions alone)."""
        probe = _Session(self.client, self.model, [server], self.pos + n, self.pad, self.head_out)
        probe.route = [Hop(server, hop.start, hop.end)]
        try:
            meta, raw, _ = (await probe._replay(probe.route[0], [*hop.history, (*x, n)], self.head_out))[-1]
        finally:
            self.client.background(probe.close())  # off the step's critical path
        return meta, raw

    async def close(self) -> None:
        """Free the servers' KV caches now (they would also expire, or go with our connection)."""
        calls = [self.client.host.call(h.server.peer_id, CLOSE, {"sid": self.sid}, timeout=5.0) for h in self.route]
        await asyncio.gather(*calls, return_exceptions=True)


class InferenceClient:
    """Client of the serving swarm behind ``coordinator_url``.

    ``generate``/``stream`` are blocking (they run an event loop in a background thread);
    ``agenerate``/``astream`` are their coroutine twins for callers with their own loop. One
    client is used either way, not both. ``wire``: activation dtype between servers ("fp32"
    default, exact; "fp16"/"bf16" halve the bytes). ``spot_check``: probability that a hop's
    step is re-run on a second server of its span and compared (module docstring; 0 = off).
    ``untrusted`` maps each server caught returning wrong activations to the report sent about it.

    Admission (peer/access.py): ``join`` (a join string with a client invite), ``token`` (a
    closed swarm's token) or neither (an ``--open`` coordinator); ``coordinator`` overrides the
    join string's URL, ``insecure`` allows plain http to a non-loopback coordinator. The client's
    key is ``identity``, else loaded from ``key_path`` (its credential cached beside it, so one
    invite serves every run), else a fresh one per client. Its PeerHost shows the credential to
    servers, which accept only credentials of the same coordinator.
    """

    def __init__(self, coordinator: str | None = None, token: str | None = None, *,
                 join: str | None = None, insecure: bool = False, key_path: str | None = None,
                 wire: str = "fp32", step_timeout: float = 120.0, max_failovers: int = 8,
                 identity: Identity | None = None, spot_check: float = 0.0):
        if wire not in WIRE_DTYPES:
            raise ValueError(f"wire must be one of {sorted(WIRE_DTYPES)}, got {wire!r}")
        if isinstance(spot_check, bool) or not isinstance(spot_check, (int, float)) or not 0 <= spot_check <= 1:
            raise ValueError(f"spot_check must be a probability in [0, 1], got {spot_check!r}")
        if identity is None and key_path is not None:
            identity = Identity.load_or_create(key_path)
        # Checks the URL rule (no plain http off this machine) before anything connects.
        self._coord = _Coordinator(coordinator, token, identity or Identity.generate(), join=join,
                                   insecure=insecure,
                                   cache=CredentialCache(key_path) if key_path is not None else None)
        self.url, self.wire = self._coord.url, wire
        self.step_timeout, self.max_failovers = step_timeout, max_failovers
        self.spot_check = float(spot_check)
        self.rng = random.SystemRandom()
        self.untrusted: dict[str, dict] = {}
        self._background: set[asyncio.Task] = set()
        self.identity = self._coord.identity
        self._host: PeerHost | None = None
        self._tokenizers: dict[str, Tokenizer] = {}
        self._rtt: dict[str, float] = {}
        self._peers: list | None = None  # the coordinator's last answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.active: dict[str, _Session] = {}  # sessions now generating, by session id
        self.last_route: list[tuple[str, int, int]] = []  # (peer id, start, end) of the latest session
        self.last_failovers = 0
        self.last_checks = 0
        self.last_compute_s: list[float] = []  # per step of the latest session: servers' compute, summed over hops

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def host(self) -> PeerHost:
        """The client's PeerHost (after ``connect``, which every public coroutine awaits)."""
        if self._host is None:
            raise RuntimeError("InferenceClient is not connected yet: await client.connect()")
        return self._host

    async def connect(self) -> PeerHost:
        """Be admitted (role client) and open the PeerHost that shows the credential; idempotent."""
        if self._host is None:
            credential = await self._coord.admit()
            if not credential.has("client"):
                raise CoordinatorError(f"this client's credential allows roles {sorted(credential.roles)}, "
                                       "not client: ask for an invite with --role client", code="forbidden")
            if self._host is None:  # another task may have connected meanwhile
                # A client does not listen: it dials, or opens circuits through servers' relays.
                self._host = PeerHost(self.identity, None, credential=credential,
                                      authority=credential.authority, conns_per_peer=1, relay=False)
                self._host.reachable = False
        return self._host

    async def servers(self, model: str | None = None) -> list[ServerInfo]:
        """Live servers announced to the coordinator (of ``model`` if given)."""
        await self.connect()
        try:
            self._peers = await self._coord.peers()
        except CoordinatorUnavailable:
            if self._peers is None:
                raise
            # With the coordinator down, keep serving from the last membership
            # (docs/architecture.md §Coordinator outage).
        found = []
        rows = {p.peer_id: {"peer_id": p.peer_id, "address": p.address, "reachable": p.reachable,
                            "relays": p.relays} for p in self._peers
                if p.state in ("active", "suspect") and p.address is not None}
        for p in self._peers:
            info = p.stats.get(STATS_KEY) if isinstance(p.stats, dict) else None
            # verified addresses only, or the relays of a server behind a NAT (peer.reach)
            route = route_for(rows[p.peer_id], rows) if p.peer_id in rows else None
            if route is None or not isinstance(info, dict) or info.get("serving") is False:
                continue  # tensor-split shards and forming groups are not entry points
            try:
                s = ServerInfo(p.peer_id, route.address, str(info["model"]), int(info["blocks"][0]),
                               int(info["blocks"][1]), int(info["n_layers"]), int(info["max_seq_len"]),
                               int(info["vocab_size"]), route.reachable, route.relays)
            except (KeyError, IndexError, TypeError, ValueError):
                continue  # a malformed announcement is not a server we can use
            if model is None or s.model == model:
                found.append(s)
        return found

    async def models(self) -> dict[str, dict]:
        """model name -> {n_layers, max_seq_len, servers, covered} over the live servers."""
        out: dict[str, dict] = {}
        for s in await self.servers():
            m = out.setdefault(s.model, {"n_layers": s.n_layers, "max_seq_len": s.max_seq_len, "servers": 0,
                                         "blocks": set()})
            m["servers"] += 1
            m["blocks"].update(range(s.start, s.end))
        for m in out.values():
            m["covered"] = len(m.pop("blocks")) == m["n_layers"]
        return out

    async def candidates(self, model: str, exclude: set[str] = frozenset()) -> tuple[list[ServerInfo], dict[str, float]]:
        """Servers of ``model`` neither excluded nor distrusted, and the per-hop cost of each
        reachable one."""
        exclude = set(exclude) | self.untrusted.keys()
        servers = [s for s in await self.servers(model) if s.peer_id not in exclude]
        if not servers:
            known = sorted({s.model for s in await self.servers()})
            raise ModelNotFound(f"no live server announces model {model!r} (served now: {known or 'none'})"
                                if not exclude else f"no server of {model!r} left after failures")
        for s in servers:
            self.host.add_route(s.peer_id, s.address, relays=s.relays, reachable=s.reachable)
        await asyncio.gather(*(self._measure(s.peer_id) for s in servers if s.peer_id not in self._rtt))
        # The transport's running RTT estimate (from real calls) supersedes the first ping.
        # A relayed hop costs one more overhead: routes prefer direct (or punched) links.
        cost = {s.peer_id: (self.host.link_stats(s.peer_id).rtt_s or self._rtt[s.peer_id]) + HOP_OVERHEAD_S
                * (2 if self.host.link_path(s.peer_id) == "relayed" else 1)
                for s in servers if s.peer_id in self._rtt}
        return servers, cost

    async def _measure(self, peer_id: str) -> None:
        try:
            self._rtt[peer_id] = await self.host.ping(peer_id, timeout=5.0)
        except (LowbandError, OSError):
            pass  # unreachable: left out of this route

    def forget(self, peer_id: str) -> None:
        self._rtt.pop(peer_id, None)

    def distrust(self, peer_id: str, detail: dict) -> None:
        """Route around ``peer_id`` for the rest of this client's life and report it to the
        coordinator (in the background; a coordinator away only costs the report)."""
        if peer_id in self.untrusted:
            return
        self.untrusted[peer_id] = detail
        self.forget(peer_id)
        log.warning("server %s returned wrong activations (%s); avoiding it", peer_id[:12], detail)
        self.background(self._report(peer_id, detail))

    def background(self, coro) -> None:
        """Run ``coro`` on the client's loop without waiting for it (``aclose`` does)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _report(self, peer_id: str, detail: dict) -> None:
        try:
            await self._coord.report_inference_offense(peer_id, detail)
        except CoordinatorError as e:
            log.warning("could not report server %s to the coordinator: %s", peer_id[:12], e)

    async def tokenizer(self, model: str) -> Tokenizer:
        """The model's tokenizer, fetched once from a server of block 0."""
        if model not in self._tokenizers:
            servers, cost = await self.candidates(model)
            firsts = sorted((s for s in servers if s.start == 0 and s.peer_id in cost), key=lambda s: cost[s.peer_id])
            if not firsts:
                raise NoRoute(f"no reachable server of {model!r} holds block 0")
            try:
                h, payload = await self.host.call(firsts[0].peer_id, TOKENIZER, {}, timeout=30.0)
            except RemoteError as e:
                raise _remote(e) from e
            self._tokenizers[model] = Tokenizer(_HFTokenizer.from_str(bytes(payload).decode("utf-8")),
                                                eos_id=h["eos_id"], bos_id=h.get("bos_id"),
                                                add_bos=bool(h.get("add_bos")), chat_template=h.get("chat_template"))
        return self._tokenizers[model]

    async def server_info(self, peer_id: str, address: str | None = None) -> dict:
        """A server's live announcement (sessions count included); ``address`` to dial it when
        it is not an entry point the client routed to (e.g. a tensor-split shard)."""
        await self.connect()
        if address is not None:
            self.host.add_route(peer_id, address)
        h, _ = await self.host.call(peer_id, INFO, {}, timeout=10.0)
        return h

    # -- generation --------------------------------------------------------------------------
    async def arows(self, model: str, prompts: list[list[int]], max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop_ids: tuple[int, ...] = ()) -> AsyncIterator[list[int]]:
        """Generate for a batch of prompts in one session (rows left-padded as in
        ``pipeline.generate``): yield each step's token of every row, until every row has produced
        a stop id or ``max_new_tokens`` steps have run. Finished rows keep decoding (ignore them)."""
        sampler = Sampler(temperature, top_p, seed)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise BadRequest(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not prompts or any(not p for p in prompts):
            raise BadRequest("every prompt needs at least one token")
        servers, _ = await self.candidates(model)
        limit, vocab = servers[0].max_seq_len, servers[0].vocab_size
        longest = max(map(len, prompts))
        if longest + max_new_tokens > limit:
            raise ContextLimitExceeded(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                                       f"the context limit of {limit} of {model!r}")
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise BadRequest(f"token ids must lie in [0, {vocab})")
        # Greedy: the last server returns argmax ids (B ints, not B x vocab floats on the wire).
        greedy = sampler.temperature == 0
        session = _Session(self, model, servers, longest + max_new_tokens, tuple(longest - len(p) for p in prompts),
                           "argmax" if greedy else "logits")
        await session.open()
        self.active[session.sid] = session
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        try:
            out = await session.step(torch.tensor([[0] * (longest - len(p)) + p for p in prompts]))
            for step in range(max_new_tokens):
                tok = out if greedy else sampler(out)
                yield tok.tolist()
                done |= torch.isin(tok, stops)
                if step == max_new_tokens - 1 or bool(done.all()):
                    return
                out = await session.step(tok[:, None])
        finally:
            self.active.pop(session.sid, None)
            self.last_route = [(h.server.peer_id, h.start, h.end) for h in session.route]
            self.last_failovers = session.failovers
            self.last_checks = session.checks
            self.last_compute_s = session.compute_s
            await asyncio.shield(session.close())

    async def atokens(self, model: str, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, stop_ids: tuple[int, ...] = ()) -> AsyncIterator[int]:
        """Yield generated token ids (a stop id ends it and is not yielded)."""
        # aclosing: the session closes (and last_route is set) when this generator stops, not later.
        async with contextlib.aclosing(self.arows(model, [list(prompt_ids)], max_new_tokens, temperature, top_p,
                                                  seed, stop_ids)) as rows:
            async for (tok,) in rows:
                if tok in stop_ids:
                    return
                yield tok

    async def alogits(self, model: str, prompt_ids: list[int]) -> Tensor:
        """fp32 logits [vocab] of the position after ``prompt_ids`` (scoring; tests)."""
        servers, _ = await self.candidates(model)
        if not prompt_ids or len(prompt_ids) > servers[0].max_seq_len:
            raise ContextLimitExceeded(f"need 1..{servers[0].max_seq_len} prompt tokens, got {len(prompt_ids)}")
        session = _Session(self, model, servers, len(prompt_ids))
        await session.open()
        try:
            return (await session.step(torch.tensor([prompt_ids])))[0]
        finally:
            await asyncio.shield(session.close())

    async def astream(self, model: str, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                      usage: dict | None = None) -> AsyncIterator[str]:
        """Yield text pieces of one completion (prompt: a str, or chat messages). ``usage``, when
        given, is filled with prompt_tokens, completion_tokens and finish_reason ("stop" at the
        end token, "length" at max_new_tokens)."""
        tok = await self.tokenizer(model)
        try:
            ids = _prompt_ids(tok, prompt)
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e)) from e
        usage = {} if usage is None else usage
        usage.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="stop")
        out: list[int] = []
        sent = ""
        async for t in self.atokens(model, ids, max_new_tokens, temperature, top_p, seed,
                                    (tok.eos_id,) if stop_at_eos else ()):
            out.append(t)
            usage["completion_tokens"] = len(out)
            if len(out) == max_new_tokens:
                usage["finish_reason"] = "length"
            text = tok.decode(out)
            # Hold back a partial UTF-8 character (decoded as U+FFFD) until its last byte arrives.
            if not text.endswith("\ufffd") and len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        text = tok.decode(out)
        if len(text) > len(sent):
            yield text[len(sent):]

    async def agenerate(self, model: str, prompt: Prompt | list[Prompt], max_new_tokens: int = 128,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                        stop_at_eos: bool = True, usage: list[dict] | None = None) -> str | list[str]:
        """The completion of a prompt, or the completions of a list of prompts (one batched
        session; the stop token is not included). ``usage``, when given, receives one dict per
        completion as ``astream`` fills it (prompt_tokens, completion_tokens, finish_reason)."""
        if not _is_batch(prompt):
            one: dict = {}
            text = "".join([p async for p in self.astream(model, prompt, max_new_tokens, temperature, top_p, seed,
                                                           stop_at_eos, one)])
            if usage is not None:
                usage[:] = [one]
            return text
        tok = await self.tokenizer(model)
        try:
            prompts = [_prompt_ids(tok, p) for p in prompt]
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e)) from e
        stops = (tok.eos_id,) if stop_at_eos else ()
        out = Completions(len(prompts), stops)
        async for step in self.arows(model, prompts, max_new_tokens, temperature, top_p, seed, stops):
            out.add(step)
        if usage is not None:
            usage[:] = [{"prompt_tokens": len(p), "completion_tokens": len(r),
                         "finish_reason": "stop" if done else "length"}
                        for p, r, done in zip(prompts, out.rows, out.finished)]
        return [tok.decode(r) for r in out.rows]

    async def aclose(self) -> None:
        await asyncio.gather(*self._background)  # session closes and reports: bounded by their timeouts
        if self._host is not None:
            await self._host.close()
            self._host = None
        await self._coord.close()

    # -- blocking API ------------------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="lowband-client", daemon=True)
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def generate(self, model: str, prompt: Prompt | list[Prompt], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True) -> str | list[str]:
        return self._run(self.agenerate(model, prompt, max_new_tokens, temperature, top_p, seed, stop_at_eos))

    def stream(self, model: str, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> Iterator[str]:
        agen = self.astream(model, prompt, max_new_tokens, temperature, top_p, seed, stop_at_eos)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def call(self, coro_fn, *args, **kwargs):
        """Run one of the async methods (``servers``, ``server_info``, ...) from blocking code."""
        return self._run(coro_fn(*args, **kwargs))

    def close(self) -> None:
        if self._loop is not None:
            self._run(self.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None
        elif self._host is not None:
            raise RuntimeError("this client runs on the caller's event loop: use 'await client.aclose()'")

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
