"""Robust all-reduce: every contribution checked at the reducing peer, offenders excluded by id.

A ring's reducing peer only sees partial sums, so it cannot tell who poisoned one. Here the
reduce-scatter is direct: each peer sends its slice of shard j straight to shard j's owner
(members[j]) -- the same (n-1)/n of the vector per peer as the ring, over n-1 parallel streams.
One attempt, three message rounds:

1. contributions: the owner decodes every peer's slice of its shard (exact fp32 for its own)
   and screens each one (``screen``): undecodable or mismatched payloads, non-finite values,
   optional absolute bounds, and -- with at least 3 contributions, i.e. assuming an honest
   majority -- a norm above ``norm_factor`` x the median norm, or a cosine to the
   coordinate-wise median below ``min_cosine`` (a sign-flipped update points away from it).
2. verdicts: every owner sends the offenders it found on its shard to every peer. All peers take
   the union, so a peer caught on any shard is excluded from every shard (consistent exclusion,
   at the cost of one small message round), and every peer learns (peer id, reason).
3. all-gather: each owner aggregates its shard over the accepted contributions (mean, trimmed
   mean or centered clipping), quantizes it once and sends those bytes to every peer, naming the
   exclusions it applied in the header; the owner keeps decode(encode(x)), so every peer ends
   bit-identical (docs/architecture.md §Bit parity).

A peer whose own input is non-finite (a diverged replica) abstains instead of failing: it tells
the owners, is reported as "non-finite" and still receives the result.
Threat model: contributors may be malicious, owners are trusted for their shard (a lying owner
could corrupt its shard or accuse honest peers; checking that needs redundant owners).

Robust aggregators: trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates"); centered clipping (Karimireddy, He & Jaggi 2021, "Learning
from History for Byzantine Robust Optimization"), started here from the coordinate-wise median.
"""
from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compression import Codec, CodecError

from .deadline import DeadlinePolicy, observe_bandwidth
from .errors import CollectiveAborted, CollectiveError
from .layout import fingerprint
from .ring import RingPlan, Sender, compute

log = logging.getLogger(__name__)

AGGREGATES = ("mean", "trimmed_mean", "centered_clip")
_NETWORK_MAX_ROWS = 16  # above this many contributions, torch.sort orders them per coordinate
_CONTRIB, _VERDICT, _GATHER = 0, 1, 2  # send-priority phases


