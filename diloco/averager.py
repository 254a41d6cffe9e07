"""How trainers average pseudo-gradients: the `Averager` protocol and an in-process group.

The trainers in this package never touch the network. They hand fp32 tensors to an `Averager`
and get a `concurrent.futures.Future` of the MEAN over the participants, weighted by what each
contributed when they pass a ``weight`` (the batches of their inner phase: a peer that trained
on more data counts for more; ``weighted_mean`` below is the rule). The mesh implementation
(collectives.all_reduce running on the peer's asyncio loop thread, codec chosen there) lives with
the peer role; `LocalGroup` below is the IN-PROCESS implementation: K trainers running in threads
of one process, averaged exactly in fp32, for unit tests and simulations only.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import AveragingError, ConfigError


class AverageResult(list):
    """The averaged tensors (a `list[Tensor]`) plus how many peers took part, when the
    averager knows it (`participants is None` otherwise), and for a weighted average the sum of
    the participants' weights (`total_weight`; None: equal weights)."""

    def __init__(self, tensors: list[Tensor], participants: int | None = None,
                 total_weight: float | None = None) -> None:
        super().__init__(tensors)
        self.participants = participants
        self.total_weight = total_weight


def check_weight(weight: float | None) -> float | None:
    """A contribution's weight: None (equal weights) or a finite number >= 0."""
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not math.isfinite(weight) or weight < 0:
        raise AveragingError(f"an average's weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def weighted_terms(tensors: list[Tensor], weight: float) -> list[Tensor]:
    """w * d in fp32 on the tensors' devices: what a peer puts into a weighted SUM."""
    return [t.detach().to(torch.float32) * weight for t in tensors]


def divide_once(summed: list[Tensor], total: float) -> list[Tensor]:
    """sum(w_i * d_i) / sum(w_i): one fp32 division of the (bit-identical) sums by the same
    total on every peer. A total of 0 (every participant sent weight 0, e.g. all joiners sending
    zeros) averages to zeros."""
    if total <= 0:
        return [torch.zeros_like(t) for t in summed]
    return [t / total for t in summed]


def weighted_mean(contributions: list[list[Tensor]], weights: list[float]) -> list[Tensor]:
    """The rule every averager implements: sum_i(w_i * d_i) / sum_i(w_i), the products and sums
    in fp32, summed in the given order, divided once."""
    sums = None
    for terms in (weighted_terms(c, w) for c, w in zip(contributions, weights)):
        sums = terms if sums is None else [a + b for a, b in zip(sums, terms)]
    assert sums is not None, "no contributions"
    return divide_once(sums, math.fsum(weights))


@runtime_checkable
class Averager(Protocol):
    """Averages a list of tensors over the current group of peers.

    `start` is thread-safe and returns at once; the future resolves to the element-wise MEAN over
    participants (an `AverageResult` when the participant count is known), with the same number,
    shapes and devices of tensors as given. Every peer passes the same `tag` for the same
    operation. The future raises on failure; it never hangs (the implementation owns a deadline).
    ``weight``: this peer's weight (``weighted_mean``); every peer of an operation passes one
    or none does (None: the plain mean).
    ``within_s`` (a hint): the result is not needed for about that long, so the traffic may be
    spread over it instead of bursting at the link's rate.
    """

    @property
    def group_size(self) -> int:
        """This peer's current view of the number of participants: informational, it may
        change on another thread (the trainers weight by the count an average reports)."""
        ...

    def start(self, tensors: list[Tensor], tag: str, *, within_s: float | None = None,
              weight: float | None = None) -> Future[list[Tensor]]:
        ...


@dataclass
class _Round:
    contributions: dict[int, list[Tensor]] = field(default_factory=dict)
    weights: dict[int, float | None] = field(default_factory=dict)
    futures: dict[int, tuple[Future, list[torch.device]]] = field(default_factory=dict)
    timer: threading.Timer | None = None


class LocalGroup:
    """IN-PROCESS averaging group of `size` members (threads of one process). Not a transport.

    Each member gets an averager with `group.averager(rank)`. A round (one tag) completes when all
    members have started it; the mean is summed in rank order in fp32 on the CPU, so it is exact
    and deterministic. `delay_s` holds results back to simulate a slow link (for overlap tests);
    a round missing members after `timeout_s` fails every waiting future with AveragingError.
    """

    def __init__(self, size: int, *, timeout_s: float = 60.0, delay_s: float = 0.0) -> None:
        if size < 1:
            raise ConfigError(f"LocalGroup size must be >= 1, got {size}")
        if timeout_s <= 0 or delay_s < 0:
            raise ConfigError("LocalGroup needs timeout_s > 0 and delay_s >= 0")
        self.size = size
        self.timeout_s = timeout_s
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._rounds: dict[str, _Round] = {}

    def averager(self, rank: int) -> "LocalAverager":
        if not 0 <= rank < self.size:
            raise ConfigError(f"rank {rank} outside group of size {self.size}")
        return LocalAverager(self, rank)

    def _start(self, rank: int, tensors: list[Tensor], tag: str,
               weight: float | None = None) -> Future[list[Tensor]]:
        fut: Future[list[Tensor]] = Future()
        try:
            weight = check_weight(weight)
        except AveragingError as e:
            fut.set_exception(e)
            return fut
        contribution = [t.detach().to("cpu", torch.float32, copy=True) for t in tensors]
        with self._lock:
            rnd = self._rounds.setdefault(tag, _Round())
            if rank in rnd.futures:
                fut.set_exception(AveragingError(f"rank {rank} started tag {tag!r} twice"))
                return fut
            rnd.contributions[rank] = contribution
            rnd.weights[rank] = weight
            rnd.futures[rank] = (fut, [t.device for t in tensors])
            if rnd.timer is None:
                rnd.timer = threading.Timer(self.timeout_s, self._expire, args=(tag, rnd))
                rnd.timer.daemon = True
                rnd.timer.start()
            if len(rnd.futures) < self.size:
                return fut
            del self._rounds[tag]
        rnd.timer.cancel()
        if self.delay_s > 0:
            timer = threading.Timer(self.delay_s, self._finish, args=(tag, rnd))
            timer.daemon = True
            timer.start()
        else:
            self._finish(tag, rnd)
        return fut

    def _finish(self, tag: str, rnd: _Round) -> None:
        shapes = [[t.shape for t in rnd.contributions[r]] for r in range(self.size)]
        if any(s != shapes[0] for s in shapes):
            err = AveragingError(f"tag {tag!r}: members sent different tensor shapes: {shapes}")
            for fut, _ in rnd.futures.values():
                fut.set_exception(err)
            return
        weights = [rnd.weights[r] for r in range(self.size)]
        if len({w is None for w in weights}) > 1:
            err = AveragingError(f"tag {tag!r}: some members sent a weight and some did not")
            for fut, _ in rnd.futures.values():
                fut.set_exception(err)
            return
        total = None if weights[0] is None else math.fsum(weights)
        # rank order: identical bits for every member; weight 1 each is the plain mean
        means = weighted_mean([rnd.contributions[r] for r in range(self.size)],
                              [1.0 if w is None else w for w in weights])
        for fut, devices in rnd.futures.values():
            fut.set_result(AverageResult([m.to(d, copy=True) for m, d in zip(means, devices)],
                                         participants=self.size, total_weight=total))

    def _expire(self, tag: str, rnd: _Round) -> None:
        with self._lock:
            if self._rounds.get(tag) is not rnd:
                return
            del self._rounds[tag]
        missing = sorted(set(range(self.size)) - set(rnd.futures))
        err = AveragingError(f"tag {tag!r}: members {missing} did not join within {self.timeout_s}s")
        for fut, _ in rnd.futures.values():
            fut.set_exception(err)


class LocalAverager:
    """One member's handle on an IN-PROCESS `LocalGroup` (implements `Averager`)."""

    def __init__(self, group: LocalGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    @property
    def group_size(self) -> int:
        return self.group.size

    def start(self, tensors: list[Tensor], tag: str, *, within_s: float | None = None,
              weight: float | None = None) -> Future[list[Tensor]]:
        return self.group._start(self.rank, tensors, tag, weight)  # in-process: nothing to pace
