"""Training-run routes: one agreed config per run, the outer-step rendezvous, per-step reports
with the state-hash agreement check, and the run's persistent state (step, data slots).

Routes (JSON; POSTs are signed by the peer like membership requests, all need the swarm token):

- ``POST /api/runs/{run}``         create-or-get: the first creator's config wins; later joiners
  get the stored config. A joiner that set a key explicitly to another value gets only
  ``conflicts`` and is not admitted; otherwise the peer becomes a run member and gets a data
  slot (see below). One identity creates at most ``RunLimits.max_runs_per_identity`` runs.
- ``POST /api/runs/{run}/sync``    ``{step, base_hash}``: rendezvous for outer step ``step``.
  Long-poll: the answer comes when the step's window closes, or after ``HOLD_S`` with
  ``pending: true`` (ask again, idempotent). A closed window lists ``participants`` in a
  deterministic order (sorted peer ids) and the collective ``tag`` of the step.
- ``POST /api/runs/{run}/report``  per-step metrics, the peer's global-state hash and
  ``averaged`` (the ids its final average ran over; coordinator/benching.py). Steps the
  peers took while this coordinator was down (diloco/role.py: offline steps, which have no
  window here) arrive as queued reports when it is back, and advance the run's step.
- ``POST /api/runs/{run}/leave``   the peer stopped training; windows no longer wait for it.
- ``GET /api/runs``, ``GET /api/runs/{run}``, ``GET /api/runs/{run}/reports`` for the status
  page, ``peer``/tests and the checkpointing peer.

Window rule for step s (generation g): it opens at the first arrival and closes when every
*expected* peer arrived, where expected = the live participants of window s-1 (peers in
lockstep); for the first window of a generation, every live run member. Timeout
(``sync_timeout_s`` of the run config): counted from the first expected arrival, or from the
opening when no expected peer is live any more — so a joiner waiting for peers that are still
in their inner phase does not close the window alone. Suspect/dead peers are not waited for.
At closing, arrivals whose ``base_hash`` (the hash of their state at step s-1) differs from
the majority are left out and told to ``resync``; so are arrivals that took a seat in an
earlier window without averaging (benched) and newcomers beyond the window's quota
(coordinator/benching.py: silent participants, answer field ``bench``). The majority is
weighted by each arrival's verified contribution to the run (coordinator/votes.py: a burst of
fresh identities cannot outvote the peers that carried the run; with no weight anywhere it
counts identities), and closing window s credits step s-1 to its participants that also took
part in window s-1 (and, when judged, averaged it).
``GET /api/runs/{run}`` lists ``state_hashes``, the agreed hash of recent steps (votes.py
``step_majority``). A peer arriving after the window closed is
``late`` and told to resync from the ``donors``. A closed window none of whose participants is
still alive (same incarnation) is stale: the run restarted (e.g. from a checkpoint), so a new
generation begins with fresh windows and reports.

Data (diloco/data.py docstring for the whole story): the run's data is one stream of global
batch numbers, and the run's ``data_cursor`` is the first number nobody was handed yet. It only
moves forward. Closing window s hands each participant ``inner_steps`` consecutive batch numbers
for its next inner phase (``peer.dataplan.DataPlan``: participant i of the sorted list gets
[base + i*H, base + (i+1)*H), base = the cursor, which then moves past all of them); the answer
carries ``data: {base, count}``. A join (or rejoin) gets a range of its own the same way, for a
first inner phase before any window (founders, a restart from a checkpoint). Step reports'
``data_position`` (the next batch number the peer would train on) move the cursor forward too,
which covers steps the peers planned among themselves while this coordinator was down. So no two
peers are ever handed the same batch, however many join. Legacy: members still hold one of the
run's slots (never shared by two live members: a slot is added when none is free), shown on the
status page with the last reported position.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from aiohttp import web

from coordinator import benching
from coordinator.checkpoints import Backend, CheckpointStore
from coordinator.auth import require_role
from coordinator.registry import MembershipRegistry, check_not_banned
from coordinator.store import Store, add_event
from coordinator.validation import (PEER_ID_RE, ApiError, RateLimited, bad, get_object,
                                   read_json_object)
from coordinator.votes import (CREDIT_SCHEMA, credit_window, credits, majority, report_majority,
                               step_majority, window_participants)
from peer.blobs import InvalidName, check_run
from peer.dataplan import MAX_BATCH, DataPlan

log = logging.getLogger("lowband.coordinator.runs")

MAX_BODY = 64 * 1024
MAX_CONFIG = 16 * 1024
HOLD_S = 15.0            # longest a sync request is held before answering "pending"
WATCH_PERIOD_S = 0.1     # how often an open window re-checks liveness and its timeout
MAX_REPORTS = 1000
HASH_LEN = 64
# Live for rendezvous purposes: a suspect peer (silent for half the peer timeout) is not waited for.
SYNC_LIVE = ("joining", "active")
DEFAULTS = {"sync_timeout_s": 30.0, "checkpoint_every": 10, "data_shards": 16, "min_peers": 1,
            "inner_steps": 20}
MAX_OFFLINE_STEPS = 10_000  # steps one report may move the data cursor by (module docstring: Data)
MAX_SLOTS = 1 << 20  # legacy slot rows per run (one per concurrently live member at most)

RUNS_MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE runs (
        name        TEXT PRIMARY KEY,
        config      TEXT NOT NULL,
        creator     TEXT NOT NULL,
        created_at  REAL NOT NULL,
        generation  INTEGER NOT NULL DEFAULT 1,
        step        INTEGER NOT NULL DEFAULT 0,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE run_members (
        run        TEXT NOT NULL,
        peer_id    TEXT NOT NULL,
        slot       INTEGER NOT NULL,
        joined_at  REAL NOT NULL,
        last_step  INTEGER,
        active     INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (run, peer_id)
    );
    CREATE TABLE run_slots (
        run       TEXT NOT NULL,
        slot      INTEGER NOT NULL,
        position  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (run, slot)
    );
    CREATE TABLE run_windows (
        run          TEXT NOT NULL,
        generation   INTEGER NOT NULL,
        step         INTEGER NOT NULL,
        opened_at    REAL NOT NULL,
        first_expected_at REAL,
        closed_at    REAL,
        participants TEXT,
        majority_hash TEXT,
        PRIMARY KEY (run, generation, step)
    );
    CREATE TABLE run_arrivals (
        run         TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        step        INTEGER NOT NULL,
        peer_id     TEXT NOT NULL,
        incarnation INTEGER NOT NULL,
        base_hash   TEXT NOT NULL,
        arrived_at  REAL NOT NULL,
        PRIMARY KEY (run, generation, step, peer_id)
    );
    CREATE TABLE run_reports (
        run         TEXT NOT NULL,
        generation  INTEGER NOT NULL,
        step        INTEGER NOT NULL,
        peer_id     TEXT NOT NULL,
        ts          REAL NOT NULL,
        state_hash  TEXT NOT NULL,
        metrics     TEXT NOT NULL,
        PRIMARY KEY (run, generation, step, peer_id)
    );
    """,
    CREDIT_SCHEMA,  # verified contribution per (run, peer): the weight of its votes (votes.py)
    # The data cursor (module docstring: Data) and the base of each closed window's data plan.
    """
    ALTER TABLE runs ADD COLUMN data_cursor INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE run_windows ADD COLUMN data_base INTEGER;
    """,
)

# Numeric report fields (all optional, finite, >= 0).
# "offline": 1 for a step the peers took while this coordinator was unreachable; "queued_s":
# how long the peer held the report before it could send it (its ``ts`` is moved back by that).
REPORT_FIELDS = ("loss", "tokens", "tokens_per_s", "bytes_sent", "bytes_received", "outer_time_s",
                 "inner_time_s", "compute_utilization", "inner_steps", "participants",
                 "data_position", "offline", "queued_s")

RUNS = web.AppKey("runs_service", object)


@dataclass(frozen=True)
class RunLimits:
    """Capacity limits of the run routes: long-polls held at once (each is a task and a socket;
    one per training peer), runs (never deleted by the API), runs one identity may create (so
    one key cannot use up ``max_runs``; many keys are bounded by admission and rate limits) and
    reports kept per run (the oldest steps' reports go first)."""
    max_held_syncs: int = 4096
    max_runs: int = 1000
    max_runs_per_identity: int = 8
    max_reports_per_run: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_held_syncs", "max_runs", "max_runs_per_identity", "max_reports_per_run"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunLimits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class WindowState:
    step: int
    generation: int
    closed: bool
    participants: list[str]
    majority_hash: str | None
    data_base: int | None = None


def _run_settings(config: dict) -> dict:
    """The config keys the coordinator itself uses, validated, with defaults."""
    out = dict(DEFAULTS)
    for key, default in DEFAULTS.items():
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"config.{key} must be a number")
        if isinstance(default, int) and value != int(value):
            raise bad(f"config.{key} must be an integer")
        out[key] = type(default)(value)
    if not 0 < out["sync_timeout_s"] <= 3600:
        raise bad("config.sync_timeout_s must be in (0, 3600]")
    if not 0 <= out["checkpoint_every"] <= 10**6:
        raise bad("config.checkpoint_every must be in [0, 1e6] (0 = never)")
    if not 1 <= out["data_shards"] <= 4096:
        raise bad("config.data_shards must be in [1, 4096]")
    if not 1 <= out["min_peers"] <= 10**4:
        raise bad("config.min_peers must be in [1, 10000]")
    if not 1 <= out["inner_steps"] <= 10**6:
        raise bad("config.inner_steps must be in [1, 1e6]")
    return out


def body_int(body: dict, key: str, lo: int, hi: int) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(f"field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def _get_hash(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or len(value) != HASH_LEN or any(
            c not in "0123456789abcdef" for c in value):
        raise bad(f"field {key!r} must be a sha256 hex digest (64 lowercase hex)")
    return value


def run_name_of(request: web.Request) -> str:
    try:
        return check_run(request.match_info["run"])
    except InvalidName as e:
        raise bad(str(e), "bad_run_name") from None


class RunService:
    """Run state on the store plus the in-memory wake-ups of open rendezvous windows."""

    def __init__(self, store: Store, registry: MembershipRegistry, backend: Backend,
                 limits: RunLimits = RunLimits()) -> None:
        self.store = store
        self.registry = registry
        self.clock = registry.clock  # one time source for liveness and rendezvous deadlines
        self.backend = backend
        self.limits = limits
        self._held = 0  # sync requests waiting for their window to close
        store.apply_schema("runs", RUNS_MIGRATIONS)
        store.apply_schema("benching", benching.BENCHING_MIGRATIONS)
        self._closed: dict[tuple[str, int, int], asyncio.Event] = {}
        self._watchers: dict[tuple[str, int, int], asyncio.Task] = {}
        self._lock = asyncio.Lock()  # serializes window decisions (arrive / close / reset)

    async def close(self) -> None:
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)

    async def live(self, states: Sequence[str] = SYNC_LIVE) -> dict[str, int]:
        """peer id -> incarnation of the peers in ``states``."""
        return {p["peer_id"]: p["incarnation"] for p in await self.registry.peers(states)}

    def latest_checkpoint(self, run: str) -> int | None:
        return CheckpointStore(self.backend, run).latest()

    # -- create-or-get -------------------------------------------------------------------------
    async def join(self, run: str, peer_id: str, config: dict, explicit: list[str]) -> dict:
        settings = _run_settings(config)
        live = await self.live(("joining", "active", "suspect"))
        answer = await self.store.run(_join_run, run, peer_id, config, explicit,
                                      settings, set(live), self.clock.time(), self.limits)
        if answer["conflicts"]:
            return answer
        answer["latest_checkpoint"] = await asyncio.to_thread(self.latest_checkpoint, run)
        answer["donors"] = await self.donors(run)
        return answer

    async def donors(self, run: str) -> list[dict]:
        """Live members of the latest closed window that agreed with its majority: peers that hold
        the current global state (each with the step it was at)."""
        live = await self.live()
        return await self.store.run(_donors, run, live)

    # -- rendezvous ----------------------------------------------------------------------------
    async def sync(self, run: str, peer_id: str, step: int, base_hash: str) -> dict:
        live_inc = await self.live(("joining", "active", "suspect"))
        incarnation = live_inc.get(peer_id, 0)
        async with self._lock:
            info = await self.store.run(_arrive, run, peer_id, incarnation, step, base_hash,
                                        live_inc, self.clock.time())
            key = (run, info["generation"], step)
            if info["state"] == "open":
                event = self._closed.setdefault(key, asyncio.Event())
                if key not in self._watchers:
                    self._watchers[key] = asyncio.create_task(self._watch(key))
        if info["state"] == "open":
            if self._held >= self.limits.max_held_syncs:  # the arrival stands; asking again is fine
                raise RateLimited(f"{self._held} sync requests are already waiting (limit "
                                  f"{self.limits.max_held_syncs}); ask again", 1.0, "too_many_waiters")
            self._held += 1
            try:
                await asyncio.wait_for(event.wait(), HOLD_S)
            except asyncio.TimeoutError:
                return {"run": run, "step": step, "generation": info["generation"],
                        "pending": True}
            finally:
                self._held -= 1
        return await self._answer(run, peer_id, info["generation"], step,
                                  late=info["state"] == "late")

    async def _answer(self, run: str, peer_id: str, generation: int, step: int,
                      late: bool) -> dict:
        window = await self.store.run(_window, run, generation, step)
        config = (await self.store.run(run_row, run))["config"]
        every = _run_settings(config)["checkpoint_every"]
        participants = window.participants if window else []
        member = peer_id in participants
        resync = not member
        answer = {"run": run, "step": step, "generation": generation, "pending": False,
                  "tag": f"{run}.g{generation}.s{step}", "participants": participants,
                  "participant": member, "late": late and not member, "resync": resync,
                  "majority_hash": window.majority_hash if window else None,
                  "checkpoint": bool(member and every and step % every == 0
                                     and participants[0] == peer_id)}
        if member and window.data_base is not None:
            # The batches of this peer's next inner phase: its place in ``participants``.
            answer["data"] = DataPlan(window.data_base, _run_settings(config)["inner_steps"],
                                      tuple(participants)).to_json()
        if resync:
            answer["donors"] = await self.donors(run)
            if window is not None and window.closed and not late:
                # Why it sits out (coordinator/benching.py): a bench, or the newcomer gate.
                answer["bench"] = await self.store.run(benching.bench_status, run, peer_id)
        return answer

    async def _watch(self, key: tuple[str, int, int]) -> None:
        run, generation, step = key
        try:
            while True:
                live = await self.live()
                async with self._lock:
                    state = await self.store.run(_maybe_close, run, generation, step, live,
                                                 self.clock.time())
                    if state != "open":
                        # Waiters hold the event; later askers learn "closed" from the store.
                        self._watchers.pop(key, None)
                        event = self._closed.pop(key, None)
                        if state == "closed" and event is not None:
                            event.set()
                        return
                await self.clock.sleep(WATCH_PERIOD_S)
        except asyncio.CancelledError:
            raise
        except Exception:  # the next arrival starts a new watcher; waiters ask again
            log.exception("rendezvous watcher %s failed", key)
            self._watchers.pop(key, None)

    # -- reports -------------------------------------------------------------------------------
    async def report(self, run: str, peer_id: str, step: int, state_hash: str,
                     metrics: dict, slot_position: int | None,
                     averaged: list[str] | None = None) -> dict:
        return await self.store.run(_report, run, peer_id, step, state_hash, metrics,
                                    slot_position, self.clock.time(), self.limits.max_reports_per_run,
                                    averaged)


# -- SQL (runs on the store's writer thread inside a transaction) -------------------------------
def run_row(conn: sqlite3.Connection, run: str) -> dict:
    row = conn.execute("SELECT * FROM runs WHERE name = ?", (run,)).fetchone()
    if row is None:
        raise ApiError(404, "unknown_run", f"run {run!r} does not exist; create it with POST "
                                           f"/api/runs/{run} (peer join --train {run})")
    out = dict(row)
    out["config"] = json.loads(out["config"])
    return out


def run_member(conn: sqlite3.Connection, run: str, peer_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM run_members WHERE run = ? AND peer_id = ?",
                       (run, peer_id)).fetchone()
    if row is None:
        raise ApiError(403, "not_a_member", f"peer is not a member of run {run!r}; join it first")
    return row


def _join_run(conn: sqlite3.Connection, run: str, peer_id: str, config: dict,
              explicit: list[str], settings: dict, live: set[str], now: float,
              limits: RunLimits) -> dict:
    """Create-or-get; a peer whose explicit settings conflict with the run's is not admitted."""
    check_not_banned(conn, peer_id)
    created = False
    if conn.execute("SELECT 1 FROM runs WHERE name = ?", (run,)).fetchone() is None:
        if conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] >= limits.max_runs:
            raise ApiError(409, "too_many_runs", f"the coordinator holds {limits.max_runs} runs "
                                                 f"(its limit); join an existing run")
        mine = conn.execute("SELECT COUNT(*) FROM runs WHERE creator = ?", (peer_id,)).fetchone()[0]
        if mine >= limits.max_runs_per_identity:
            raise ApiError(409, "too_many_runs_for_identity",
                           f"this identity created {mine} runs (the limit per identity is "
                           f"{limits.max_runs_per_identity}); join an existing run")
        conn.execute("INSERT INTO runs (name, config, creator, created_at, updated_at) "
                     "VALUES (?, ?, ?, ?, ?)", (run, json.dumps(config), peer_id, now, now))
        conn.executemany("INSERT INTO run_slots (run, slot) VALUES (?, ?)",
                         [(run, s) for s in range(settings["data_shards"])])
        add_event(conn, "run_created", peer_id, {"run": run}, now)
        created = True
    row = run_row(conn, run)
    stored = row["config"]
    conflicts = {k: {"stored": stored.get(k), "requested": config.get(k)}
                 for k in explicit if stored.get(k) != config.get(k)}
    if conflicts:
        return {"run": run, "created": False, "config": stored, "conflicts": conflicts}
    old = conn.execute("SELECT slot FROM run_members WHERE run = ? AND peer_id = ?",
                       (run, peer_id)).fetchone()
    if old is not None:
        slot = old["slot"]
        conn.execute("UPDATE run_members SET active = 1 WHERE run = ? AND peer_id = ?",
                     (run, peer_id))
    else:
        # Lowest slot not held by another live member (a dead holder's slot passes to the
        # newcomer); none free: the run gets one more slot, never a shared one.
        held = {r["slot"] for r in conn.execute(
            "SELECT peer_id, slot FROM run_members WHERE run = ? AND active = 1", (run,))
            if r["peer_id"] in live}
        n = conn.execute("SELECT COUNT(*) FROM run_slots WHERE run = ?", (run,)).fetchone()[0]
        free = [s for s in range(n) if s not in held]
        if not free and n >= MAX_SLOTS:
            raise ApiError(409, "too_many_members", f"run {run!r} has {n} live members (limit)")
        slot = free[0] if free else n
        if not free:
            conn.execute("INSERT INTO run_slots (run, slot) VALUES (?, ?)", (run, slot))
        conn.execute("INSERT INTO run_members (run, peer_id, slot, joined_at) VALUES (?, ?, ?, ?)",
                     (run, peer_id, slot, now))
        add_event(conn, "run_joined", peer_id, {"run": run, "slot": slot}, now)
    position = conn.execute("SELECT position FROM run_slots WHERE run = ? AND slot = ?",
                            (run, slot)).fetchone()["position"]
    n_slots = conn.execute("SELECT COUNT(*) FROM run_slots WHERE run = ?", (run,)).fetchone()[0]
    # A range of its own for a first inner phase before any window (module docstring: Data).
    plan = _hand_out(conn, run, (peer_id,), _run_settings(stored)["inner_steps"])
    return {"run": run, "created": created, "config": stored, "conflicts": {},
            "creator": row["creator"], "step": row["step"], "generation": row["generation"],
            "slot": slot, "slots": n_slots, "slot_position": position, "data": plan.to_json()}


def _hand_out(conn: sqlite3.Connection, run: str, members: Sequence[str], count: int) -> DataPlan:
    """A data plan over ``members`` at the run's cursor, which moves past all of its ranges."""
    cursor = conn.execute("SELECT data_cursor FROM runs WHERE name = ?", (run,)).fetchone()[0]
    plan = DataPlan(cursor, count, tuple(members))
    conn.execute("UPDATE runs SET data_cursor = ? WHERE name = ?", (plan.end, run))
    return plan


def _donors(conn: sqlite3.Connection, run: str, live: dict[str, int]) -> list[dict]:
    row = run_row(conn, run)
    window = conn.execute(
        "SELECT step, participants FROM run_windows WHERE run = ? AND generation = ? AND "
        "closed_at IS NOT NULL ORDER BY step DESC LIMIT 1", (run, row["generation"])).fetchone()
    if window is None:
        return []
    return [{"peer_id": p, "step": window["step"]}
            for p, inc in json.loads(window["participants"]) if live.get(p) == inc]


def _window(conn: sqlite3.Connection, run: str, generation: int, step: int) -> WindowState | None:
    row = conn.execute("SELECT * FROM run_windows WHERE run = ? AND generation = ? AND step = ?",
                       (run, generation, step)).fetchone()
    if row is None:
        return None
    participants = [p for p, _ in json.loads(row["participants"] or "[]")]
    return WindowState(step, generation, row["closed_at"] is not None, participants,
                       row["majority_hash"], row["data_base"])


def _arrive(conn: sqlite3.Connection, run: str, peer_id: str, incarnation: int, step: int,
            base_hash: str, live: dict[str, int], now: float) -> dict:
    """Record an arrival at window ``step``: -> {"state": open|closed|late, "generation"}."""
    check_not_banned(conn, peer_id)
    row = run_row(conn, run)
    run_member(conn, run, peer_id)
    generation = row["generation"]
    window = conn.execute("SELECT * FROM run_windows WHERE run = ? AND generation = ? AND step = ?",
                          (run, generation, step)).fetchone()
    if window is not None and window["closed_at"] is not None:
        participants = json.loads(window["participants"])
        if any(p == peer_id for p, _ in participants):
            return {"state": "closed", "generation": generation}
        if any(live.get(p) == inc for p, inc in participants):
            return {"state": "late", "generation": generation}
        # Nobody who took this step is alive any more: the run restarted from older state.
        generation += 1
        conn.execute("UPDATE runs SET generation = ?, step = ?, updated_at = ? WHERE name = ?",
                     (generation, step - 1, now, run))
        add_event(conn, "run_restarted", peer_id, {"run": run, "generation": generation,
                                                   "step": step}, now)
        window = None
    if window is None:
        conn.execute("INSERT INTO run_windows (run, generation, step, opened_at) VALUES (?, ?, ?, ?)",
                     (run, generation, step, now))
    conn.execute("INSERT OR REPLACE INTO run_arrivals (run, generation, step, peer_id, incarnation, "
                 "base_hash, arrived_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (run, generation, step, peer_id, incarnation, base_hash, now))
    return {"state": "open", "generation": generation}


def _expected(conn: sqlite3.Connection, run: str, generation: int, step: int,
              live: dict[str, int]) -> set[str]:
    """The live participants of the previous window (peers in lockstep) still training; when
    there are none (first window of a generation, or all of them died or left), every live
    member of the run."""
    prev = conn.execute("SELECT participants FROM run_windows WHERE run = ? AND generation = ? "
                        "AND step < ? AND closed_at IS NOT NULL ORDER BY step DESC LIMIT 1",
                        (run, generation, step)).fetchone()
    members = {m["peer_id"] for m in conn.execute(
        "SELECT peer_id FROM run_members WHERE run = ? AND active = 1", (run,))
        if m["peer_id"] in live}
    lockstep = set() if prev is None else {
        p for p, inc in json.loads(prev["participants"]) if live.get(p) == inc and p in members}
    return lockstep or members


def _maybe_close(conn: sqlite3.Connection, run: str, generation: int, step: int,
                 live: dict[str, int], now: float) -> str:
    """Close window ``step`` if its rule is met: -> "closed", "open" or "abandoned"."""
    window = conn.execute("SELECT * FROM run_windows WHERE run = ? AND generation = ? AND step = ?",
                          (run, generation, step)).fetchone()
    if window is None or window["closed_at"] is not None:
        return "closed"  # (or superseded by a new generation: waiters are told to resync)
    settings = _run_settings(run_row(conn, run)["config"])
    # Only arrivals that are still alive (same incarnation) can take part.
    arrivals = [a for a in conn.execute(
        "SELECT * FROM run_arrivals WHERE run = ? AND generation = ? AND step = ? ORDER BY peer_id",
        (run, generation, step)) if live.get(a["peer_id"]) == a["incarnation"]]
    arrived = {a["peer_id"] for a in arrivals}
    expected = _expected(conn, run, generation, step, live)
    first_expected = window["first_expected_at"]
    if first_expected is None and expected & arrived:
        first_expected = now
        conn.execute("UPDATE run_windows SET first_expected_at = ? WHERE run = ? AND generation = ? "
                     "AND step = ?", (now, run, generation, step))
    if not arrivals:
        return "abandoned"  # everyone waiting here died; a later arrival watches it again
    if not (expected <= arrived and len(arrived) >= settings["min_peers"]):
        start = first_expected if first_expected is not None else window["opened_at"]
        if now - start < settings["sync_timeout_s"]:
            return "open"
    # Majority of the arrivals' base hashes weighted by verified contribution (coordinator/
    # votes.py: fresh keys cannot outvote the peers that carried the run); ties go to the count,
    # then to the hash the previous step's reports agreed on, then to the smallest hash.
    weights = credits(conn, run)
    agreed = majority({a["peer_id"]: a["base_hash"] for a in arrivals}, weights,
                      prior=report_majority(conn, run, generation, step - 1, weights))
    # Who really averaged step s-1 (its reports say): a silent seat is benched, and newcomers
    # enter at a bounded rate (coordinator/benching.py).
    judged = benching.judge(conn, run, generation, step - 1, weights)
    eligible = [a["peer_id"] for a in arrivals if a["base_hash"] == agreed]
    out = benching.left_out(conn, run, generation, step, eligible, weights,
                            f"{run}.g{generation}.s{step}")
    participants = [[a["peer_id"], a["incarnation"]] for a in arrivals
                    if a["base_hash"] == agreed and a["peer_id"] not in out]
    plan = _hand_out(conn, run, [p for p, _ in participants], settings["inner_steps"])
    conn.execute("UPDATE run_windows SET closed_at = ?, participants = ?, majority_hash = ?, "
                 "data_base = ? WHERE run = ? AND generation = ? AND step = ?",
                 (now, json.dumps(participants), agreed, plan.base, run, generation, step))
    credit_window(conn, run, generation, step, [p for p, _ in participants], judged["averaged"])
    conn.execute("UPDATE runs SET step = MAX(step, ?), updated_at = ? WHERE name = ?",
                 (step, now, run))
    conn.executemany("UPDATE run_members SET last_step = ? WHERE run = ? AND peer_id = ?",
                     [(step, run, p) for p, _ in participants])
    if judged["benched"]:
        add_event(conn, "run_benched", None, {"run": run, "step": step - 1,
                                              "peers": [p[:12] for p in judged["benched"]]}, now)
    dissent = sorted(arrived - set(eligible))
    if dissent:
        add_event(conn, "run_hash_mismatch", None, {"run": run, "step": step,
                                                    "peers": [p[:12] for p in dissent]}, now)
    return "closed"


def _leave_run(conn: sqlite3.Connection, run: str, peer_id: str, now: float) -> dict:
    run_row(conn, run)
    run_member(conn, run, peer_id)
    conn.execute("UPDATE run_members SET active = 0 WHERE run = ? AND peer_id = ?", (run, peer_id))
    add_event(conn, "run_left", peer_id, {"run": run}, now)
    return {"run": run, "peer_id": peer_id, "training": False}


def _report(conn: sqlite3.Connection, run: str, peer_id: str, step: int, state_hash: str,
            metrics: dict, slot_position: int | None, now: float, max_reports: int,
            averaged: list[str] | None = None) -> dict:
    check_not_banned(conn, peer_id)
    row = run_row(conn, run)
    member = run_member(conn, run, peer_id)
    generation = row["generation"]
    ts = max(now - metrics.get("queued_s", 0.0), row["created_at"])
    conn.execute("INSERT OR REPLACE INTO run_reports (run, generation, step, peer_id, ts, "
                 "state_hash, metrics) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (run, generation, step, peer_id, ts, state_hash, json.dumps(metrics)))
    if averaged is not None:  # who this peer's final average ran over (coordinator/benching.py)
        benching.record_averaged(conn, run, generation, step, peer_id, averaged)
    # A step the peers took without a window (offline, while this coordinator was down) still
    # advances the run, once more than half of the last window's participants (by verified
    # contribution, coordinator/votes.py) reported one hash for it: one identity cannot move
    # the run to step 10**12 (windows advance it themselves, see _maybe_close).
    conn.execute("UPDATE runs SET updated_at = ? WHERE name = ?", (now, run))
    if step > row["step"]:
        last = conn.execute("SELECT step FROM run_windows WHERE run = ? AND generation = ? AND "
                            "step < ? AND closed_at IS NOT NULL ORDER BY step DESC LIMIT 1",
                            (run, generation, step)).fetchone()
        voters = None if last is None else window_participants(conn, run, generation, last["step"])
        if voters and report_majority(conn, run, generation, step, decided=True, voters=voters):
            conn.execute("UPDATE runs SET step = MAX(step, ?), updated_at = ? WHERE name = ?",
                         (step, now, run))
    conn.execute("UPDATE run_members SET last_step = MAX(COALESCE(last_step, 0), ?) "
                 "WHERE run = ? AND peer_id = ?", (step, run, peer_id))
    if slot_position is not None:
        conn.execute("UPDATE run_slots SET position = MAX(position, ?) WHERE run = ? AND slot = ?",
                     (slot_position, run, member["slot"]))
        # Batches the peers planned among themselves (offline steps) are handed out already.
        # One report moves the cursor a bounded way, so no member can run it off the end.
        members = conn.execute("SELECT COUNT(*) FROM run_members WHERE run = ?",
                               (run,)).fetchone()[0]
        ahead = members * _run_settings(row["config"])["inner_steps"] * MAX_OFFLINE_STEPS
        conn.execute("UPDATE runs SET data_cursor = MAX(data_cursor, MIN(?, data_cursor + ?)) "
                     "WHERE name = ?", (slot_position, ahead, run))
    reports = conn.execute("SELECT COUNT(*) FROM run_reports WHERE run = ? AND generation = ? "
                           "AND step = ?", (run, generation, step)).fetchone()[0]
    if reports == 1:  # first report of a step: enforce retention (once per step)
        _prune_reports(conn, run, max_reports)
    # "agree": this peer's hash is the step's weighted majority so far (coordinator/votes.py).
    return {"run": run, "step": step, "generation": generation, "reports": reports,
            "agree": state_hash == report_majority(conn, run, generation, step)}


def _prune_reports(conn: sqlite3.Connection, run: str, max_reports: int) -> None:
    """Keep the newest ``max_reports`` reports of ``run`` (by generation, step)."""
    stored = conn.execute("SELECT COUNT(*) FROM run_reports WHERE run = ?", (run,)).fetchone()[0]
    if stored > max_reports:
        conn.execute("DELETE FROM run_reports WHERE rowid IN (SELECT rowid FROM run_reports "
                     "WHERE run = ? ORDER BY generation, step LIMIT ?)", (run, stored - max_reports))


def _summary(conn: sqlite3.Connection, run: str, live: set[str], limit: int) -> dict:
    row = run_row(conn, run)
    generation = row["generation"]
    members = [{"peer_id": m["peer_id"], "slot": m["slot"], "joined_at": m["joined_at"],
                "last_step": m["last_step"], "live": m["peer_id"] in live,
                "training": bool(m["active"])}
               for m in conn.execute("SELECT * FROM run_members WHERE run = ? ORDER BY joined_at",
                                     (run,))]
    slots = {r["slot"]: r["position"] for r in conn.execute(
        "SELECT slot, position FROM run_slots WHERE run = ?", (run,))}
    steps = []
    for w in conn.execute("SELECT * FROM run_windows WHERE run = ? AND generation = ? AND "
                          "closed_at IS NOT NULL ORDER BY step DESC LIMIT ?",
                          (run, generation, limit)):
        reports = [json.loads(r["metrics"]) | {"state_hash": r["state_hash"]} for r in conn.execute(
            "SELECT state_hash, metrics FROM run_reports WHERE run = ? AND generation = ? AND "
            "step = ?", (run, generation, w["step"]))]
        hashes = Counter(r["state_hash"] for r in reports)
        losses = [r["loss"] for r in reports if isinstance(r.get("loss"), (int, float))]
        steps.append({"step": w["step"], "participants": len(json.loads(w["participants"])),
                      "reports": len(reports), "hashes": dict(hashes),
                      "agree": len(hashes) <= 1,
                      "majority": step_majority(conn, run, generation, w["step"]),
                      "loss": sum(losses) / len(losses) if losses else None,
                      "tokens_per_s": sum(r.get("tokens_per_s") or 0 for r in reports),
                      "seconds": round(w["closed_at"] - w["opened_at"], 3)})
    # The agreed hash of the state after each recent step: what a resyncing peer checks a
    # donor's snapshot against (diloco/role.py), never the donor's own claim.
    agreed = {str(k): step_majority(conn, run, generation, k)
              for k in range(max(0, row["step"] - limit), row["step"] + 1)}
    return {"name": run, "config": row["config"], "creator": row["creator"],
            "created_at": row["created_at"], "generation": generation, "step": row["step"],
            "updated_at": row["updated_at"], "members": members,
            "data_positions": {str(k): v for k, v in sorted(slots.items())},
            "data_cursor": row["data_cursor"], "steps": steps,
            "state_hashes": {k: h for k, h in agreed.items() if h is not None}}


def _reports(conn: sqlite3.Connection, run: str, generation: int | None, since: int,
             limit: int) -> dict:
    row = run_row(conn, run)
    gen = row["generation"] if generation is None else generation
    rows = conn.execute("SELECT * FROM run_reports WHERE run = ? AND generation = ? AND step >= ? "
                        "ORDER BY step, peer_id LIMIT ?", (run, gen, since, limit)).fetchall()
    return {"run": run, "generation": gen, "reports": [
        {"step": r["step"], "peer_id": r["peer_id"], "ts": r["ts"], "state_hash": r["state_hash"],
         **json.loads(r["metrics"])} for r in rows]}


def _list_runs(conn: sqlite3.Connection) -> list[dict]:
    return [{"name": r["name"], "step": r["step"], "generation": r["generation"],
             "created_at": r["created_at"], "updated_at": r["updated_at"],
             "members": conn.execute("SELECT COUNT(*) FROM run_members WHERE run = ?",
                                     (r["name"],)).fetchone()[0]}
            for r in conn.execute("SELECT * FROM runs ORDER BY created_at")]


# -- handlers ---------------------------------------------------------------------------------
async def signed_body(request: web.Request, action: str) -> tuple[dict, str]:
    """(body, peer id) of a run request: signed by an identity with role train (coordinator/
    auth.py) that joined the swarm. ``action`` names the request in errors only: the signature
    covers method and path, so one request cannot pass for another."""
    peer_id = require_role(request, "train").peer_id
    if await request.app[RUNS].registry.public_key(peer_id) is None:
        raise ApiError(404, "unknown_peer", f"peer is not registered; join first ({action})")
    return await read_json_object(request, MAX_BODY), peer_id


async def create_or_get(request: web.Request) -> web.Response:
    run = run_name_of(request)
    body, peer_id = await signed_body(request, "run_join")
    config = get_object(body, "config", max_bytes=MAX_CONFIG)
    explicit = body.get("explicit", [])
    if not isinstance(explicit, list) or not all(isinstance(k, str) for k in explicit):
        raise bad("field 'explicit' must be a list of config keys")
    return web.json_response(await request.app[RUNS].join(run, peer_id, config, explicit))


async def sync(request: web.Request) -> web.Response:
    run = run_name_of(request)
    body, peer_id = await signed_body(request, "run_sync")
    step = body_int(body, "step", 1, 10**12)
    base_hash = _get_hash(body, "base_hash")
    return web.json_response(await request.app[RUNS].sync(run, peer_id, step, base_hash))


async def report(request: web.Request) -> web.Response:
    run = run_name_of(request)
    body, peer_id = await signed_body(request, "run_report")
    step = body_int(body, "step", 0, 10**12)
    state_hash = _get_hash(body, "state_hash")
    raw = get_object(body, "metrics", max_bytes=4096, default={})
    metrics: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in REPORT_FIELDS:
            raise bad(f"metrics.{key} is not a known report field ({', '.join(REPORT_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0:
            raise bad(f"metrics.{key} must be a finite number >= 0")
        metrics[key] = value
    averaged = _averaged(body, peer_id)
    position = metrics.get("data_position")
    answer = await request.app[RUNS].report(run, peer_id, step, state_hash, metrics,
                                            None if position is None else
                                            min(int(position), MAX_BATCH // 2), averaged)
    return web.json_response(answer)


def _averaged(body: dict, reporter: str) -> list[str] | None:
    """The optional ``averaged`` field of a step report: the distinct peer ids (the reporter
    among them) that its final average ran over."""
    value = body.get("averaged")
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= benching.MAX_AVERAGED or not all(
            isinstance(p, str) and PEER_ID_RE.fullmatch(p) for p in value):
        raise bad(f"field 'averaged' must be a list of 1..{benching.MAX_AVERAGED} peer ids "
                  f"(40 lowercase hex)")
    if len(set(value)) != len(value) or reporter not in value:
        raise bad("field 'averaged' must list distinct peer ids, the reporter among them")
    return value


async def leave(request: web.Request) -> web.Response:
    """The peer stopped training (finished, failed or shutting down): rendezvous windows stop
    waiting for it; its data slot becomes free."""
    run = run_name_of(request)
    _, peer_id = await signed_body(request, "run_leave")
    return web.json_response(await request.app[RUNS].store.run(_leave_run, run, peer_id,
                                                               request.app[RUNS].clock.time()))


async def list_runs(request: web.Request) -> web.Response:
    require_role(request)
    return web.json_response({"runs": await request.app[RUNS].store.run(_list_runs)})


async def get_run(request: web.Request) -> web.Response:
    require_role(request)
    run = run_name_of(request)
    service: RunService = request.app[RUNS]
    limit = _query_int(request, "steps", 20, 1, MAX_REPORTS)
    live = set(await service.live(("joining", "active", "suspect")))
    summary = await service.store.run(_summary, run, live, limit)
    summary["latest_checkpoint"] = await asyncio.to_thread(service.latest_checkpoint, run)
    summary["donors"] = await service.donors(run)
    return web.json_response(summary)


async def get_reports(request: web.Request) -> web.Response:
    require_role(request)
    run = run_name_of(request)
    since = _query_int(request, "since", 0, 0, 10**12)
    limit = _query_int(request, "limit", MAX_REPORTS, 1, MAX_REPORTS)
    generation = None
    if "generation" in request.query:
        generation = _query_int(request, "generation", 1, 1, 10**9)
    return web.json_response(await request.app[RUNS].store.run(_reports, run, generation, since,
                                                               limit))


def _query_int(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"query parameter {key!r} must be an integer") from None
    if not lo <= value <= hi:
        raise bad(f"query parameter {key!r} must be in [{lo}, {hi}]")
    return value


def setup_runs(app: web.Application, store: Store, registry: MembershipRegistry,
               backend: Backend, limits: RunLimits = RunLimits()) -> None:
    """Register the run routes (needs setup_membership first: it shares the token settings)."""
    service = RunService(store, registry, backend, limits)
    app[RUNS] = service
    app.router.add_get("/api/runs", list_runs)
    app.router.add_post("/api/runs/{run}", create_or_get)
    app.router.add_get("/api/runs/{run}", get_run)
    app.router.add_post("/api/runs/{run}/sync", sync)
    app.router.add_post("/api/runs/{run}/report", report)
    app.router.add_post("/api/runs/{run}/leave", leave)
    app.router.add_get("/api/runs/{run}/reports", get_reports)

    async def shutdown(app: web.Application) -> None:
        await service.close()

    app.on_cleanup.append(shutdown)
