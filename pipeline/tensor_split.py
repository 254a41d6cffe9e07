"""Tensor split of a stage over K peers (Megatron-LM, Shoeybi et al. 2019; TPI-LLM, Li et al. 2024).

Each peer of a group holds shard ``rank`` of K of every block in the stage's span: whole GQA
groups of attention heads and a slice of the MLP's intermediate columns (column-parallel q/k/v,
gate/up; row-parallel o, down — ``pipeline.model.shard_block_weights``), so about 1/K of the
weights. Per block, two all-reduces of the hidden-state update (after attention, after the MLP)
use ``collectives.star_all_reduce`` rooted at the leader: two one-way hops, latency-optimal for
these small tensors, exact (raw fp32) and bit-identical on every member.

The embedding and the head (tied or not) are split over the vocabulary (vocab-parallel): each
shard holds rows [v0, v1) of the matrix; it embeds the token ids that fall in its rows (zeros
for the others) and computes the logits of its rows (zeros elsewhere), and one all-reduce sums
the partials: exact, as every element is one shard's value plus zeros. So every peer holds
about 1/K of all the weights, embedding included.

The group is one pipeline stage: rank 0 (the leader) is an ordinary ``StageServer`` that faces
clients; for every step it hands the input to the other shards (``serve.tp_step``), then all K
compute their shard with the same all-reduce tags. The other shards are ``StageServer``s too (same
session table, limits and expiry) that only take steps from their leader. A member failure
fails the step (a partial sum would be wrong), so the client fails over to another route.

Who belongs to a group comes from the coordinator's membership table, never from the peers that
call: ``group_ranks`` gives each rank to the active peer announcing it (same group, K, model and
span) that joined first, so a key minted later cannot take over a rank. A follower accepts steps
(which name the session owner whose KV share they are charged to, and the all-reduce members)
only from the peer holding rank 0 there and only for the member list that leader announces; it
re-reads the table when its view is stale (at most once a second) and frees every session when the
named leader or member list changes, since those sessions belong to the old group.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import torch
from torch import Tensor, nn

from collectives import Group, star_all_reduce
from pipeline.loading import load_model
from pipeline.model import Llama, RMSNorm, shard_block_weights, split_bounds
from pipeline.protocol import (STATS_KEY, TP_CLOSE, TP_STEP, BadRequest, SessionError, Span, TensorSplitSpec,
                               pack_tensor)

log = logging.getLogger("lowband.pipeline.tensor_split")


class ShardLlama(Llama):
    """Shard ``rank`` of ``k`` of a model part: its blocks sliced (``LlamaConfig.shard``), the
    embedding / head, when the part has them, cut to vocabulary rows [v0, v1). ``embed`` and
    ``head`` return this shard's partials (full shape, zeros outside its rows): the group sums
    them."""

    def __init__(self, cfg, blocks, rank: int, k: int, with_embed: bool, with_head: bool):
        super().__init__(cfg.shard(rank, k), blocks, with_embed=False, with_head=False)
        self.vocab_size = cfg.vocab_size
        self.v0, v1 = split_bounds(cfg.vocab_size, rank, k)
        rows = v1 - self.v0
        self.with_embed, self.with_head = with_embed, with_head
        self.embedding = nn.Embedding(rows, cfg.dim) if with_embed else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if with_head else None
        self.lm_head = nn.Linear(cfg.dim, rows, bias=False) \
            if with_head and not (cfg.tie_embeddings and with_embed) else None

    def embed(self, tokens: Tensor) -> Tensor:
        if self.embedding is None:
            return super().embed(tokens)  # the error of a part without the embedding
        local = tokens - self.v0
        mine = (local >= 0) & (local < self.embedding.num_embeddings)
        return self.scale_embedding(self.embedding(local.clamp(0, self.embedding.num_embeddings - 1))
                                    * mine.unsqueeze(-1))

    def head(self, h: Tensor) -> Tensor:
        part = super().head(h)
        out = part.new_zeros(*part.shape[:-1], self.vocab_size)
        out[..., self.v0:self.v0 + part.shape[-1]] = part
        return out


def shard_model(full: Llama, rank: int, k: int) -> ShardLlama:
    """Shard ``rank`` of ``k`` of a model part (``ShardLlama``)."""
    cfg = full.cfg
    with torch.device("meta"):
        part = ShardLlama(cfg, full.block_ids, rank, k, full.with_embed, full.with_head)
    source = full.state_dict()
    state = {}
    for i in full.block_ids:
        prefix = f"blocks.{i}."
        block = {key[len(prefix):]: t for key, t in source.items() if key.startswith(prefix)}
        state.update({prefix + key: t for key, t in shard_block_weights(block, cfg, rank, k).items()})
    v0, v1 = split_bounds(cfg.vocab_size, rank, k)
    if full.with_embed:
        state["embedding.weight"] = full.embedding.weight[v0:v1].clone()
    if full.with_head:
        state["norm.weight"] = full.norm.weight
        if part.lm_head is not None:
            head = full.lm_head.weight if full.lm_head is not None else full.embedding.weight
            state["lm_head.weight"] = head[v0:v1].clone()
    return part.adopt(state).eval()


def load_shard(path, span: Span, tp: TensorSplitSpec, device: str = "cpu") -> ShardLlama:
    full = load_model(path, range(span.start, span.end), device=device)
    return shard_model(full, tp.rank, tp.k)


def group_ranks(peers: Iterable, tp: TensorSplitSpec, model: str, span: Span) -> dict[int, tuple[str, dict]]:
    """rank -> (peer id, announcement) of group ``tp`` in the coordinator's membership table
    (``PeerInfo`` rows): active peers announcing a shard of the same group, K, model and span; a
    rank claimed twice goes to the peer that joined first (ties: the smaller id)."""
    found: dict[int, tuple[tuple, str, dict]] = {}
    for p in peers:
        info = p.stats.get(STATS_KEY) if isinstance(p.stats, dict) else None
        t = info.get("tp") if isinstance(info, dict) else None
        if not (p.state == "active" and isinstance(t, dict) and t.get("group") == tp.group and t.get("k") == tp.k
                and info.get("model") == model and info.get("blocks") == [span.start, span.end]):
            continue
        rank = t.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < tp.k:
            continue
        joined = p.joined_at if isinstance(p.joined_at, (int, float)) else float("inf")
        key = (joined, p.peer_id)
        if rank not in found or key < found[rank][0]:
            found[rank] = (key, p.peer_id, info)
    return {rank: (peer_id, info) for rank, (_, peer_id, info) in found.items()}


def named_group(peers: Iterable, tp: TensorSplitSpec, model: str, span: Span,
                me: str) -> tuple[str, tuple[str, ...]] | None:
    """(leader, members) of the group as the table names it, when its leader has formed it with
    ``me`` at rank ``tp.rank``; else None."""
    lead = group_ranks(peers, tp, model, span).get(0)
    if lead is None:
        return None
    members = lead[1]["tp"].get("members")
    if not (isinstance(members, list) and len(members) == tp.k and members[0] == lead[0]
            and all(isinstance(m, str) for m in members) and members[tp.rank] == me):
        return None
    return lead[0], tuple(members)


@dataclass
class _Reducer:
    """The all-reduce a shard's blocks call from the compute thread: runs ``star_all_reduce``
    on the event loop; tags ``tp-NONCE-SEQ-N`` agree on every member because all run the same
    layers in the same order."""
    group: Group
    loop: asyncio.AbstractEventLoop
    prefix: str
    timeout: float

    def __post_init__(self) -> None:
        self._n = itertools.count()

    def __call__(self, t: Tensor) -> Tensor:
        tag = f"{self.prefix}-{next(self._n)}"
        coro = star_all_reduce(self.group, [t], tag=tag, op="sum", root=self.group.members[0],
                               timeout=self.timeout)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout + 5)[0]


def _group(host, members: list[str]) -> Group:
    # Every shard is needed: no retry over survivors.
    return Group(host, members, min_peers=len(members), max_attempts=1)


class TensorSplitLeader:
    """Runs a leader's steps across its group; installed as ``StageServer.split``."""

    def __init__(self, server, followers: list[str], timeout: float = 60.0):
        self.server, self.followers, self.timeout = server, followers, timeout
        self.members = [server.host.peer_id, *followers]
        self.nonce = secrets.token_hex(4)  # a restarted leader never reuses a tag
        self._seq = itertools.count()
        server.on_free = self._free

    async def run(self, job) -> tuple[dict, bytes]:
        """Run ``job`` on every shard: the same step (input, output kind) goes to each."""
        r, host = job.req, self.server.host
        prefix = f"tp-{self.nonce}-{next(self._seq)}"
        meta, raw = pack_tensor(r.x)
        header = {**meta, "owner": job.peer_id, "sid": r.sid, "start": r.start, "end": r.end, "pos": r.pos,
                  "chunks": r.chunks, "capacity": r.capacity, "pad": list(r.pad), "input": r.input, "out": r.out,
                  "wire": r.wire, "members": self.members, "prefix": prefix}
        reduce = _Reducer(_group(host, self.members), asyncio.get_running_loop(), prefix, self.timeout)
        mine = self.server.run_torch(self.server.compute_one, job, reduce)
        calls = [host.call(f, TP_STEP, header, raw, timeout=self.timeout) for f in self.followers]
        results = await asyncio.gather(mine, *calls, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return results[0]

    def _free(self, owner: str, sid: str | None) -> None:
        for f in self.followers:
            self.server.spawn(self.server.host.call(f, TP_CLOSE, {"owner": owner, "sid": sid}, timeout=10.0))


class TensorSplitFollower:
    """A non-leader shard: takes steps and session releases only from the leader the
    coordinator's table names (``lookup``: the (leader, members) view, or None), for that
    leader's member list; frees every session when the named group changes."""

    REFRESH_S = 1.0  # at most one table read per second when a step finds the view stale

    def __init__(self, server, lookup: Callable[[], Awaitable[tuple[str, tuple[str, ...]] | None]],
                 timeout: float = 60.0, period_s: float = 5.0):
        self.server, self.lookup, self.timeout, self.period_s = server, lookup, timeout, period_s
        self.leader: str | None = None
        self.members: tuple[str, ...] | None = None
        self._read_at = -float("inf")
        self._reads = 0
        self._reading: asyncio.Lock | None = None

    def install(self) -> None:
        self.server.host.handle(TP_STEP, self._on_step, ("serve",))
        self.server.host.handle(TP_CLOSE, self._on_close, ("serve",))
        self.server.host.on_peer_lost(self._on_peer_lost)
        self.server.spawn(self._watch())

    def adopt(self, view: tuple[str, tuple[str, ...]] | None) -> None:
        """Take ``view`` as the group; a different leader or member list frees every session."""
        leader, members = view if view is not None else (None, None)
        if (leader, members) == (self.leader, self.members):
            return
        if self.leader is not None:
            log.info("tensor-split group changed (leader %s -> %s): freeing its sessions", self.leader[:12],
                     leader[:12] if leader else None)
            self._free_all()
        self.leader, self.members = leader, members

    async def refresh(self) -> None:
        """Re-read the table, at most once per ``REFRESH_S`` (callers that waited while another
        read ran take its result); a coordinator away keeps the view."""
        if self._reading is None:
            self._reading = asyncio.Lock()
        seen = self._reads
        async with self._reading:
            if self._reads != seen:
                return
            wait = self._read_at + self.REFRESH_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                view = await self.lookup()
            except Exception as e:  # noqa: BLE001 - coordinator away: keep the last view
                log.debug("tensor-split group lookup failed: %s", e)
                return
            finally:
                self._read_at, self._reads = time.monotonic(), self._reads + 1
            self.adopt(view)

    async def _watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.period_s)

    def _free_all(self) -> None:
        for owner in {k[0] for k in self.server.sessions}:
            self.server.free(owner, None)

    def _on_peer_lost(self, peer_id: str) -> None:
        # Sessions are keyed by the leader's clients; without the leader none can go on.
        if peer_id == self.leader:
            self._free_all()

    async def _check_leader(self, peer_id: str) -> None:
        if peer_id != self.leader:
            await self.refresh()  # the leader may have formed the group since the last read
        if self.leader is None:
            raise SessionError("this tensor-split shard has no group yet (its leader has not formed it)")
        if peer_id != self.leader:
            raise BadRequest(f"tensor-split steps come from the group's leader {self.leader[:12]} named by the "
                             f"coordinator, not from {peer_id[:12]}")

    async def _on_step(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        await self._check_leader(peer_id)
        members, prefix, owner = header.get("members"), header.get("prefix"), header.get("owner")
        if not (isinstance(members, list) and tuple(members) == self.members
                and isinstance(prefix, str) and 0 < len(prefix) <= 64 and isinstance(owner, str) and len(owner) <= 64):
            raise BadRequest("a tensor-split step names the group's announced members, an all-reduce prefix and "
                             "the session owner")
        req = self.server.parse_step(header, payload)
        job = self.server.make_job(owner, req)
        reduce = _Reducer(_group(self.server.host, list(members)), asyncio.get_running_loop(), prefix, self.timeout)
        await self.server.run_torch(self.server.compute_one, job, reduce)
        return {"length": job.session.length}, b""

    async def _on_close(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        await self._check_leader(peer_id)
        owner, sid = header.get("owner"), header.get("sid")
        if not isinstance(owner, str) or not (sid is None or isinstance(sid, str)):
            raise BadRequest("a tensor-split release names the owner (str) and the session id (str or None)")
        return {"freed": self.server.free(owner, sid)}, b""
