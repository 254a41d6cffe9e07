"""The coordinator's time source. Failure detection (coordinator/registry.py, the sweep loop in
coordinator/membership.py) and rendezvous deadlines (coordinator/runs.py) read time and wait
through a ``Clock``, so tests drive them with a fake one (testing/clock.py) instead of sleeping.
Production uses ``SYSTEM_CLOCK``."""
from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch: stored in the database and shown to operators."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """Wall-clock time and real waiting."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
