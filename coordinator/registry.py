"""Membership registry: the peers table and its state machine.

States: ``joining`` (registered, no heartbeat yet) -> ``active`` -> ``suspect`` (silent for half
the timeout) -> ``dead`` (silent for the whole timeout); ``left`` after a clean leave. A suspect
peer that heartbeats again is active; a dead or left peer must join again. After a coordinator
restart nobody is declared dead for one timeout (grace), so peers that kept running while it was
down get the chance to heartbeat.

Reachability (issue 15): a join records the address the request came from (``observed``) and,
when a prober is attached (coordinator/reachability.py), schedules one dial-back of the announced
address; its outcome lands in ``reachable`` (NULL until probed, then 1/0), ``probe_rtt_s`` and
``probe_error``. Membership view rows carry ``reachable`` and ``observed``, so peers dial only
addresses the coordinator verified to be that peer, and the peer's :class:`peer.reach.Reach`
(``relay``, ``relay_load``, ``relays``: from the join's ``meta.relay``, then from heartbeat
``stats.reach``), so unreachable peers are reached through the relays they reserved at. A
heartbeat whose reach differs from the stored one changes the view (rare: reservations move
when relays come and go).

Retention: rows of ``dead`` and ``left`` peers are deleted ``Timing.retention_s`` after they got
there, and beyond ``Limits.max_gone_rows`` the oldest go first, during the failure detector's
sweep (at most every ``Timing.prune_every_s``); their run memberships go with them and the event
log keeps only its newest ``Limits.max_events`` rows. With ``max_peers`` live rows (and
``Limits.max_live_per_address`` per observed address) this bounds rows and memory whatever the
number of joins. Bans are kept: they key on the peer id, not on a row.

Bans: a banned peer id (table ``bans``; coordinator/offenses.py bans after reports of poisoned
updates, ``coordinator ban`` by hand) is ``left`` at once, so no rendezvous waits for it, and its
joins, heartbeats and run requests are refused with 403 ``peer_banned``. The table is read on
every such request, so a ban written by the CLI into a running coordinator's database holds.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.store import Store, add_event
from coordinator.validation import ApiError, RateLimited
from peer.reach import Reach

if TYPE_CHECKING:
    from coordinator.reachability import Prober

log = logging.getLogger("lowband.coordinator.registry")

LIVE_STATES = ("joining", "active", "suspect")
ALL_STATES = ("joining", "active", "suspect", "dead", "left")

MEMBERSHIP_MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE peers (
        peer_id        TEXT PRIMARY KEY,
        public_key     TEXT NOT NULL,
        address        TEXT NOT NULL,
        state          TEXT NOT NULL,
        device         TEXT,
        memory         INTEGER,
        roles          TEXT NOT NULL DEFAULT '[]',
        throughput     REAL,
        meta           TEXT NOT NULL DEFAULT '{}',
        stats          TEXT NOT NULL DEFAULT '{}',
        joined_at      REAL NOT NULL,
        last_heartbeat REAL NOT NULL,
        state_since    REAL NOT NULL,
        incarnation    INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX peers_state ON peers(state);
    """,
    """
    CREATE TABLE bans (
        peer_id TEXT PRIMARY KEY,
        ts      REAL NOT NULL,
        reason  TEXT NOT NULL,
        source  TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE peers ADD COLUMN observed TEXT;
    ALTER TABLE peers ADD COLUMN reachable INTEGER;
    ALTER TABLE peers ADD COLUMN probe_rtt_s REAL;
    ALTER TABLE peers ADD COLUMN probe_error TEXT;
    ALTER TABLE peers ADD COLUMN probed_at REAL;
    CREATE INDEX peers_observed ON peers(observed, state);
    CREATE INDEX peers_gone ON peers(state, state_since);
    """,
    """
    ALTER TABLE peers ADD COLUMN reach TEXT NOT NULL DEFAULT '{}';
    """,
)
GONE_STATES = ("dead", "left")


@dataclass
class Timing:
    """Failure-detection settings (seconds)."""

    heartbeat_interval: float = 2.0
    peer_timeout: float = 10.0

    retention_s: float = 3600.0  # dead/left rows are deleted this long after they got there
    prune_every_s: float = 30.0

    @property
    def suspect_after(self) -> float:
        return self.peer_timeout / 2


@dataclass
class Limits:
    """Row bounds that hold however many identities join (issue 14 item 5)."""

    max_gone_rows: int = 10_000          # dead/left rows kept at most (oldest deleted first)
    max_events: int = 50_000             # event log rows kept
    max_live_per_address: int | None = None  # live peers per observed address (None: no cap)


