"""Repeated measurements and their median (the machines are small, shared and noisy: benches and
anchors report medians of repeats with the raw samples)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Repeated measurements of one quantity (seconds, Mbit/s, ... -- the caller's unit)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "samples": self.values}
