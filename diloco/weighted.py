"""The weighted average of pseudo-gradients over the mesh: sum_i(w_i * d_i) / sum_i(w_i), where
w_i is what peer i trained on in the round (its inner-phase batches), bit-identical on every peer.

Two all-reduces over the same group:

1. The weights: every peer puts its own weight at its index of a vector as long as the member
   list (zeros elsewhere); an exact fp32 sum (small integers) gives every peer every weight.
   Each is clamped to [0, ``cap``] (a peer cannot have trained on more than the range it was
   handed; one that lies about another's entry moves it inside that range at worst).
2. The terms: each peer multiplies its tensors by its weight locally in fp32 and the group
   SUMS them (the ring's fp32 accumulation, one encoder per shard: diloco/averager.py
   ``weighted_terms``). Every peer then divides the identical sums once by the same total,
   the weights of the members that the sum really holds (``Reduced.members`` after any retry
   over survivors, less the robust all-reduce's offenders), added in member order. With the
   robust all-reduce (which only averages), the mean over the n accepted terms is multiplied
   back by n before that division.

Robust mode screens the terms, so weights must not make an honest term look poisoned (the
screen flags a norm 4x the median): there every weight is also clamped to twice the median of
the positive weights, a number every peer computes from the same exchanged weights.

A joiner's zero contribution has weight 0, so it no longer dilutes the average.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from collectives import Group, Reduced, RobustConfig, all_reduce

from .averager import check_weight, divide_once, weighted_terms
from .errors import AveragingError


@dataclass
class WeightedResult:
    """The average (``tensors``, bit-identical on every peer), the reduce that carried it
    (``reduced``: members, offenders, findings), every member's weight and their total."""

    tensors: list[Tensor]
    reduced: Reduced
    weights: dict[str, float]
    total: float


async def exchange_weights(group: Group, weight: float, *, tag: str, cap: float) -> dict[str, float]:
    """Every member's weight (clamped to [0, cap]; 0 for members that left during the exchange)."""
    members = list(group.members)
    vec = torch.zeros(len(members), dtype=torch.float32)
    vec[members.index(group.host.peer_id)] = min(weight, cap)
    out = await all_reduce(group, [vec], tag=tag, codec="fp32", op="sum")
    summed = out[0].tolist()
    return {p: min(max(summed[i], 0.0), cap) if math.isfinite(summed[i]) else 0.0
            for i, p in enumerate(members) if p in out.members}


def screenable(weights: dict[str, float]) -> dict[str, float]:
    """Weights clamped to twice the median positive weight (robust mode, module docstring)."""
    positive = sorted(w for w in weights.values() if w > 0)
    if not positive:
        return dict(weights)
    limit = 2.0 * statistics.median(positive)
    return {p: min(w, limit) for p, w in weights.items()}


async def weighted_all_reduce(group: Group, tensors: list[Tensor], weight: float, *, tag: str,
                              cap: float, codec: str = "int8", robust: RobustConfig | None = None,
                              **options) -> WeightedResult:
    """The weighted average of ``tensors`` over ``group`` (module docstring). ``options`` go to
    ``all_reduce`` (timeout, pace_s, codec options). Raises ``CollectiveError`` like it."""
    weight = check_weight(weight)
    if weight is None or not (math.isfinite(cap) and cap > 0):
        raise AveragingError(f"a weighted average needs a weight and a cap > 0, got {weight}, {cap}")
    weights = await exchange_weights(group, weight, tag=f"{tag}.w", cap=cap)
    if robust is not None:
        weights = screenable(weights)
    # The terms are summed over whoever answered the weight exchange.
    terms_group = group.with_members(p for p in group.members if p in weights)
    mine = weights.get(group.host.peer_id, min(weight, cap))
    if robust is None:
        reduced = await all_reduce(terms_group, weighted_terms(tensors, mine), tag=tag,
                                   codec=codec, op="sum", **options)
        summed = list(reduced)
    else:
        reduced = await all_reduce(terms_group, weighted_terms(tensors, mine), tag=tag,
                                   codec=codec, robust=robust, **options)
        accepted = len(reduced.members) - len(reduced.offenders)
        summed = [t * float(accepted) for t in reduced]
    excluded = {o.peer for o in reduced.offenders}
    total = math.fsum(weights.get(p, 0.0) for p in reduced.members if p not in excluded)
    average = divide_once(summed, total)
    return WeightedResult([a.to(t.device, t.dtype) for a, t in zip(average, tensors)], reduced,
                          weights, total)