@dataclass(frozen=True)
class RobustConfig:
    """Options of the robust all-reduce (``all_reduce(..., robust=RobustConfig())``).

    detect: screen contributions by norm and direction (relative to the other contributions) and
        exclude offenders; undecodable and non-finite contributions are excluded either way.
    norm_factor: a contribution whose L2 norm exceeds this multiple of the median norm offends.
    min_cosine: a contribution whose cosine to the coordinate-wise median is below this offends.
    min_numel: shards shorter than this skip the norm/direction checks (a cosine over a handful
        of values says nothing, and an honest peer flagged on one shard is excluded from all).
    max_abs / max_norm: optional absolute bounds on any value / on a contribution's norm (per shard).
    aggregate: "mean" of the accepted contributions, "trimmed_mean" (per coordinate, drop the
        ``trim`` largest and smallest), or "centered_clip" (``clip_iters`` steps of
        v <- v + mean_i clip(x_i - v, tau), tau = the lower median distance to the coordinate-wise
        median, so at least half of the contributions are not clipped in the first step).
    on_offender(peer_id, reason): called on every peer, once per offender of a successful
        all-reduce -- the hook the training role forwards to the coordinator (which can ban).
    All peers must pass the same settings (the callback excepted); they are part of the
    fingerprint every message carries.
    """

    detect: bool = True
    norm_factor: float = 4.0
    min_cosine: float = 0.0
    min_numel: int = 256
    max_abs: float | None = None
    max_norm: float | None = None
    aggregate: str = "mean"
    trim: int = 1
    clip_iters: int = 3
    on_offender: Callable[[str, str], None] | None = None

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise CollectiveError(f"robust aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not (1 < self.norm_factor < math.inf and -1 <= self.min_cosine <= 1):
            raise CollectiveError("robust norm_factor must be > 1 and min_cosine in [-1, 1]")
        for name in ("max_abs", "max_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CollectiveError(f"robust {name} must be > 0 or None, got {value!r}")
        if self.trim < 0 or self.clip_iters < 1 or self.min_numel < 1:
            raise CollectiveError("robust trim must be >= 0, clip_iters and min_numel >= 1")

    def key(self) -> tuple:
        """What every peer must agree on (not the local callback)."""
        return (self.detect, self.norm_factor, self.min_cosine, self.min_numel, self.max_abs, self.max_norm,
                self.aggregate, self.trim, self.clip_iters)


@dataclass(frozen=True)
class Offense:
    """Peer ``peer`` was excluded: ``code`` is one of undecodable, mismatch, non-finite, bound,
    norm, direction; ``shard`` is the shard whose owner caught it."""

    peer: str
    code: str
    detail: str
    shard: int

    def reason(self) -> str:
        return f"{self.code} (shard {self.shard}): {self.detail}"


def sorted_rows(x: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``x`` [k, L] sorted per coordinate (smallest first). For a few peers an
    odd-even transposition network of elementwise min/max beats torch.sort along the short
    dim 0 by an order of magnitude (k passes over k rows; exact, finite input)."""
    k = x.shape[0]
    if k > _NETWORK_MAX_ROWS:
        return list(x.sort(dim=0).values.unbind(0))
    rows = list(x.unbind(0))
    for p in range(k):
        for i in range(p % 2, k - 1, 2):
            rows[i], rows[i + 1] = torch.minimum(rows[i], rows[i + 1]), torch.maximum(rows[i], rows[i + 1])
    return rows


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median of the rows of ``x`` (mean of the two middle values for even rows)."""
    k = x.shape[0]
    s = sorted_rows(x)
    return s[k // 2].clone() if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def screen(rows: torch.Tensor, cfg: RobustConfig) -> dict[int, tuple[str, str]]:
    """Offending rows of ``rows`` [k, L] (decoded contributions): index -> (code, detail)."""
    bad: dict[int, tuple[str, str]] = {}
    for i in range(rows.shape[0]):
        x = rows[i]
        if not bool(torch.isfinite(x).all()):
            bad[i] = ("non-finite", "contribution holds inf/NaN")
        elif cfg.max_abs is not None and x.numel() and float(x.abs().max()) > cfg.max_abs:
            bad[i] = ("bound", f"max |value| {float(x.abs().max()):.3g} > {cfg.max_abs:g}")
        elif cfg.max_norm is not None and _norm(x) > cfg.max_norm:
            bad[i] = ("bound", f"norm {_norm(x):.3g} > {cfg.max_norm:g}")
    live = [i for i in range(rows.shape[0]) if i not in bad]
    if not cfg.detect or len(live) < 3 or rows.shape[1] < cfg.min_numel:
        return bad  # relative checks need an honest majority of >= 2 and enough values
    norms = {i: _norm(rows[i]) for i in live}
    median_norm = statistics.median(norms.values())
    for i in live:
        if median_norm > 0 and norms[i] > cfg.norm_factor * median_norm:
            bad[i] = ("norm", f"norm {norms[i]:.3g} > {cfg.norm_factor:g} x median {median_norm:.3g}")
    live = [i for i in live if i not in bad]
    if len(live) < 3:
        return bad
    med = coordinate_median(rows[live])
    med_norm = _norm(med)
    for i in live:
        if norms[i] > 0 and med_norm > 0:  # unit vectors: an fp32 dot cannot overflow
            cos = float(torch.dot(rows[i] / norms[i], med / med_norm))
            if cos < cfg.min_cosine:
                bad[i] = ("direction", f"cosine {cos:.3f} to the coordinate-wise median < {cfg.min_cosine:g}")
    return bad


def aggregate(rows: torch.Tensor, cfg: RobustConfig) -> torch.Tensor:
    """The accepted contributions ``rows`` [k, L] (k >= 1) -> one fp32 shard."""
    k = rows.shape[0]
    if cfg.aggregate == "mean" or k == 1:
        acc = rows[0].clone()
        for i in range(1, k):  # fixed order: the same bits whoever computes it
            acc += rows[i]
        return acc.div_(k)
    if cfg.aggregate == "trimmed_mean":
        t = min(cfg.trim, (k - 1) // 2)
        kept = sorted_rows(rows)[t:k - t]
        acc = kept[0].clone()
        for r in kept[1:]:
            acc += r
        return acc.div_(len(kept))
    v = coordinate_median(rows)
    tau = float(torch.linalg.vector_norm(rows - v, dim=1).median())
    for _ in range(cfg.clip_iters):
        diff = rows - v
        dist = torch.linalg.vector_norm(diff, dim=1)
        scale = torch.where(dist > tau, tau / dist.clamp_min(1e-30), torch.ones_like(dist))
        v = v + (diff * scale[:, None]).mean(dim=0)
    return v


def robust_deadline_s(policy: DeadlinePolicy, host, members: list[str], wire_bytes: int, numel: int) -> float:
    """One attempt: 2(n-1)/n of the encoded vector over the slowest link (as the ring), three
    message rounds, and ~8 fp32 passes of local work (decode, screen, sort, aggregate)."""
    n = len(members)
    others = [m for m in members if m != host.peer_id]
    return policy.operation_s(host, others, wire_bytes=2 * (n - 1) / n * wire_bytes, rounds=3,
                              compute_bytes=8 * 4 * numel)


async def _all_or_nothing(aws: list) -> None:
    """Run all; on the first failure cancel the rest (no orphan waits) and raise it as is."""
    loop = asyncio.get_running_loop()
    tasks = [a if isinstance(a, asyncio.Future) else loop.create_task(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RobustRun:
    """One attempt of the robust all-reduce over ``members`` (shard j is owned by members[j])."""

    def __init__(self, host, members: list[str], prefix: str, codec: Codec, flat: torch.Tensor,
                 plan: RingPlan, cfg: RobustConfig, *, deadline: float, policy: DeadlinePolicy,
                 layout_key: int) -> None:
        self.host, self.members, self.prefix, self.codec = host, members, prefix, codec
        self.flat, self.plan, self.cfg, self.deadline, self.policy = flat, plan, cfg, deadline, policy
        self.n = len(members)
        self.rank = members.index(host.peer_id)
        self.others = [m for m in members if m != host.peer_id]
        self.keys = {"g": fingerprint(members), "l": layout_key}
        self.result = torch.empty_like(flat)
        self.findings: list[Offense] = []  # every owner's verdicts, in member then shard order
        self.offenses: list[Offense] = []  # one per excluded peer
        self.agreed = asyncio.Event()  # set once the verdicts of every owner are in
        self.chunk_wire = codec.wire_bytes(plan.chunk)
        self.abstain = not bool(torch.isfinite(flat).all())
        self.arrivals: dict[str, list[tuple[float, int]]] = {p: [] for p in self.others}

    def _tag(self, phase: str, chunk: int) -> str:
        return f"{self.prefix}{phase}|{chunk}"

    def _timeout(self, peer: str, heard: bool) -> float:
        left = self.deadline - asyncio.get_running_loop().time()
        if heard:  # after the first message, silence longer than a few chunk times = stall
            left = min(left, self.policy.stall_s(self.host, peer, self.chunk_wire * 4, 12 * self.plan.chunk))
        return max(0.01, left)

    async def _recv(self, peer: str, tag: str, heard: bool) -> tuple[dict, Any]:
        hdr, payload = await self.host.recv(peer, tag, timeout=self._timeout(peer, heard))
        self.arrivals[peer].append((asyncio.get_running_loop().time(), len(payload)))
        if not isinstance(hdr, dict):
            raise CollectiveError(f"peer {peer[:8]} sent a malformed header")
        return hdr, payload

    async def run(self) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        send_s = max(self.policy.stall_s(self.host, p, self.chunk_wire * 4, 12 * self.plan.chunk)
                     for p in self.others)
        senders = {p: Sender(self.host, p, send_s) for p in self.others}
        tasks = [loop.create_task(s.run()) for s in senders.values()]

        async def feed() -> None:
            try:
                await _all_or_nothing([self._contribute(senders), self._own_shard(senders),
                                       *(self._gather_from(j) for j in range(self.n) if j != self.rank)])
            finally:
                for s in senders.values():
                    s.close()
        await _all_or_nothing([feed(), *tasks])
        for peer, arrivals in self.arrivals.items():
            if len(arrivals) > 2:
                observe_bandwidth(self.host, peer, sum(b for _, b in arrivals[1:]), arrivals[-1][0] - arrivals[0][0])
        return self.result

    async def _contribute(self, senders: dict[str, Sender]) -> None:
        """Round 1, sending side: this peer's slice of every other shard, to its owner."""
        for j, owner in enumerate(self.members):
            if j == self.rank:
                continue
            if self.abstain:
                senders[owner].put((_CONTRIB, 0, 0), self._tag("c", 0), {**self.keys, "a": 1}, b"")
                continue
            for c, (a, b) in enumerate(self.plan.chunks(j)):
                meta, payload = await compute(lambda a=a, b=b: self.codec.encode(self.flat[a:b]), b - a)
                senders[owner].put((_CONTRIB, 0, c), self._tag("c", c), {**self.keys, "m": meta}, payload)

    async def _collect(self, peer: str, rows: torch.Tensor, a0: int) -> tuple[str, str] | None:
        """Decode ``peer``'s slice of this peer's shard into ``rows``; its offense, if any."""
        for c, (a, b) in enumerate(self.plan.chunks(self.rank)):
            hdr, payload = await self._recv(peer, self._tag("c", c), heard=c > 0)
            if hdr.get("g") != self.keys["g"] or hdr.get("l") != self.keys["l"]:
                return "mismatch", "contribution for another membership, tensor layout, codec or config"
            if hdr.get("a"):
                return "non-finite", "abstained: its input holds inf/NaN"
            meta = hdr.get("m")
            if not isinstance(meta, dict) or meta.get("numel") != b - a:
                return "undecodable", "chunk meta missing or of the wrong size"
            try:
                rows[a - a0:b - a0] = await compute(
                    lambda: self.codec.decode(meta, payload, device=self.flat.device), b - a)
            except CodecError as exc:
                return "undecodable", str(exc)[:200]
        return None

    async def _own_shard(self, senders: dict[str, Sender]) -> None:
        """Rounds 1-3 as the owner of shard ``rank``: collect, screen, exchange verdicts,
        aggregate over the accepted contributions and send the result to every peer."""
        a0, b0 = self.plan.bounds[self.rank]
        contributions = torch.empty(self.n, b0 - a0, dtype=torch.float32, device=self.flat.device)
        contributions[self.rank] = self.flat[a0:b0]
        found = await asyncio.gather(*(self._collect(p, contributions[self.members.index(p)], a0)
                                       for p in self.others))
        bad = {p: f for p, f in zip(self.others, found) if f is not None}
        if self.abstain:
            bad[self.host.peer_id] = ("non-finite", "abstained: its input holds inf/NaN")
        live = [i for i, m in enumerate(self.members) if m not in bad]
        if live:
            for k, verdict in (await compute(lambda: screen(contributions[live], self.cfg),
                                             len(live) * (b0 - a0))).items():
                bad[self.members[live[k]]] = verdict
        mine = [[p, code, detail] for p, (code, detail) in bad.items()]
        for p in self.others:
            senders[p].put((_VERDICT, 0, 0), self._tag("v", 0), {**self.keys, "off": mine}, b"")
        offenses = [Offense(p, code, detail, self.rank) for p, code, detail in mine]
        for j, owner in enumerate(self.members):
            if j != self.rank:
                offenses += await self._verdict(owner, j)
        self.findings = sorted(offenses, key=lambda o: (self.members.index(o.peer), o.shard))
        self.offenses = first_per_peer(self.findings)
        self.agreed.set()
        excluded = sorted(o.peer for o in self.offenses)
        accepted = [i for i, m in enumerate(self.members) if m not in excluded]
        if not accepted:
            raise CollectiveError(f"every contribution was rejected: {[o.reason() for o in self.offenses]}")
        agg = await compute(lambda: aggregate(contributions[accepted], self.cfg), len(accepted) * (b0 - a0))
        for c, (a, b) in enumerate(self.plan.chunks(self.rank)):
            def encode(a=a, b=b):
                meta, out = self.codec.encode(agg[a - a0:b - a0])
                # The owner keeps exactly what everyone else will decode from these bytes.
                self.codec.decode(meta, out, device=self.flat.device, out=self.result[a:b])
                return meta, out
            meta, out = await compute(encode, b - a)
            for p in self.others:
                senders[p].put((_GATHER, 0, c), self._tag("g", c), {**self.keys, "m": meta, "x": excluded}, out)

    async def _verdict(self, owner: str, shard: int) -> list[Offense]:
        hdr, _ = await self._recv(owner, self._tag("v", 0), heard=False)
        off = hdr.get("off")
        if hdr.get("g") != self.keys["g"]:
            raise CollectiveAborted(f"peer {owner[:8]} has another membership view")
        if not isinstance(off, list) or not all(
                isinstance(o, list) and len(o) == 3 and o[0] in self.members
                and all(isinstance(s, str) for s in o) for o in off):
            raise CollectiveError(f"shard owner {owner[:8]} sent a malformed verdict")
        return [Offense(p, code[:40], detail[:300], shard) for p, code, detail in off]

    async def _gather_from(self, j: int) -> None:
        """Round 3, receiving side: owner j's quantized shard, decoded into the result."""
        owner = self.members[j]
        for c, (a, b) in enumerate(self.plan.chunks(j)):
            hdr, payload = await self._recv(owner, self._tag("g", c), heard=c > 0)
            if hdr.get("g") != self.keys["g"]:
                raise CollectiveAborted(f"peer {owner[:8]} has another membership view")
            meta = hdr.get("m")
            await self.agreed.wait()
            if hdr.get("x") != sorted(o.peer for o in self.offenses) or not isinstance(meta, dict) \
                    or meta.get("numel") != b - a:
                raise CollectiveError(f"shard owner {owner[:8]} sent its shard with other exclusions or "
                                      "a malformed header")
            try:
                await compute(lambda: self.codec.decode(meta, payload, device=self.flat.device,
                                                        out=self.result[a:b]), b - a)
            except CodecError as exc:
                raise CollectiveError(f"shard owner {owner[:8]} sent an undecodable shard: {exc}") from exc


def first_per_peer(findings: list[Offense]) -> list[Offense]:
    """One offense per excluded peer: its first finding (``findings`` in member, shard order)."""
    first: dict[str, Offense] = {}
    for o in findings:
        first.setdefault(o.peer, o)
    return list(first.values())


def report_offenses(offenses: list[Offense], cfg: RobustConfig) -> None:
    """Log each offense and hand it to the ``on_offender`` hook (a failing hook is logged only)."""
    for o in offenses:
        log.warning("robust all-reduce excluded peer %s: %s", o.peer[:8], o.reason())
        if cfg.on_offender is not None:
            try:
                cfg.on_offender(o.peer, o.reason())
            except Exception:  # noqa: BLE001 - a broken hook must not break the collective
                log.exception("on_offender hook failed")

