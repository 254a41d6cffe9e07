"""Link matrix and ring ordering.

Every peer knows its own row: round-trip time and bandwidth to each member, measured from real
traffic by the transport (``host.link_stats``) or by the collectives' own pipelined receives.
Where a link has carried nothing yet, a cheap probe fills in (one empty call for the RTT, one call carrying ``probe_bytes`` for bandwidth).
Rows are all-gathered (exact raw fp64), so every peer holds the same matrix and computes the
same ring. The ring maximizes its slowest directed link (bottleneck TSP): exact permutation
search up to ``EXACT_MAX`` peers, greedy plus swap improvement above.

Paths (issue 15): a link through a relay (``host.link_path`` = "relayed") counts at
``RELAYED_WEIGHT`` of its measured bandwidth. Its two hops share the relay's access link with
the relay's own ring traffic, which one transfer's measurement does not show; the weight makes
the ring route NATed peers next to peers they reach directly (or punched) and keeps relayed
hops few. Being in the all-gathered rows, it changes every peer's ring alike.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
import weakref
from dataclasses import dataclass

import torch

from peer.errors import LowbandError

from .deadline import observed_bandwidth
from .group import Group
from .p2p import all_gather

PROBE_METHOD = "lowband.collectives.probe"
EXACT_MAX = 8
RELAYED_WEIGHT = 0.5
_installed: "weakref.WeakSet" = weakref.WeakSet()


async def _probe_handler(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
    return {"n": len(payload)}, b""


def install_probe(host) -> None:
    """Register the probe handler on ``host`` once (every peer that may be probed needs it)."""
    if host not in _installed:
        host.handle(PROBE_METHOD, _probe_handler)
        _installed.add(host)


@dataclass(frozen=True)
class LinkMatrix:
    """bandwidth_Bps[i][j] / rtt_s[i][j]: link from peers[i] to peers[j], as i measured it
    (0 bandwidth = unknown/unreachable; the diagonal is inf / 0)."""

    peers: list[str]
    bandwidth_Bps: list[list[float]]
    rtt_s: list[list[float]]

    def as_dict(self) -> dict:
        """JSON-friendly form for the coordinator's status page."""
        return {
            "peers": list(self.peers),
            "bandwidth_Bps": {a: {b: self.bandwidth_Bps[i][j] for j, b in enumerate(self.peers) if i != j}
                              for i, a in enumerate(self.peers)},
            "rtt_s": {a: {b: self.rtt_s[i][j] for j, b in enumerate(self.peers) if i != j}
                      for i, a in enumerate(self.peers)},
        }

    def bottleneck(self, order: list[str]) -> float:
        idx = {p: i for i, p in enumerate(self.peers)}
        if len(order) < 2:
            return math.inf
        return min(self.bandwidth_Bps[idx[a]][idx[b]] for a, b in zip(order, order[1:] + order[:1]))


async def measure_row(host, peers: list[str], *, probe_bytes: int = 256 * 1024,
                      timeout: float = 10.0) -> list[tuple[float, float]]:
    """(rtt_s, bandwidth_Bps) from this host to each of ``peers``; self gives (0, inf)."""
    install_probe(host)

    async def one(peer: str) -> tuple[float, float]:
        if peer == host.peer_id:
            return 0.0, math.inf
        stats = host.link_stats(peer)
        rtt = stats.rtt_s
        bw = stats.bandwidth_Bps or observed_bandwidth(host, peer)
        try:
            if not rtt:
                t0 = time.perf_counter()
                await host.call(peer, PROBE_METHOD, {}, b"", timeout=timeout)
                rtt = time.perf_counter() - t0
            if not bw:
                t0 = time.perf_counter()
                await host.call(peer, PROBE_METHOD, {}, bytes(probe_bytes), timeout=timeout)
                bw = probe_bytes / max(time.perf_counter() - t0 - rtt, 1e-6)
        except (LowbandError, OSError, TimeoutError):
            return (rtt or math.inf), 0.0
        if getattr(host, "link_path", lambda _: None)(peer) == "relayed":
            bw *= RELAYED_WEIGHT
        return float(rtt), float(bw)

    return list(await asyncio.gather(*(one(p) for p in peers)))


async def collect_matrix(group: Group, *, tag: str, probe_bytes: int = 256 * 1024) -> LinkMatrix:
    """All members measure their row and all-gather the rows; identical on every member."""
    install_probe(group.host)
    # Barrier: nobody probes a member before that member has installed its probe handler.
    await all_gather(group, [], tag=tag + "-sync", codec=None)
    row = await measure_row(group.host, group.members, probe_bytes=probe_bytes)
    mine = torch.tensor([[bw for _, bw in row], [rtt for rtt, _ in row]], dtype=torch.float64)
    rows = await all_gather(group, [mine], tag=tag, codec=None)
    peers = [m for m in group.members if m in rows]
    pos = [group.members.index(m) for m in peers]
    bw = [[float(rows[a][0][0, j]) for j in pos] for a in peers]
    rtt = [[float(rows[a][0][1, j]) for j in pos] for a in peers]
    return LinkMatrix(peers, bw, rtt)


def ring_order(matrix: LinkMatrix) -> list[str]:
    """Member order whose slowest directed link is fastest; ties go to the larger total
    bandwidth, then to the earliest order, so every peer picks the same ring."""
    peers = matrix.peers
    n = len(peers)
    if n <= 2:
        return list(peers)
    bw = matrix.bandwidth_Bps

    def score(order: tuple[int, ...]) -> tuple[float, float]:
        edges = [bw[a][b] for a, b in zip(order, order[1:] + order[:1])]
        return min(edges), sum(e for e in edges if math.isfinite(e))

    if n <= EXACT_MAX:
        best = max(((0, *rest) for rest in itertools.permutations(range(1, n))), key=score)
    else:
        best = _greedy(bw, score)
    return [peers[i] for i in best]


def _greedy(bw: list[list[float]], score) -> tuple[int, ...]:
    n = len(bw)
    order, left = [0], set(range(1, n))
    while left:  # fastest next hop first
        nxt = max(sorted(left), key=lambda j: bw[order[-1]][j])
        order.append(nxt)
        left.discard(nxt)
    best, improved = tuple(order), True
    while improved:  # swap pairs while it raises the bottleneck (or total at equal bottleneck)
        improved = False
        for i, j in itertools.combinations(range(1, n), 2):
            cand = list(best)
            cand[i], cand[j] = cand[j], cand[i]
            if score(tuple(cand)) > score(best):
                best, improved = tuple(cand), True
    return best


async def optimize_ring(group: Group, *, tag: str) -> tuple[Group, LinkMatrix]:
    """Measure, agree on the matrix, and return the group re-ordered into the best ring."""
    matrix = await collect_matrix(group, tag=tag)
    return group.with_members(ring_order(matrix)), matrix
