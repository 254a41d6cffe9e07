"""Deadlines derived from measured links and payload size (docs/architecture.md §Collectives: never a constant).

Every estimate is ``floor + safety * expected`` where ``expected`` adds the time to push the
payload through the slowest measured link (transport stats, else what the collectives observed
on their own pipelined receives), one round trip per protocol round, and the local
encode/reduce work. Until real traffic has measured a link, a deliberately pessimistic
``unmeasured_bandwidth_Bps`` stands in, so a fresh link gets a generous deadline rather than a
false abort.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

_EWMA = 0.3
# host -> {peer: bandwidth_Bps}: what the collectives measured themselves (bytes over time of the
# pipelined receives), for links whose transport stats have no sample yet.
_observed: "weakref.WeakKeyDictionary[object, dict[str, float]]" = weakref.WeakKeyDictionary()


def observe_bandwidth(host, peer: str, nbytes: int, seconds: float) -> None:
    """Record a bandwidth sample for the link from ``peer`` (an EWMA, like the transport's)."""
    if nbytes <= 0 or seconds <= 0:
        return
    sample = nbytes / seconds
    links = _observed.setdefault(host, {})
    old = links.get(peer)
    links[peer] = sample if old is None else (1 - _EWMA) * old + _EWMA * sample


def observed_bandwidth(host, peer: str) -> float | None:
    return _observed.get(host, {}).get(peer)


def _stats(host, peer: str):
    try:
        return host.link_stats(peer)
    except Exception:  # noqa: BLE001 - an unknown peer simply has no measurement yet
        return None


@dataclass(frozen=True)
class DeadlinePolicy:
    safety: float = 4.0                    # multiplies every expected duration
    floor_s: float = 5.0                   # minimum deadline of a whole operation
    stall_floor_s: float = 5.0             # minimum silence before a neighbour counts as stalled
    agree_floor_s: float = 3.0             # minimum wait per membership-agreement round
    unmeasured_bandwidth_Bps: float = 1e6  # stand-in until a link has been measured
    unmeasured_rtt_s: float = 0.05
    compute_Bps: float = 25e6              # conservative fp32 bytes/s of encode+reduce on a busy CPU

    # The floors are sized for busy shared CPUs, where an event loop can lag by seconds: a
    # live peer dropped as "stalled" costs more than a few seconds of waiting for a dead one.

    def __post_init__(self) -> None:
        for name in ("safety", "floor_s", "stall_floor_s", "agree_floor_s",
                     "unmeasured_bandwidth_Bps", "compute_Bps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DeadlinePolicy.{name} must be > 0")

    def link(self, host, peer: str) -> tuple[float, float]:
        """(rtt_s, bandwidth_Bps) of the link to ``peer``, measured where available."""
        stats = _stats(host, peer)
        rtt = getattr(stats, "rtt_s", None) or self.unmeasured_rtt_s
        bw = (getattr(stats, "bandwidth_Bps", None) or observed_bandwidth(host, peer)
              or self.unmeasured_bandwidth_Bps)
        return float(rtt), float(bw)

    def measured_bandwidth(self, host, peer: str) -> float | None:
        """Bytes/s of the link from ``peer`` as measured: the collectives' own pipelined receives
        first (a lower bound; the transport times large sends by when the socket took them,
        which can overstate a slow link), else the transport's; None until either measured."""
        return observed_bandwidth(host, peer) or getattr(_stats(host, peer), "bandwidth_Bps", None)

    def worst_link(self, host, peers: Iterable[str]) -> tuple[float, float]:
        links = [self.link(host, p) for p in peers] or [(self.unmeasured_rtt_s, self.unmeasured_bandwidth_Bps)]
        return max(r for r, _ in links), min(b for _, b in links)

    def operation_s(self, host, peers: Iterable[str], *, wire_bytes: float, rounds: int,
                    compute_bytes: float = 0.0) -> float:
        """Deadline of one attempt that sends ``wire_bytes`` over the slowest of ``peers``'
        links in ``rounds`` dependent message rounds and processes ``compute_bytes`` locally."""
        rtt, bw = self.worst_link(host, peers)
        expected = wire_bytes / bw + rounds * rtt + compute_bytes / self.compute_Bps
        return self.floor_s + self.safety * expected

    def stall_s(self, host, peer: str, message_bytes: float, compute_bytes: float = 0.0) -> float:
        """Longest silence from ``peer`` between two pipelined messages before we call it stalled."""
        rtt, bw = self.link(host, peer)
        return self.stall_floor_s + self.safety * (rtt + message_bytes / bw + compute_bytes / self.compute_Bps)

    def agree_s(self, host, peers: Iterable[str]) -> float:
        rtt, _ = self.worst_link(host, peers)
        return self.agree_floor_s + self.safety * rtt
