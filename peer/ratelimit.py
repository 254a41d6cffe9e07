"""Keyed token buckets: per-client request-rate limits for the coordinator's HTTP API and the
PeerHost's incoming RPCs (the "request rates per peer" limit; a client is a peer id or an address).

Each key holds a bucket of ``burst`` tokens refilled at ``rate`` per second; a request takes one
token or is refused with the time until the next token. Only ``max_keys`` buckets are kept (least
recently used ones are forgotten, i.e. start full again), so a flood of distinct keys costs
bounded memory.
"""
from __future__ import annotations

import time
from typing import Callable


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, max_keys: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = float(rate)
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill); LRU order

    def acquire(self, key: str) -> float:
        """Take a token for ``key``: 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)  # re-inserted: dict order is recency order
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait
