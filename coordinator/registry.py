"""Membership registry: the peers table and its state machine.

States: ``joining`` (registered, no heartbeat yet) -> ``active`` -> ``suspect`` (silent for half
the timeout) -> ``dead`` (silent for the whole timeout); ``left`` after a clean leave. A suspect
peer that heartbeats again is active; a dead or left peer must join again. After a coordinator
restart nobody is declared dead for one timeout (grace), so peers that kept running while it was
down get the chance to heartbeat.

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
from typing import Sequence

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.store import Store, add_event
from coordinator.validation import ApiError

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
)


@dataclass
class Timing:
    """Failure-detection settings (seconds)."""

    heartbeat_interval: float = 2.0
    peer_timeout: float = 10.0

    @property
    def suspect_after(self) -> float:
        return self.peer_timeout / 2


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
    }


class MembershipRegistry:
    """Async façade over the peers table; all SQL runs on the store's writer thread."""

    def __init__(self, store: Store, timing: Timing, *, started_at: float | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.timing = timing
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
        view = json.dumps([{"peer_id": r[0], "address": r[1], "state": r[2]} for r in rows]).encode()
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

    async def join(self, peer_id: str, public_key: bytes, address: str, meta: PeerMeta) -> dict:
        self._keys[peer_id] = public_key
        try:
            return await self.store.run(_join, peer_id, public_key.hex(), address, meta, self.clock.time())
        finally:
            self._view_changed()

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

    async def sweep(self) -> list[tuple[str, str]]:
        """Demote silent peers; returns (peer_id, new_state) for each change."""
        now = self.clock.time()
        may_kill = now >= self.grace_until
        changes = await self.store.run(_sweep, now, self.timing.suspect_after,
                                       self.timing.peer_timeout, may_kill)
        if changes:
            self._view_changed()
        return changes


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
          meta: PeerMeta, now: float) -> dict:
    check_not_banned(conn, peer_id)
    old = conn.execute("SELECT state, incarnation FROM peers WHERE peer_id = ?",
                       (peer_id,)).fetchone()
    incarnation = 1 if old is None else old["incarnation"] + 1
    conn.execute(
        """INSERT OR REPLACE INTO peers (peer_id, public_key, address, state, device, memory, roles,
               throughput, meta, stats, joined_at, last_heartbeat, state_since, incarnation)
           VALUES (?, ?, ?, 'joining', ?, ?, ?, ?, ?, '{}', ?, ?, ?, ?)""",
        (peer_id, public_key, address, meta.device, meta.memory, json.dumps(meta.roles),
         meta.throughput, json.dumps(meta.extra), now, now, now, incarnation))
    add_event(conn, "join" if old is None else "rejoin", peer_id,
              {"address": address, "previous_state": None if old is None else old["state"]}, now)
    return {"state": "joining", "incarnation": incarnation}


def _heartbeat(conn: sqlite3.Connection, peer_id: str, stats: dict, now: float) -> tuple[str, bool]:
    """-> (new state, whether the state changed)."""
    check_not_banned(conn, peer_id)
    row = conn.execute("SELECT state FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
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
    return "active", state != "active"


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
    return conn.execute(f"SELECT peer_id, address, state FROM peers WHERE state IN ({marks}) "
                        "ORDER BY joined_at, peer_id", states).fetchall()


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