@dataclass
class PeerMeta:
    """The validated metadata a peer declares on join."""

    device: str | None
    memory: int | None
    roles: list[str]
    throughput: float | None
    extra: dict


def _row_to_dict(row: sqlite3.Row, now: float) -> dict:
    return {
        "peer_id": row["peer_id"],
        "address": row["address"],
        "state": row["state"],
        "device": row["device"],
        "memory": row["memory"],
        "roles": json.loads(row["roles"]),
        "throughput": row["throughput"],
        "meta": json.loads(row["meta"]),
        "stats": json.loads(row["stats"]),
        "joined_at": row["joined_at"],
        "last_heartbeat": row["last_heartbeat"],
        "heartbeat_age_s": round(max(0.0, now - row["last_heartbeat"]), 3),
        "state_since": row["state_since"],
        "incarnation": row["incarnation"],
        "observed": row["observed"],
        "reachable": None if row["reachable"] is None else bool(row["reachable"]),
        "probe_rtt_s": row["probe_rtt_s"],
        "probe_error": row["probe_error"],
        "probed_at": row["probed_at"],
        **_reach_fields(row["reach"]),
    }


class MembershipRegistry:
    """Async façade over the peers table; all SQL runs on the store's writer thread."""

    def __init__(self, store: Store, timing: Timing, *, started_at: float | None = None,
                 clock: Clock = SYSTEM_CLOCK, limits: Limits | None = None) -> None:
        self.store = store
        self.timing = timing
        self.limits = limits or Limits()
        # Set by coordinator/reachability.py:setup_reachability: ``schedule(peer_id, incarnation,
        # address)`` dials the announced address back once per join; None: nobody is probed.
        self.prober: Prober | None = None
        self._last_prune = float("-inf")
        self.clock = clock  # every liveness decision reads this (tests pass a fake one)
        self.started_at = clock.time() if started_at is None else started_at
        store.apply_schema("membership", MEMBERSHIP_MIGRATIONS)
        self._keys: dict[str, bytes] = {}  # peer_id -> public key, cache for heartbeat checks
        # Every join/heartbeat answer carries the live view (id, address, state of each live
        # peer). It changes only on state transitions, so it is kept encoded and rebuilt after
        # one -- at 1,000 peers x 1 Hz, re-reading and re-encoding it per heartbeat cost O(N^2).
        # Versions count transitions; a view built at version v reflects every transition <= v.
        # At most one build runs at a time and every request waiting meanwhile shares the next
        # one, so a join storm costs one build per wave of joins, not one per join.
        self._view_version = 0
        self._view_epoch = secrets.token_hex(4)  # view ids never repeat across restarts
        self._view: tuple[int, bytes] | None = None
        self._view_build: asyncio.Task | None = None
        self._pending_heartbeats: list[tuple[str, dict, float, asyncio.Future]] = []
        self._heartbeat_writer: asyncio.Future | None = None

    def _view_changed(self) -> None:
        self._view_version += 1

    async def live_view(self, *, fresh: bool = True) -> tuple[str, bytes]:
        """(view id, JSON array of {peer_id, address, state} for every live peer, first joined
        first). Equal ids = equal lists, so a peer holding a view need not be sent it again.

        ``fresh``: reflect every transition made before this call (joins need to see
        themselves). Otherwise the last built view is good enough while a newer one is built in
        the background: heartbeat answers then lag by at most one heartbeat during membership
        churn instead of all waiting for rebuilds."""
        wanted = self._view_version
        if not fresh and self._view is not None:
            if self._view[0] < wanted:
                self._start_view_build()
        else:
            while self._view is None or self._view[0] < wanted:
                await asyncio.shield(self._start_view_build())
        version, view = self._view
        return f"{self._view_epoch}.{version}", view

    def _start_view_build(self) -> asyncio.Task:
        if self._view_build is None or self._view_build.done():
            self._view_build = asyncio.ensure_future(self._build_view(self._view_version))
            self._view_build.add_done_callback(_log_view_failure)
        return self._view_build

    async def _build_view(self, version: int) -> None:
        rows = await self.store.run(_select_view, LIVE_STATES)
        view = json.dumps([{"peer_id": r[0], "address": r[1], "state": r[2],
                            "reachable": None if r[3] is None else bool(r[3]), "observed": r[4],
                            **_reach_fields(r[5])} for r in rows]).encode()
        if self._view is None or self._view[0] < version:
            self._view = (version, view)

    @property
    def grace_until(self) -> float:
        return self.started_at + self.timing.peer_timeout

    async def public_key(self, peer_id: str) -> bytes | None:
        key = self._keys.get(peer_id)
        if key is None:
            hex_key = await self.store.run(_select_public_key, peer_id)
            if hex_key is not None:
                key = self._keys[peer_id] = bytes.fromhex(hex_key)
        return key

    async def join(self, peer_id: str, public_key: bytes, address: str, meta: PeerMeta, *,
                   observed: str | None = None) -> dict:
        """Register (or re-register) a peer announcing ``address``; ``observed``: the address its
        request came from. Schedules the reachability probe of ``address`` when a prober is set."""
        try:
            result = await self.store.run(_join, peer_id, public_key.hex(), address, meta,
                                          observed, self.limits.max_live_per_address,
                                          self.clock.time())
        finally:
            self._view_changed()
        self._keys[peer_id] = public_key
        if self.prober is not None:
            self.prober.schedule(peer_id, result["incarnation"], address, observed)
        return result

    async def set_reachability(self, peer_id: str, incarnation: int, reachable: bool,
                               rtt_s: float | None, error: str | None) -> bool:
        """Store a probe outcome for that incarnation of the peer (a rejoin meanwhile makes it
        stale: False, nothing written)."""
        changed = await self.store.run(_set_reachability, peer_id, incarnation, reachable, rtt_s,
                                       error, self.clock.time())
        if changed:
            self._view_changed()
        return changed

    async def heartbeat(self, peer_id: str, stats: dict) -> str:
        """Record a heartbeat. Heartbeats that arrive while a write is in flight are written
        together in the next transaction (group commit): one writer-thread hop and one commit
        per batch instead of per heartbeat, which is what 1,000 peers at 1 Hz need. Each caller
        still returns only after its own heartbeat is committed."""
        done = asyncio.get_running_loop().create_future()
        self._pending_heartbeats.append((peer_id, stats, self.clock.time(), done))
        if self._heartbeat_writer is None or self._heartbeat_writer.done():
            self._heartbeat_writer = asyncio.ensure_future(self._write_heartbeats())
        try:
            state, changed = await done
        except ApiError as e:
            if e.code == "peer_banned":  # banned by the CLI: its row left the view behind our back
                self._view_changed()
            raise
        if changed:
            self._view_changed()
        return state

    async def _write_heartbeats(self) -> None:
        while self._pending_heartbeats:
            batch, self._pending_heartbeats = self._pending_heartbeats, []
            try:
                results = await self.store.run(_heartbeat_batch, [item[:3] for item in batch])
            except Exception as e:  # the whole transaction failed: every caller hears why
                results = [e] * len(batch)
            for (*_, done), result in zip(batch, results):
                if done.done():  # the request was cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def leave(self, peer_id: str) -> None:
        try:
            await self.store.run(_leave, peer_id, self.clock.time())
        finally:
            self._view_changed()

    async def ban(self, peer_id: str, reason: str, source: str) -> bool:
        """Ban ``peer_id`` (see the module docstring); False when it already was."""
        try:
            return await self.store.run(ban_peer, peer_id, reason, source, self.clock.time())
        finally:
            self._view_changed()

    async def peers(self, states: Sequence[str] = ALL_STATES) -> list[dict]:
        return await self.store.run(_select_peers, tuple(states), self.clock.time())

    async def page(self, offset: int, limit: int,
                   states: Sequence[str] = ALL_STATES) -> tuple[list[dict], int]:
        """(``limit`` peers from ``offset`` in join order, total number in ``states``)."""
        return await self.store.run(_select_page, tuple(states), offset, limit, self.clock.time())

    async def serving(self, states: Sequence[str]) -> tuple[list[dict], set[str]]:
        """(peers in ``states`` that announce served models in their stats, ids of every peer
        in ``states``): what the status page's inference and run sections need, without
        decoding every peer's row."""
        return await self.store.run(_select_serving, tuple(states), self.clock.time())

    async def counts(self) -> dict[str, int]:
        """Number of peers in each state (every state present)."""
        return await self.store.run(_count_states)

    async def reachability(self) -> dict[str, int]:
        """Live peers by probe outcome: {reachable, unreachable, unprobed}."""
        return await self.store.run(_count_reachability)

    async def sweep(self) -> list[tuple[str, str]]:
        """Demote silent peers and, every ``prune_every_s``, delete gone ones (see the module
        docstring); returns (peer_id, new_state) for each demotion."""
        now = self.clock.time()
        may_kill = now >= self.grace_until
        changes = await self.store.run(_sweep, now, self.timing.suspect_after,
                                       self.timing.peer_timeout, may_kill)
        if changes:
            self._view_changed()
        if now - self._last_prune >= self.timing.prune_every_s:
            self._last_prune = now
            await self.prune()
        return changes

    async def prune(self) -> list[str]:
        """Delete the rows of peers gone longer than the retention (and the oldest beyond
        ``max_gone_rows``); returns their ids."""
        pruned = await self.store.run(_prune, self.clock.time() - self.timing.retention_s,
                                      self.limits.max_gone_rows, self.limits.max_events)
        for peer_id in pruned:
            self._keys.pop(peer_id, None)
        if pruned:
            log.info("pruned %d gone peer rows", len(pruned))
        return pruned


