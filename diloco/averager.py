"""How trainers average pseudo-gradients: the `Averager` protocol and an in-process group.

The trainers in this package never touch the network. They hand fp32 tensors to an `Averager`
and get a `concurrent.futures.Future` of the MEAN over the participants. The mesh implementation
(collectives.all_reduce running on the peer's asyncio loop thread, codec chosen there) lives with
the peer role; `LocalGroup` below is the IN-PROCESS implementation: K trainers running in threads
of one process, averaged exactly in fp32, for unit tests and simulations only.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import AveragingError, ConfigError


class AverageResult(list):
    """The averaged tensors (a `list[Tensor]`) plus how many peers took part, when the
    averager knows it (`participants is None` otherwise)."""

    def __init__(self, tensors: list[Tensor], participants: int | None = None) -> None:
        super().__init__(tensors)
        self.participants = participants


@runtime_checkable
class Averager(Protocol):
    """Averages a list of tensors over the current group of peers.

    `start` is thread-safe and returns at once; the future resolves to the element-wise MEAN over
    participants (an `AverageResult` when the participant count is known), with the same number,
    shapes and devices of tensors as given. Every peer passes the same `tag` for the same
    operation. The future raises on failure; it never hangs (the implementation owns a deadline).
    ``within_s`` (a hint): the result is not needed for about that long, so the traffic may be
    spread over it instead of bursting at the link's rate.
    """

    @property
    def group_size(self) -> int:
        """This peer's current view of the number of participants: informational, it may
        change on another thread (the trainers weight by the count an average reports)."""
        ...

    def start(self, tensors: list[Tensor], tag: str, *, within_s: float | None = None) -> Future[list[Tensor]]:
        ...


@dataclass
class _Round:
    contributions: dict[int, list[Tensor]] = field(default_factory=dict)
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

    def _start(self, rank: int, tensors: list[Tensor], tag: str) -> Future[list[Tensor]]:
        fut: Future[list[Tensor]] = Future()
        contribution = [t.detach().to("cpu", torch.float32, copy=True) for t in tensors]
        with self._lock:
            rnd = self._rounds.setdefault(tag, _Round())
            if rank in rnd.futures:
                fut.set_exception(AveragingError(f"rank {rank} started tag {tag!r} twice"))
                return fut
            rnd.contributions[rank] = contribution
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
        means = []
        for i in range(len(shapes[0])):
            acc = torch.zeros(shapes[0][i], dtype=torch.float32)
            for r in range(self.size):  # fixed order -> identical bits for every member
                acc += rnd.contributions[r][i]
            means.append(acc / self.size)
        for fut, devices in rnd.futures.values():
            fut.set_result(AverageResult([m.to(d, copy=True) for m, d in zip(means, devices)],
                                         participants=self.size))

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

    def start(self, tensors: list[Tensor], tag: str, *, within_s: float | None = None) -> Future[list[Tensor]]:
        return self.group._start(self.rank, tensors, tag)  # in-process: nothing to pace
