"""A fake ``coordinator.clock.Clock``: time moves only when the test calls ``advance`` (and by
``TICK_S`` per reading), and ``sleep`` waits for fake time, never real time, so failure detection
and deadlines are tested without sleeping and without races."""
from __future__ import annotations

import asyncio
import time

# Each reading moves time on by a microsecond: like a real clock, it never returns the same instant
# twice, so rows stamped one after another (joins, arrivals) keep their order.
TICK_S = 1e-6


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        # From the real time by default: other parts of the coordinator (status page, bans)
        # still read the wall clock and compare it with what the fake one stamped.
        self.now = time.time() if start is None else start
        self._sleepers: dict[asyncio.Future, tuple[float, asyncio.Task | None]] = {}
        self._changed = asyncio.Event()

    def time(self) -> float:
        self.now += TICK_S
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken = asyncio.get_running_loop().create_future()
        self._sleepers[woken] = (self.now + max(0.0, seconds), asyncio.current_task())
        self._changed.set()
        try:
            if seconds > 0:
                await woken
            else:
                await asyncio.sleep(0)
        finally:
            self._sleepers.pop(woken, None)

    def sleeping(self) -> int:
        """How many tasks wait on this clock now."""
        return sum(1 for f in self._sleepers if not f.done())

    async def until_sleeping(self, n: int, timeout_s: float = 10.0) -> None:
        """Return once ``n`` tasks wait on this clock (real-time limit ``timeout_s``)."""
        async def wait() -> None:
            while self.sleeping() < n:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout_s)

    async def advance(self, seconds: float, *, settle_s: float = 10.0) -> None:
        """Move time on by ``seconds``; wake every sleeper whose deadline passed and return once
        each woken task sleeps on this clock again or has finished (``settle_s``: real-time
        limit, for a task stuck on something else)."""
        self.now += seconds
        woken: set[asyncio.Task] = set()
        for future, (deadline, task) in list(self._sleepers.items()):
            if deadline <= self.now and not future.done():
                future.set_result(None)
                if task is not None:
                    woken.add(task)
        await asyncio.wait_for(self._settle(woken), settle_s)

    async def _settle(self, tasks: set[asyncio.Task]) -> None:
        while True:
            asleep = {t for f, (_, t) in self._sleepers.items() if not f.done()}
            busy = {t for t in tasks if not t.done() and t not in asleep}
            if not busy:
                return
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({changed, *busy}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
