"""``Group``: the ordered set of peers a collective runs over, plus its fault-handling knobs."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .deadline import DeadlinePolicy
from .errors import CollectiveError

if TYPE_CHECKING:
    from peer.transport import PeerHost


@dataclass
class Group:
    """Peers (ordered peer ids, including ``host.peer_id``) that run collectives together.

    The member order is the ring order; ``topology.optimize_ring`` returns a re-ordered group.
    ``membership`` is an optional hook returning the peers currently believed alive (e.g. the
    daemon's coordinator view): the agreement round after an abort does not wait for peers it
    rules out, but progress never depends on it. ``min_peers``: fewer survivors than this is
    an error instead of a retry. ``max_attempts``: attempts per collective (first + retries).
    """

    host: PeerHost
    members: list[str]
    min_peers: int = 1
    max_attempts: int = 4
    membership: Callable[[], Iterable[str]] | None = None
    policy: DeadlinePolicy = field(default_factory=DeadlinePolicy)

    def __post_init__(self) -> None:
        self.members = list(self.members)
        if len(set(self.members)) != len(self.members):
            raise CollectiveError(f"group members must be unique, got {self.members}")
        if self.self_id not in self.members:
            raise CollectiveError(f"group must include this peer ({self.self_id[:8]})")
        if self.min_peers < 1 or self.max_attempts < 1:
            raise CollectiveError("min_peers and max_attempts must be >= 1")

    @property
    def self_id(self) -> str:
        return self.host.peer_id

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def rank(self) -> int:
        return self.members.index(self.self_id)

    def others(self) -> list[str]:
        return [m for m in self.members if m != self.self_id]

    def with_members(self, members: Iterable[str]) -> "Group":
        """Same host and settings over another member list (e.g. survivors or a new ring order)."""
        return replace(self, members=list(members))

    def believed_alive(self) -> set[str] | None:
        """The membership hook's view, or None when there is no hook (or it fails)."""
        if self.membership is None:
            return None
        try:
            return set(self.membership())
        except Exception:  # noqa: BLE001 - a broken hook must not break the collective
            return None
