"""Which batches of a training run's data stream each peer trains on next: the ``DataPlan`` the
coordinator puts in its run answers, shared by both ends (torch-free: coordinator/runs.py writes
it, diloco/data.py and the train role read it).

The run's data is one endless stream of global batch numbers 0, 1, 2, ... (diloco/data.py:
``RunBatches`` says which token windows batch g holds). A plan hands ``count`` consecutive
batch numbers to each of its ``members`` in their given order (the rendezvous order, sorted peer
ids): member i trains on [base + i*count, base + (i+1)*count). Ranges of one plan are disjoint,
and the coordinator's run cursor only moves forward (the next plan starts at ``end`` or later),
so no two plans overlap either. ``then(members)`` is the plan of the following step when peers
must derive it themselves (offline steps: every participant holds the same last plan and the
same sorted participant list, so all derive the same ranges).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

MAX_BATCH = 2**62  # bounds hostile input; a run never gets near it


class DataPlanError(ValueError):
    """A plan that is malformed, or that does not name this peer."""


@dataclass(frozen=True)
class DataLease:
    """Global batch numbers [start, start + count) of one peer for one inner phase."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class DataPlan:
    base: int
    count: int
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("base", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_BATCH:
                raise DataPlanError(f"data plan {name} must be an integer in [0, 2**62), got {value!r}")
        if self.count < 1:
            raise DataPlanError(f"data plan count must be >= 1, got {self.count}")
        if len(set(self.members)) != len(self.members):
            raise DataPlanError("data plan members must be distinct")
        if self.end >= MAX_BATCH:
            raise DataPlanError("data plan reaches past batch 2**62")

    @property
    def end(self) -> int:
        """First batch number after every range of this plan."""
        return self.base + len(self.members) * self.count

    def lease(self, peer_id: str) -> DataLease:
        try:
            i = self.members.index(peer_id)
        except ValueError:
            raise DataPlanError(f"peer {peer_id[:12]} is not in this data plan") from None
        return DataLease(self.base + i * self.count, self.count)

    def then(self, members: Sequence[str]) -> "DataPlan":
        """The next step's plan over ``members`` (in their order), right after this one."""
        return DataPlan(self.end, self.count, tuple(members))

    def to_json(self) -> dict[str, Any]:
        """Wire form; the members travel separately (the answer's ``participants``)."""
        return {"base": self.base, "count": self.count}

    @classmethod
    def from_json(cls, data: Any, members: Sequence[str]) -> "DataPlan":
        if not isinstance(data, dict) or set(data) != {"base", "count"}:
            raise DataPlanError(f"data plan must be an object with base and count, got {data!r}")
        return cls(data["base"], data["count"], tuple(members))
