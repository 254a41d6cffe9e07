"""``MeshAverager``: the `Averager` of a real peer — a rendezvous names the participants of each
outer step, then ``collectives.all_reduce`` averages the pseudo-gradients over the mesh.

The trainer runs in its own thread; ``start`` hands the work to the peer's asyncio loop with
``asyncio.run_coroutine_threadsafe`` and returns its ``concurrent.futures.Future`` at once.
The all-reduce's fault handling (abort, agree on survivors, retry) drops a peer that dies mid
operation, so the step completes with the survivors and ``participants`` says how many remain.
Results are bit-identical on every participant (DESIGN.md section 3), which keeps the global
state hash equal everywhere.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from torch import Tensor

from collectives import CollectiveError, Group, all_reduce

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
    """What the last average cost: participants, attempts, bytes on the wire, seconds."""

    members: list[str] = field(default_factory=list)
    attempts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rendezvous_s: float = 0.0
    reduce_s: float = 0.0


class MeshAverager:
    """Implements ``diloco.averager.Averager`` over a ``PeerHost``.

    rendezvous(tag) -> Rendezvous: who takes part (raise NotAParticipant to sit out).
    membership(): peer ids believed alive (the daemon's mesh view), for the all-reduce's
    agreement round after a failure. codec / codec_options: as for ``all_reduce``.
    """

    def __init__(self, host, loop: asyncio.AbstractEventLoop,
                 rendezvous: Callable[[str], Awaitable[Rendezvous]], *, codec: str = "int8",
                 membership: Callable[[], Iterable[str]] | None = None,
                 timeout_s: float | None = None, **codec_options) -> None:
        self.host = host
        self.loop = loop
        self.rendezvous = rendezvous
        self.codec = codec
        self.codec_options = codec_options
        self.membership = membership
        self.timeout_s = timeout_s
        self.last = AverageStats()
        self._size = 1
        self._running: set[Future] = set()

    @property
    def group_size(self) -> int:
        return self._size

    def start(self, tensors: list[Tensor], tag: str) -> Future[list[Tensor]]:
        fut = asyncio.run_coroutine_threadsafe(self._average(tensors, tag), self.loop)
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

    async def _average(self, tensors: list[Tensor], tag: str) -> AverageResult:
        t0 = time.perf_counter()
        rv = await self.rendezvous(tag)
        t1 = time.perf_counter()
        me = self.host.peer_id
        others = [p for p in rv.participants if p != me]
        sent0, recv0 = self._traffic(others)
        group = Group(self.host, rv.participants,
                      membership=self._alive if self.membership is not None else None)
        try:
            out = await all_reduce(group, tensors, tag=rv.tag, codec=self.codec,
                                   timeout=self.timeout_s, **self.codec_options)
        except CollectiveError as e:
            raise AveragingError(f"all-reduce {rv.tag} over {len(rv.participants)} peers "
                                 f"failed: {e}") from e
        sent1, recv1 = self._traffic(others)
        self._size = len(out.members)
        self.last = AverageStats(list(out.members), out.attempts, sent1 - sent0, recv1 - recv0,
                                 t1 - t0, time.perf_counter() - t1)
        return AverageResult(list(out), participants=len(out.members))

    def _alive(self) -> Iterable[str]:
        assert self.membership is not None
        return set(self.membership()) | {self.host.peer_id}
