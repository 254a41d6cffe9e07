"""Ring all-reduce and reduce-scatter of tensor lists, with fault-tolerant retries.

Inputs are never modified (each attempt reads the same flat vector: a copy, or a lone fp32 input
itself), so "restore the input" after an abort is free and a retry over the survivors reduces
exactly the survivors' inputs. Inputs must not change while the call runs.
Accumulation is fp32 whatever the input dtype; results come back in each input's dtype/device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from compression import Codec

from .errors import CollectiveError
from .fault import run_resilient
from .group import Group
from .layout import Layout, flatten, fingerprint, layout_of, unflatten
from .ring import DEFAULT_CHUNK_BYTES, RingPlan, RingRun, resolve_codec
from .robust import Offense, RobustConfig, RobustRun, first_per_peer, report_offenses, robust_deadline_s

_OPS = ("mean", "sum")


class Reduced(list):
    """The result tensors (a plain list) plus who contributed: ``members`` (the membership of
    the attempt that succeeded) and ``attempts`` (1 = no retry). The robust all-reduce also
    sets ``offenders`` (who was excluded and why, one per peer) and ``findings`` (every shard
    owner's verdicts: ``members[o.shard]`` caught ``o.peer``, so a peer can tell what it witnessed
    itself); both the same on every peer, empty otherwise."""

    members: list[str]
    attempts: int
    offenders: list[Offense] = []
    findings: list[Offense] = []


@dataclass(frozen=True)
class Shard:
    """This peer's part [start, stop) of the flattened, reduced tensor list, in fp32."""

    start: int
    stop: int
    values: torch.Tensor
    members: list[str]


def ring_deadline_s(group: Group, numel: int, codec: Codec) -> float:
    """Deadline of one ring attempt over ``group``: 2(n-1)/n of the encoded payload through the
    slowest measured link, 2(n-1) dependent rounds, and encode/reduce work on ~3 passes of the
    fp32 vector."""
    n = group.size
    return group.policy.operation_s(group.host, group.others(), wire_bytes=2 * (n - 1) / n * codec.wire_bytes(numel),
                                    rounds=2 * (n - 1), compute_bytes=3 * 4 * numel)


