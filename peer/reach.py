"""How a peer can be reached, as the coordinator's view publishes it (issue 15), sans-IO.

Each peer's heartbeat stats carry a :class:`Reach` (``stats["reach"]``): whether it relays for
others (reachable peers do unless started with ``--no-relay``), its relay load (reservations
held there) and the relays it reserved at itself (an unreachable peer takes 1-2). The
coordinator stores it per peer and puts it in every view row (``relay``, ``relay_load``,
``relays``); both ends read and write it through this one schema.

From a view, :func:`route_for` says how to reach a peer (its address, dialled only if the
coordinator's probe reached it, and the relays it reserved at), and :func:`pick_relays`
chooses where an unreachable peer reserves: relaying peers that are reachable, by measured
round trip scaled by load (a relay carrying k reservations counts as ``1 + k / LOAD_SCALE``
times farther), unmeasured ones last (least loaded first), ties by peer id so the choice is
stable.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

MAX_RELAYS = 4        # relays one peer may name in its Reach (it takes RELAYS_PER_PEER)
RELAYS_PER_PEER = 2
LOAD_SCALE = 8.0      # reservations that double a relay's effective distance
_PEER_ID = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Reach:
    """``stats["reach"]`` of a heartbeat: relay offered, its load, relays reserved at."""

    relay: bool = False
    load: int = 0
    relays: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"relay": self.relay, "load": self.load, "relays": list(self.relays)}

    @classmethod
    def from_json(cls, data: object) -> "Reach":
        """ValueError naming the field for anything malformed."""
        if not isinstance(data, dict) or set(data) - {"relay", "load", "relays"}:
            raise ValueError("reach must be an object with keys relay, load, relays")
        relay, load, relays = data.get("relay", False), data.get("load", 0), data.get("relays", [])
        if not isinstance(relay, bool):
            raise ValueError("reach.relay must be true or false")
        if isinstance(load, bool) or not isinstance(load, int) or not 0 <= load < 1 << 31:
            raise ValueError("reach.load must be a non-negative integer")
        if (not isinstance(relays, list) or len(relays) > MAX_RELAYS
                or not all(isinstance(r, str) and _PEER_ID.fullmatch(r) for r in relays)
                or len(set(relays)) != len(relays)):
            raise ValueError(f"reach.relays must be at most {MAX_RELAYS} distinct peer ids")
        return cls(relay, load, tuple(relays))


@dataclass(frozen=True)
class Route:
    """How to reach one peer: ``address`` dialled only if ``reachable``; ``relays`` (peer id,
    address) it reserved at."""

    address: str
    reachable: bool
    relays: tuple[tuple[str, str], ...]


def route_for(row: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> Route | None:
    """The route to the peer of view ``row`` (``rows``: the view by peer id), or None when it
    cannot be reached yet: not probed, or unreachable without a live, reachable relay."""
    reachable = row.get("reachable")
    if reachable is None:  # not verified yet: never aim traffic at an unchecked address
        return None
    relays = []
    for rid in row.get("relays") or ():
        relay = rows.get(rid)
        if relay is not None and relay.get("reachable") is True and rid != row.get("peer_id"):
            relays.append((rid, str(relay["address"])))
    if reachable is not True and not relays:
        return None
    return Route(str(row["address"]), reachable is True, tuple(relays))


def relay_candidates(rows: Iterable[Mapping[str, Any]], self_id: str) -> list[Mapping[str, Any]]:
    """View rows of peers that relay for others and that we can dial."""
    return [r for r in rows if r.get("peer_id") != self_id and r.get("relay") is True
            and r.get("reachable") is True]


def pick_relays(candidates: Iterable[Mapping[str, Any]], rtt_s: Mapping[str, float], *,
                n: int = RELAYS_PER_PEER, keep: Iterable[str] = ()) -> list[str]:
    """The ``n`` relay peer ids to reserve at: ``keep`` ones still offered first (a working
    reservation is not moved for a slightly better one), then by round trip x load."""
    by_id = {str(c["peer_id"]): c for c in candidates}
    chosen = [k for k in keep if k in by_id][:n]

    def cost(pid: str) -> tuple[float, int, str]:
        load = max(0, int(by_id[pid].get("relay_load") or 0))
        return rtt_s.get(pid, math.inf) * (1.0 + load / LOAD_SCALE), load, pid

    for pid in sorted(set(by_id) - set(chosen), key=cost):
        if len(chosen) >= n:
            break
        chosen.append(pid)
    return chosen


def direct_first_order(participants: Iterable[str], unreachable: Iterable[str]) -> list[str]:
    """A ring order (for the coordinator's rendezvous answer) that keeps relayed hops few: the
    reachable participants sorted, each unreachable one (sorted) placed right after a different
    reachable one, spread evenly, so both its ring neighbours can dial it or be dialled by it
    directly. Only with more unreachable than reachable participants do some sit side by side
    (those hops go through a relay or a punched link). Deterministic: every peer gets one order."""
    members = sorted(set(participants))
    natted = sorted(set(unreachable) & set(members))
    public = [p for p in members if p not in natted]
    if not natted or not public:
        return members
    slots: list[list[str]] = [[p] for p in public]
    for k, p in enumerate(natted):
        slots[(k * len(public)) // len(natted) if len(natted) <= len(public) else k % len(public)].append(p)
    return [p for slot in slots for p in slot]