def _log_view_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("building the live peer view failed: %r", task.exception())


# -- SQL (runs on the writer thread inside a transaction) ---------------------------------------
def _select_public_key(conn: sqlite3.Connection, peer_id: str) -> str | None:
    row = conn.execute("SELECT public_key FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
    return row[0] if row else None


def check_not_banned(conn: sqlite3.Connection, peer_id: str) -> None:
    """ApiError 403 ``peer_banned`` when ``peer_id`` is banned."""
    row = conn.execute("SELECT reason FROM bans WHERE peer_id = ?", (peer_id,)).fetchone()
    if row is not None:
        raise ApiError(403, "peer_banned", f"peer {peer_id} is banned from this swarm ({row[0]}); "
                                           f"the coordinator's operator can lift it with "
                                           f"'coordinator unban {peer_id}'")


def ban_peer(conn: sqlite3.Connection, peer_id: str, reason: str, source: str, now: float) -> bool:
    """Record the ban and make a live peer ``left``; False when it was banned already."""
    if conn.execute("SELECT 1 FROM bans WHERE peer_id = ?", (peer_id,)).fetchone() is not None:
        return False
    conn.execute("INSERT INTO bans (peer_id, ts, reason, source) VALUES (?, ?, ?, ?)",
                 (peer_id, now, reason, source))
    conn.execute("UPDATE peers SET state = 'left', state_since = ? WHERE peer_id = ? AND state IN "
                 f"({','.join('?' * len(LIVE_STATES))})", (now, peer_id, *LIVE_STATES))
    add_event(conn, "banned", peer_id, {"reason": reason, "source": source}, now)
    return True


def unban_peer(conn: sqlite3.Connection, peer_id: str, now: float) -> bool:
    """Lift a ban; False when ``peer_id`` was not banned."""
    if conn.execute("DELETE FROM bans WHERE peer_id = ?", (peer_id,)).rowcount == 0:
        return False
    add_event(conn, "unbanned", peer_id, {}, now)
    return True


def select_bans(conn: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT peer_id, ts, reason, source FROM bans ORDER BY ts")]


def _join(conn: sqlite3.Connection, peer_id: str, public_key: str, address: str,
          meta: PeerMeta, observed: str | None, max_per_address: int | None, now: float) -> dict:
    check_not_banned(conn, peer_id)
    if observed is not None and max_per_address is not None:
        marks = ",".join("?" * len(LIVE_STATES))
        (n,) = conn.execute(f"SELECT COUNT(*) FROM peers WHERE observed = ? AND peer_id != ? "
                            f"AND state IN ({marks})", (observed, peer_id, *LIVE_STATES)).fetchone()
        if n >= max_per_address:
            raise RateLimited(f"{n} live peers already joined from {observed} (limit "
                              f"{max_per_address} per address); retry once some leave", 10.0,
                              "too_many_from_address")
    old = conn.execute("SELECT state, incarnation FROM peers WHERE peer_id = ?",
                       (peer_id,)).fetchone()
    incarnation = 1 if old is None else old["incarnation"] + 1
    conn.execute(
        """INSERT OR REPLACE INTO peers (peer_id, public_key, address, state, device, memory, roles,
               throughput, meta, stats, joined_at, last_heartbeat, state_since, incarnation,
               observed, reachable, probe_rtt_s, probe_error, probed_at, reach)
           VALUES (?, ?, ?, 'joining', ?, ?, ?, ?, ?, '{}', ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, ?)""",
        (peer_id, public_key, address, meta.device, meta.memory, json.dumps(meta.roles),
         meta.throughput, json.dumps(meta.extra), now, now, now, incarnation, observed,
         json.dumps(Reach(relay=meta.extra.get("relay") is True).to_json())))
    add_event(conn, "join" if old is None else "rejoin", peer_id,
              {"address": address, "observed": observed,
               "previous_state": None if old is None else old["state"]}, now)
    return {"state": "joining", "incarnation": incarnation}


def _set_reachability(conn: sqlite3.Connection, peer_id: str, incarnation: int, reachable: bool,
                      rtt_s: float | None, error: str | None, now: float) -> bool:
    marks = ",".join("?" * len(LIVE_STATES))
    updated = conn.execute(
        f"""UPDATE peers SET reachable = ?, probe_rtt_s = ?, probe_error = ?, probed_at = ?
            WHERE peer_id = ? AND incarnation = ? AND state IN ({marks})""",
        (int(reachable), rtt_s, error, now, peer_id, incarnation, *LIVE_STATES)).rowcount
    if updated:
        add_event(conn, "reachable" if reachable else "unreachable", peer_id,
                  {"rtt_s": rtt_s, "error": error}, now)
    return bool(updated)


def _heartbeat(conn: sqlite3.Connection, peer_id: str, stats: dict, now: float) -> tuple[str, bool]:
    """-> (new state, whether the state changed)."""
    check_not_banned(conn, peer_id)
    row = conn.execute("SELECT state, reach FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
    if row is None:
        raise ApiError(404, "unknown_peer", "peer is not registered; join first")
    state = row["state"]
    if state == "dead":
        raise ApiError(410, "peer_dead", "peer was declared dead after missed heartbeats; join again")
    if state == "left":
        raise ApiError(410, "peer_left", "peer left the swarm; join again")
    throughput = stats.get("throughput")
    if isinstance(throughput, bool) or not isinstance(throughput, (int, float)):
        throughput = None
    conn.execute(
        """UPDATE peers SET state = 'active', stats = ?, last_heartbeat = ?,
               throughput = COALESCE(?, throughput),
               state_since = CASE WHEN state = 'active' THEN state_since ELSE ? END
           WHERE peer_id = ?""",
        (json.dumps(stats), now, throughput, now, peer_id))
    if state != "active":
        add_event(conn, "active" if state == "joining" else "recovered", peer_id, {}, now)
    reach = _reach_of(stats)
    reach_changed = reach is not None and reach != row["reach"]
    if reach_changed:
        conn.execute("UPDATE peers SET reach = ? WHERE peer_id = ?", (reach, peer_id))
    return "active", state != "active" or reach_changed


def _reach_of(stats: dict) -> str | None:
    """The canonical JSON of a heartbeat's ``stats.reach`` (None: absent or malformed; a bad
    one is ignored like other bad stats, the stored reach stays)."""
    try:
        return json.dumps(Reach.from_json(stats["reach"]).to_json()) if "reach" in stats else None
    except ValueError:
        return None


def _reach_fields(stored: str | None) -> dict:
    """View-row fields of a stored reach: relay, relay_load, relays."""
    try:
        reach = Reach.from_json(json.loads(stored or "{}"))
    except ValueError:
        reach = Reach()
    return {"relay": reach.relay, "relay_load": reach.load, "relays": list(reach.relays)}


def _heartbeat_batch(conn: sqlite3.Connection, items: list[tuple[str, dict, float]]
                     ) -> list[tuple[str, bool] | ApiError]:
    """Several heartbeats in one transaction; a refused one (unknown/dead peer) writes nothing
    and comes back as its ApiError without failing the others."""
    results: list[tuple[str, bool] | ApiError] = []
    for peer_id, stats, now in items:
        try:
            results.append(_heartbeat(conn, peer_id, stats, now))
        except ApiError as e:
            results.append(e)
    return results


def _leave(conn: sqlite3.Connection, peer_id: str, now: float) -> None:
    row = conn.execute("SELECT state FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
    if row is None:
        raise ApiError(404, "unknown_peer", "peer is not registered")
    if row["state"] != "left":
        conn.execute("UPDATE peers SET state = 'left', state_since = ? WHERE peer_id = ?",
                     (now, peer_id))
        add_event(conn, "leave", peer_id, {}, now)


def _select_view(conn: sqlite3.Connection, states: tuple[str, ...]) -> list[tuple]:
    marks = ",".join("?" * len(states))
    return conn.execute(f"SELECT peer_id, address, state, reachable, observed, reach FROM peers "
                        f"WHERE state IN ({marks}) ORDER BY joined_at, peer_id", states).fetchall()


def _select_page(conn: sqlite3.Connection, states: tuple[str, ...], offset: int, limit: int,
                 now: float) -> tuple[list[dict], int]:
    marks = ",".join("?" * len(states))
    (total,) = conn.execute(f"SELECT COUNT(*) FROM peers WHERE state IN ({marks})", states).fetchone()
    rows = conn.execute(f"SELECT * FROM peers WHERE state IN ({marks}) ORDER BY joined_at, peer_id "
                        "LIMIT ? OFFSET ?", (*states, limit, offset)).fetchall()
    return [_row_to_dict(r, now) for r in rows], total


def _select_serving(conn: sqlite3.Connection, states: tuple[str, ...],
                    now: float) -> tuple[list[dict], set[str]]:
    marks = ",".join("?" * len(states))
    rows = conn.execute(f"SELECT * FROM peers WHERE state IN ({marks}) AND json_valid(stats) AND "
                        "json_extract(stats, '$.serve') IS NOT NULL ORDER BY joined_at, peer_id",
                        states).fetchall()
    ids = {r[0] for r in conn.execute(f"SELECT peer_id FROM peers WHERE state IN ({marks})", states)}
    return [_row_to_dict(r, now) for r in rows], ids


def _count_states(conn: sqlite3.Connection) -> dict[str, int]:
    found = dict(conn.execute("SELECT state, COUNT(*) FROM peers GROUP BY state").fetchall())
    return {s: found.get(s, 0) for s in ALL_STATES}


def _count_reachability(conn: sqlite3.Connection) -> dict[str, int]:
    marks = ",".join("?" * len(LIVE_STATES))
    found = dict(conn.execute(f"SELECT reachable, COUNT(*) FROM peers WHERE state IN ({marks}) "
                              "GROUP BY reachable", LIVE_STATES).fetchall())
    return {"reachable": found.get(1, 0), "unreachable": found.get(0, 0),
            "unprobed": found.get(None, 0)}


def _prune(conn: sqlite3.Connection, before: float, max_gone: int, max_events: int) -> list[str]:
    gone = ",".join("?" * len(GONE_STATES))
    ids = [r[0] for r in conn.execute(
        f"SELECT peer_id FROM peers WHERE state IN ({gone}) AND state_since < ?",
        (*GONE_STATES, before))]
    ids += [r[0] for r in conn.execute(  # beyond the row cap: the longest gone first
        f"SELECT peer_id FROM peers WHERE state IN ({gone}) AND state_since >= ? "
        "ORDER BY state_since DESC LIMIT -1 OFFSET ?", (*GONE_STATES, before, max_gone))]
    has_runs = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'run_members'").fetchone()
    for i in range(0, len(ids), 500):
        batch = ids[i:i + 500]
        marks = ",".join("?" * len(batch))
        conn.execute(f"DELETE FROM peers WHERE peer_id IN ({marks})", batch)
        if has_runs:  # a pruned peer that comes back joins its runs again
            conn.execute(f"DELETE FROM run_members WHERE peer_id IN ({marks})", batch)
    conn.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (max_events,))
    return ids


def _select_peers(conn: sqlite3.Connection, states: tuple[str, ...], now: float) -> list[dict]:
    marks = ",".join("?" * len(states))
    rows = conn.execute(f"SELECT * FROM peers WHERE state IN ({marks}) ORDER BY joined_at, peer_id",
                        states).fetchall()
    return [_row_to_dict(r, now) for r in rows]


def _sweep(conn: sqlite3.Connection, now: float, suspect_after: float, dead_after: float,
           may_kill: bool) -> list[tuple[str, str]]:
    changes: list[tuple[str, str]] = []
    rows = conn.execute("SELECT peer_id, state, last_heartbeat FROM peers "
                        "WHERE state IN ('joining', 'active', 'suspect')").fetchall()
    for row in rows:
        silent = now - row["last_heartbeat"]
        if silent > dead_after and may_kill:
            new = "dead"
        elif silent > suspect_after and row["state"] != "suspect":
            new = "suspect"
        else:
            continue
        conn.execute("UPDATE peers SET state = ?, state_since = ? WHERE peer_id = ?",
                     (new, now, row["peer_id"]))
        add_event(conn, new, row["peer_id"], {"silent_s": round(silent, 3)}, now)
        changes.append((row["peer_id"], new))
    return changes
