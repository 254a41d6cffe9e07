"""Silent participants: who really averaged each outer step, benching those who did not, and a
bounded rate of newcomers per rendezvous window.

The attack: any admitted key (open admission mints them for free) can join a run, heartbeat,
read the agreed base hash and arrive at each window with it. It is then counted as a
participant, sends nothing, and the honest all-reduce waits for its deadline before retrying
over the survivors (collectives/fault.py) -- every step, one slow step each.

Mechanism (all decided when window s+1 closes, inside coordinator/runs.py ``_maybe_close``):

- **Who averaged.** Each step report carries ``averaged``: the peer ids the reporter's final
  average ran over (the fault layer's survivor set; identical on every peer that finished).
  ``judge`` takes, over the reports of window s's participants, the set backed by more than
  half of their verified contribution (coordinator/votes.py ``decided_majority``: credit, by
  count when nobody has any), so weightless fresh keys cannot vouch for themselves. Without a
  decided set (old peers that do not send it, lost reports) nobody is judged.
- **Bench.** A participant of window s missing from that set took a seat and did not average:
  it gets a strike and sits out windows s+1 .. s+2^(k-1) (k = its strikes, at most
  ``MAX_BENCH`` windows); a step it does average takes one strike away. A benched arrival is
  told to resync (it missed the step); it earns no credit for step s (votes.credit_window).
  An honest peer that crashes mid-average and rejoins pays one short bench (one window after
  its first failure) -- usually less time than its restart and resync take anyway.
- **Newcomers.** Fresh keys are free, so per-identity benching alone lets a stream of new keys
  cost one slow step each. A newcomer is never in an agreed averaged set, has no credit and
  was not a participant of the previous window. While no newcomer has failed (f = 0), every
  newcomer enters. When newcomers fail, f grows by one per failed window (each admitted
  newcomer that averages takes one back) and no newcomer enters for the next 2^f windows (at
  most ``MAX_BENCH``); after that, while f > 0, at most ``max(1, veterans // 4)`` newcomers enter
  a window, and only with veterans (the others) there, chosen by a hash of the window and their
  ids (arriving first buys nothing). So a stream of fresh silent keys costs failed steps at
  windows about 1, 4, 9, 18, 35, ... and then one in every ``MAX_BENCH`` + 1 at most.

Trade-off (docs/security.md): while under such an attack, honest joiners wait longer for a
window (one newcomer per window, none while the gate is closed), each wait costing them a
resync. A run with no veteran at all (brand new, or every founder restarted) admits everyone:
nobody's history tells them apart.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping

from coordinator.votes import credits, decided_majority, window_participants

MAX_BENCH = 64          # longest bench (windows) of one identity, and of the newcomer gate
MAX_AVERAGED = 1024     # ids one report may list
KEEP_STEPS = 32         # averaged sets kept per run behind the newest judged step

BENCHING_SCHEMA = """
CREATE TABLE run_averaged (
    run        TEXT NOT NULL,
    generation INTEGER NOT NULL,
    step       INTEGER NOT NULL,
    reporter   TEXT NOT NULL,
    members    TEXT NOT NULL,
    PRIMARY KEY (run, generation, step, reporter)
);
CREATE TABLE run_standing (
    run          TEXT NOT NULL,
    peer_id      TEXT NOT NULL,
    averaged     INTEGER NOT NULL DEFAULT 0,
    strikes      INTEGER NOT NULL DEFAULT 0,
    benched_until INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, peer_id)
);
CREATE TABLE run_gate (
    run        TEXT PRIMARY KEY,
    failures   INTEGER NOT NULL DEFAULT 0,
    closed_until INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE run_judged (
    run        TEXT NOT NULL,
    generation INTEGER NOT NULL,
    step       INTEGER NOT NULL,
    averaged   TEXT NOT NULL,
    PRIMARY KEY (run, generation, step)
);
"""
BENCHING_MIGRATIONS = (BENCHING_SCHEMA,)


def bench_windows(strikes: int) -> int:
    """Windows an identity with ``strikes`` sits out after its latest failure: 1, 2, 4 ... 64."""
    return min(MAX_BENCH, 1 << max(0, strikes - 1))


def gate_windows(failures: int) -> int:
    """Windows no newcomer enters after ``failures`` newcomer failures in a row: 2, 4 ... 64."""
    return min(MAX_BENCH, 1 << max(1, failures))


def newcomer_quota(veterans: int) -> int:
    return max(1, veterans // 4)


def lottery(tag: str, peers: Iterable[str]) -> list[str]:
    """``peers`` in an order fixed by the window's tag: neither arrival time nor id choice
    (before the step is known) buys a place."""
    return sorted(peers, key=lambda p: hashlib.sha256(f"{tag}\n{p}".encode()).digest())


# -- store helpers (inside Store.run transactions) ---------------------------------------------
def record_averaged(conn: sqlite3.Connection, run: str, generation: int, step: int,
                    reporter: str, members: list[str]) -> None:
    """Keep a report's averaged set when it can vote: from a participant of closed window
    ``step`` (offline steps have no window to judge; this also bounds what one key may store)."""
    if reporter not in (window_participants(conn, run, generation, step) or ()):
        return
    conn.execute("INSERT OR REPLACE INTO run_averaged (run, generation, step, reporter, members) "
                 "VALUES (?, ?, ?, ?, ?)",
                 (run, generation, step, reporter, json.dumps(sorted(set(members)))))


def _standing(conn: sqlite3.Connection, run: str) -> dict[str, sqlite3.Row]:
    return {r["peer_id"]: r for r in conn.execute(
        "SELECT * FROM run_standing WHERE run = ?", (run,))}


def agreed_averaged(conn: sqlite3.Connection, run: str, generation: int,
                    step: int) -> set[str] | None:
    """The judged averaged set of ``step`` (None: not judged, or no decided set)."""
    row = conn.execute("SELECT averaged FROM run_judged WHERE run = ? AND generation = ? AND "
                       "step = ?", (run, generation, step)).fetchone()
    if row is None or row["averaged"] == "null":
        return None
    return set(json.loads(row["averaged"]))


def judge(conn: sqlite3.Connection, run: str, generation: int, step: int,
          weights: Mapping[str, int]) -> dict:
    """Judge closed window ``step`` from its participants' reports (once): strikes and benches
    for the participants missing from the agreed averaged set. -> {"averaged": set | None,
    "benched": [peer ids], "newcomers_failed": n}."""
    done = {"averaged": None, "benched": [], "newcomers_failed": 0}
    if conn.execute("SELECT 1 FROM run_judged WHERE run = ? AND generation = ? AND step = ?",
                    (run, generation, step)).fetchone() is not None:
        return {**done, "averaged": agreed_averaged(conn, run, generation, step)}
    voters = window_participants(conn, run, generation, step)
    if not voters:
        return done
    ballots = {r["reporter"]: r["members"] for r in conn.execute(
        "SELECT reporter, members FROM run_averaged WHERE run = ? AND generation = ? AND step = ?",
        (run, generation, step)) if r["reporter"] in voters}
    winner = decided_majority(ballots, weights, voters)
    conn.execute("INSERT INTO run_judged (run, generation, step, averaged) VALUES (?, ?, ?, ?)",
                 (run, generation, step, winner if winner is not None else "null"))
    conn.execute("DELETE FROM run_averaged WHERE run = ? AND (generation < ? OR step < ?)",
                 (run, generation, step - KEEP_STEPS))
    conn.execute("DELETE FROM run_judged WHERE run = ? AND (generation < ? OR step < ?)",
                 (run, generation, step - KEEP_STEPS))
    if winner is None:
        return done
    averaged = set(json.loads(winner))
    standing = _standing(conn, run)
    benched, newcomer_failed, newcomer_ok = [], 0, 0
    for p in voters:
        row = standing.get(p)
        strikes = row["strikes"] if row else 0
        was_new = (row is None or row["averaged"] == 0) and weights.get(p, 0) <= 0
        if p in averaged:
            newcomer_ok += was_new
            conn.execute("INSERT INTO run_standing (run, peer_id, averaged) VALUES (?, ?, 1) "
                         "ON CONFLICT (run, peer_id) DO UPDATE SET averaged = averaged + 1, "
                         "strikes = MAX(0, strikes - 1)", (run, p))
            continue
        strikes += 1
        until = step + bench_windows(strikes)
        conn.execute("INSERT INTO run_standing (run, peer_id, strikes, benched_until) "
                     "VALUES (?, ?, ?, ?) ON CONFLICT (run, peer_id) DO UPDATE SET "
                     "strikes = excluded.strikes, benched_until = excluded.benched_until",
                     (run, p, strikes, until))
        benched.append(p)
        newcomer_failed += was_new
    gate = conn.execute("SELECT failures FROM run_gate WHERE run = ?", (run,)).fetchone()
    failures = gate["failures"] if gate else 0
    if newcomer_failed:
        failures += 1
        conn.execute("INSERT OR REPLACE INTO run_gate (run, failures, closed_until) "
                     "VALUES (?, ?, ?)", (run, failures, step + gate_windows(failures)))
    elif newcomer_ok and failures:
        conn.execute("UPDATE run_gate SET failures = MAX(0, failures - ?) WHERE run = ?",
                     (newcomer_ok, run))
    return {"averaged": averaged, "benched": benched, "newcomers_failed": newcomer_failed}


def left_out(conn: sqlite3.Connection, run: str, generation: int, step: int,
             eligible: list[str], weights: Mapping[str, int], tag: str) -> dict[str, str]:
    """Which of ``eligible`` (arrivals at window ``step`` with the agreed base hash) sit this
    window out, each with the reason: benched, or a newcomer over the quota / behind the gate."""
    standing = _standing(conn, run)
    out = {p: "benched" for p in eligible
           if p in standing and standing[p]["benched_until"] >= step}
    before = set(window_participants(conn, run, generation, step - 1) or ())
    seated = [p for p in eligible if p not in out]
    newcomers = [p for p in seated if p not in before and weights.get(p, 0) <= 0
                 and (p not in standing or standing[p]["averaged"] == 0)]
    veterans = len(seated) - len(newcomers)
    if not seated:
        return {}  # nobody else is there to be held up: a window is never left empty
    if not newcomers or not veterans:
        return out
    gate = conn.execute("SELECT failures, closed_until FROM run_gate WHERE run = ?",
                        (run,)).fetchone()
    if gate is None or not gate["failures"]:
        return out  # no newcomer failed lately: every newcomer may enter
    quota = 0 if gate["closed_until"] >= step else newcomer_quota(veterans)
    for p in lottery(tag, newcomers)[quota:]:
        out[p] = "newcomer_wait"
    return out


def bench_status(conn: sqlite3.Connection, run: str, peer_id: str) -> dict | None:
    row = conn.execute("SELECT strikes, benched_until FROM run_standing WHERE run = ? AND "
                       "peer_id = ?", (run, peer_id)).fetchone()
    gate = conn.execute("SELECT closed_until FROM run_gate WHERE run = ?", (run,)).fetchone()
    return {"strikes": row["strikes"] if row else 0,
            "until_step": row["benched_until"] if row else 0,
            "newcomers_closed_until": gate["closed_until"] if gate else 0}
