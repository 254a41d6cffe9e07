"""Per-peer link measurements taken from real traffic (no probing of its own)."""
from __future__ import annotations

from dataclasses import dataclass

BANDWIDTH_MIN_BYTES = 4 * 1024 * 1024  # transfers at least this large give bandwidth samples
_EWMA = 0.25


@dataclass
class LinkStats:
    """Link measurements from real traffic (EWMA of samples; None until the first sample)."""
    rtt_s: float | None = None
    bandwidth_Bps: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0

    def add_rtt(self, sample: float) -> None:
        self.rtt_s = sample if self.rtt_s is None else (1 - _EWMA) * self.rtt_s + _EWMA * sample

    def add_bandwidth(self, nbytes: int, seconds: float) -> None:
        if nbytes < BANDWIDTH_MIN_BYTES or seconds <= 0:
            return
        sample = nbytes / seconds
        self.bandwidth_Bps = sample if self.bandwidth_Bps is None else (1 - _EWMA) * self.bandwidth_Bps + _EWMA * sample

    def copy(self) -> "LinkStats":
        return LinkStats(self.rtt_s, self.bandwidth_Bps, self.bytes_sent, self.bytes_received)
