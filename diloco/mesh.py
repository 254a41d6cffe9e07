"""``MeshAverager``: the `Averager` of a real peer — a rendezvous names the participants of each
outer step, then ``collectives.all_reduce`` averages the pseudo-gradients over the mesh.

The trainer runs in its own thread; ``start`` hands the work to the peer's asyncio loop with
``asyncio.run_coroutine_threadsafe`` and returns its ``concurrent.futures.Future`` at once.
The all-reduce's fault handling (abort, agree on survivors, retry) drops a peer that dies mid
operation, so the step completes with the survivors and ``participants`` says how many remain.
Results are bit-identical on every participant (docs/architecture.md §Bit parity), which keeps the global
state hash equal everywhere.

With ``robust`` set, the average is the robust all-reduce (collectives.robust): peers whose
pseudo-gradient is poisoned are excluded (every participant still gets the result), the
participant count leaves them out, and ``last`` says who was excluded and which of them this
peer caught itself as a shard owner -- what it may report to the coordinator (only for an
average over exactly the rendezvous participants, whose order fixes the shard owners).

While the coordinator is unreachable, ``offline_rendezvous`` stands in for its rendezvous: the
peers of the last completed average meet over the mesh (rule in its docstring, tags from
``step_tag``).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import torch
from torch import Tensor

from collectives import (CollectiveError, DeadlinePolicy, Group, Offense, RobustConfig,
                         all_reduce)

from .averager import AverageResult
from .errors import AveragingError


@dataclass(frozen=True)
class Rendezvous:
    """Who averages this operation, and the collective tag all of them use."""

    participants: list[str]
    tag: str


class NotAParticipant(AveragingError):
    """The rendezvous closed without this peer (it arrived late, or its state hash disagreed
    with the majority): it must resync from ``donors`` before taking part again."""

    def __init__(self, message: str, donors: list[str], late: bool) -> None:
        super().__init__(message)
        self.donors = donors
        self.late = late


@dataclass
class AverageStats:
    """What the last average cost: participants, attempts, bytes on the wire, seconds; with the
    robust all-reduce, who was excluded (``offenders``, the same on every peer) and the offenses
    this peer witnessed as the owner of a shard (``caught``, never itself)."""

    members: list[str] = field(default_factory=list)
    attempts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rendezvous_s: float = 0.0
    reduce_s: float = 0.0
    offenders: list[Offense] = field(default_factory=list)
    caught: list[Offense] = field(default_factory=list)


class MeshAverager:
    """Implements ``diloco.averager.Averager`` over a ``PeerHost``.

    rendezvous(tag) -> Rendezvous: who takes part (raise NotAParticipant to sit out).
    membership(): peer ids believed alive (the daemon's mesh view), for the all-reduce's
    agreement round after a failure. codec / codec_options / robust: as for ``all_reduce``.
    """

    def __init__(self, host, loop: asyncio.AbstractEventLoop,
                 rendezvous: Callable[[str], Awaitable[Rendezvous]], *, codec: str = "int8",
                 membership: Callable[[], Iterable[str]] | None = None,
                 timeout_s: float | None = None, robust: RobustConfig | None = None,
                 **codec_options) -> None:
        self.host = host
        self.loop = loop
        self.rendezvous = rendezvous
        self.codec = codec
        self.codec_options = codec_options
        self.membership = membership
        self.timeout_s = timeout_s
        self.robust = robust
        self.last = AverageStats()
        self._size = 1
        self._running: set[Future] = set()

    @property
    def group_size(self) -> int:
        return self._size

    def start(self, tensors: list[Tensor], tag: str, *, within_s: float | None = None) -> Future[list[Tensor]]:
        fut = asyncio.run_coroutine_threadsafe(self._average(tensors, tag, within_s or 0.0), self.loop)
        self._running.add(fut)
        fut.add_done_callback(self._running.discard)
        return fut

    def cancel(self) -> None:
        """Abort the averages in flight (the peer is stopping); their futures raise."""
        for fut in list(self._running):
            fut.cancel()

    def _traffic(self, peers: Iterable[str]) -> tuple[int, int]:
        stats = [self.host.link_stats(p) for p in peers]
        return sum(s.bytes_sent for s in stats), sum(s.bytes_received for s in stats)

    async def _average(self, tensors: list[Tensor], tag: str, pace_s: float) -> AverageResult:
        t0 = time.perf_counter()
        rv = await self.rendezvous(tag)
        t1 = time.perf_counter()
        me = self.host.peer_id
        others = [p for p in rv.participants if p != me]
        sent0, recv0 = self._traffic(others)
        group = Group(self.host, rv.participants,
                      membership=self._alive if self.membership is not None else None)
        try:
            out = await all_reduce(group, tensors, tag=rv.tag, codec=self.codec, timeout=self.timeout_s,
                                   robust=self.robust, pace_s=pace_s, **self.codec_options)
        except CollectiveError as e:
            raise AveragingError(f"all-reduce {rv.tag} over {len(rv.participants)} peers "
                                 f"failed: {e}") from e
        sent1, recv1 = self._traffic(others)
        # The mean is over the accepted contributions only.
        self._size = len(out.members) - len(out.offenders)
        # What this peer caught as a shard owner; reportable only when the average ran over
        # exactly the rendezvous participants: the coordinator checks the shard index against
        # that ring order (after a retry over survivors the indices shift; those go unreported).
        caught = [o for o in out.findings if out.members[o.shard] == me and o.peer != me]
        if list(out.members) != list(rv.participants):
            caught = []
        self.last = AverageStats(list(out.members), out.attempts, sent1 - sent0, recv1 - recv0,
                                 t1 - t0, time.perf_counter() - t1, list(out.offenders), caught)
        return AverageResult(list(out), participants=self._size)

    def _alive(self) -> Iterable[str]:
        assert self.membership is not None
        return set(self.membership()) | {self.host.peer_id}


def step_tag(run: str, generation: int, step: int, base_hash: str) -> str:
    """The collective tag of outer step ``step`` of ``run``: derived by every peer from what it
    holds (the run's generation, the step, the hash of its global state before the step), never
    taken from an answer, so a step the coordinator led and the same step taken offline carry
    the same tag (the coordinator's own ``tag`` field is the part before the hash). The hash
    prefix keeps peers whose states differ out of each other's collectives: offline there is
    no majority vote of base hashes to do that."""
    return f"{run}.g{generation}.s{step}.{base_hash[:16]}"


async def offline_rendezvous(host, view: Iterable[str], tag: str, *, reachable: bool,
                             wait_s: float,
                             membership: Callable[[], Iterable[str]] | None = None
                             ) -> tuple[list[str], bool]:
    """Rendezvous of one outer step without the coordinator -> (participants, back).

    Rule: the peers of ``view`` (the members of the last completed average, this one included)
    all-reduce one number each, over tag ``tag`` (a ``step_tag`` plus a suffix): 1 if the peer
    reached the coordinator since its last step (``reachable``), else 0. It is a barrier: every
    attempt waits up to ``wait_s`` (the run's sync timeout) for peers still in their inner
    phase, while a dead peer fails its connection at once and the all-reduce's abort, agree and
    retry drop it. The all-reduce ends with one member list and one sum, bit-identical on every
    peer that returns, so all of them take the same decisions: ``participants`` (sorted, the
    coordinator's order) average the step's pseudo-gradients, and ``back`` (every participant
    reached the coordinator) sends all of them to the coordinator for this step instead --
    a group never splits between a coordinator-led and an offline step by its own choice.
    """
    group = Group(host, sorted(set(view) | {host.peer_id}), membership=membership,
                  policy=DeadlinePolicy(floor_s=wait_s, stall_floor_s=wait_s))
    try:
        out = await all_reduce(group, [torch.tensor([float(reachable)])], tag=tag,
                               codec="fp32", op="sum")
    except CollectiveError as e:
        raise AveragingError(f"offline rendezvous {tag} over {group.size} peers failed: "
                             f"{e}") from e
    return sorted(out.members), int(out[0].item()) == len(out.members)