def _flat_input(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The flat fp32 vector a ring reads. A single contiguous fp32 tensor is read in place: the
    ring never writes its input, and copying 100 MB into fresh pages costs more than a tenth of a
    second, all of it before the first byte goes out."""
    if len(tensors) == 1 and tensors[0].dtype == torch.float32 and tensors[0].is_contiguous():
        return tensors[0].detach().reshape(-1)
    return flatten(tensors)


def _unflatten_owned(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Result tensors from a flat result vector that nothing else references: a single fp32
    tensor on the same device takes the vector itself (no second 100 MB copy after the ring);
    several tensors are copied out, so none of them shares storage with another."""
    if len(layout.shapes) == 1 and layout.dtypes[0] == flat.dtype and layout.devices[0] == flat.device:
        return [flat.view(layout.shapes[0])]
    return unflatten(flat, layout)


async def _ring(group: Group, tensors: list[torch.Tensor], *, kind: str, tag: str, codec: str | Codec,
                op: str, timeout: float | None, chunk_bytes: int, gather: bool,
                codec_options: dict[str, Any], robust: RobustConfig | None = None,
                pace_s: float = 0.0) -> tuple[Any, list[str], int, list[Offense]]:
    if op not in _OPS:
        raise CollectiveError(f"op must be one of {_OPS}, got {op!r}")
    if isinstance(pace_s, bool) or not isinstance(pace_s, (int, float)) or not 0 <= pace_s < math.inf:
        raise CollectiveError(f"pace_s must be a finite number of seconds >= 0, got {pace_s!r}")
    if robust is not None and (not isinstance(robust, RobustConfig) or op != "mean"):
        raise CollectiveError("robust must be a RobustConfig, with op='mean' (it estimates a mean)")
    layout = layout_of(tensors, floating=True)
    cod = resolve_codec(codec, **codec_options)
    flat = _flat_input(tensors)
    numel = flat.numel()
    layout_key = fingerprint((layout.specs(), repr(cod), op, kind, robust and robust.key()))
    policy = group.policy
    attempts = 0

    def deadline_s(members: list[str]) -> float:
        if robust is not None:
            return robust_deadline_s(policy, group.host, members, cod.wire_bytes(numel), numel)
        return ring_deadline_s(group.with_members(members), numel, cod) + policy.safety * pace_s

    async def body(members: list[str], prefix: str, deadline: float) -> tuple[Any, list[str], int, list[Offense]]:
        nonlocal attempts
        attempts += 1
        if len(members) == 1:
            return None, members, attempts, []
        plan = RingPlan.make(numel, len(members), cod, chunk_bytes)
        if robust is not None:
            run = RobustRun(group.host, members, prefix, cod, flat, plan, robust, deadline=deadline,
                            policy=policy, layout_key=layout_key)
            return await run.run(), members, attempts, run.findings
        run = RingRun(group.host, members, prefix, cod, flat, plan, mean=op == "mean", gather=gather,
                      deadline=deadline, policy=policy, layout_key=layout_key, pace_s=pace_s)
        out = await run.run()
        if not gather:
            a, b = plan.bounds[(run.rank + 1) % len(members)]
            out = Shard(a, b, out, members)
        return out, members, attempts, []

    result = await run_resilient(group, kind, tag, body, deadline_s, timeout)
    if robust is not None:
        report_offenses(first_per_peer(result[3]), robust)
    return result


async def all_reduce(group: Group, tensors: list[torch.Tensor], *, tag: str, codec: str | Codec = "int8",
                     op: str = "mean", timeout: float | None = None,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES, robust: RobustConfig | None = None,
                     pace_s: float = 0.0, **codec_options: Any) -> Reduced:
    """Reduce ``tensors`` (any shapes, floating dtypes, same list on every peer) over the group.

    Returns new tensors with the inputs' shapes/dtypes/devices, bit-identical on every peer that
    returns. ``codec``: a codec name (``codec_options`` go to ``get_codec``) or a Codec.
    ``timeout`` caps the whole call including retries; by default each attempt's deadline is
    derived from the measured links and the payload (``Group.policy``).
    ``robust``: instead of the ring, the robust all-reduce of ``collectives.robust`` (every
    contribution screened at its shard's owner, offenders excluded and reported in
    ``Reduced.offenders`` and to ``robust.on_offender``; op must be "mean").
    ``chunk_bytes``: ring message size on the wire; on links measured fast (a grown chunk still
    moves in ``ring.GROW_CHUNK_S``) up to 4x that, fewer messages costing less CPU.
    ``pace_s``: spread this peer's sends over about that many seconds instead of bursting at the
    link's rate (an average that overlaps computation has time to spare; its deadline grows to
    match). The ring only: the robust all-reduce ignores it.
    Raises ``CollectiveError`` when no result can be produced.
    """
    out, members, attempts, findings = await _ring(
        group, tensors, kind="ar" if robust is None else "rar", tag=tag, codec=codec, op=op,
        timeout=timeout, chunk_bytes=chunk_bytes, gather=True, codec_options=codec_options, robust=robust,
        pace_s=pace_s)
    layout = layout_of(tensors, floating=True)
    result = Reduced([t.detach().clone() for t in tensors] if out is None else _unflatten_owned(out, layout))
    result.members, result.attempts = members, attempts
    result.offenders, result.findings = first_per_peer(findings), findings
    return result


async def reduce_scatter(group: Group, tensors: list[torch.Tensor], *, tag: str,
                         codec: str | Codec = "int8", op: str = "mean", timeout: float | None = None,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, **codec_options: Any) -> Shard:
    """Ring reduce-scatter: this peer gets its shard of the flattened (concatenated) tensor list,
    reduced in fp32 over the members (no final quantization). Shard bounds follow the ring
    position (position r owns shard r+1), see ``ring.RingPlan``."""
    out, members, _, _ = await _ring(group, tensors, kind="rs", tag=tag, codec=codec, op=op, timeout=timeout,
                                     chunk_bytes=chunk_bytes, gather=False, codec_options=codec_options)
    if out is None:
        flat = flatten(tensors)
        return Shard(0, flat.numel(), flat, members)
    return out
