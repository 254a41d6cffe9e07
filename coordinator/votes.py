"""Votes that free identities cannot buy: the state-hash majority of a rendezvous, the agreed
hash of each step, and whether an offense report stands, all weighted by verified contribution.

Identities are free (open admission mints them on request), so counting identities lets a burst
of fresh keys outvote the peers that carried a run: three fresh keys sending one bogus base hash
would win a window's majority, send the honest peers to resync and become their only donors;
two fresh keys reporting an honest peer would get it banned. Instead every vote is weighed.

Weight: a peer's **credit** in a run = the number of its outer steps the coordinator verified:
peer p earns one credit for step s when it was a participant of window s (it averaged step s)
AND a participant of window s+1 (its base hash there, the hash of its state after step s,
matched that window's majority), AND no standing offense accusation names it at step s (a
peer the robust all-reduce excluded contributed nothing), AND, when the step's reports say who
averaged it, it is in that set (coordinator/benching.py: a silent seat earns nothing). Credit is added once, when window
s+1 closes (``credit_window``). A fresh identity has credit 0 until it has contributed; steps
taken offline (no windows) earn nothing.

Rules (pure functions below, SQL helpers after them):

- **Majority** (``majority``): the hash whose voters' credits sum highest, so a side with any
  credit beats any number of fresh identities; ties (including a brand-new run where every
  weight is 0) go to the number of voters, then to a ``prior`` hash (the one the previous step's
  reports favour), then to the smallest hash (any deterministic last rule would do).
- **Agreed hash of step s** (``step_majority``): the majority of window s+1 if it has closed
  (a vote with every arrival's weight); otherwise the hash reported for step s by more than half
  of window s's participants, by weight (by count when none has any): a peer that did not take
  part in step s cannot vote on it, and the first report in cannot decide alone. A
  resyncing peer checks a donor's snapshot against this, never against the donor's own claim;
  checkpoint uploads are checked against it too. A step taken offline (no window) advances the
  run only once it is decided among the last window's participants (coordinator/runs.py).
- **Accusation** (``accusation_stands``): in the robust all-reduce every shard owner screens
  every other participant's slice of its shard, so an offender's screeners at step s are all
  other participants of window s. A report counts only from a participant that owned a shard
  (coordinator/offenses.py checks the shard index against the window's ring order), and the
  accusation stands only when the accusers outweigh the screeners who stayed silent (credit;
  on a tie, by count). Two fresh keys accusing a peer that credited peers screened without
  finding anything do not stand, whatever they report.

Limits (docs/security.md): credit measures participation, not useful work: an attacker who runs
k identities that take part honestly for t steps gains k*t credit and can then outvote peers
that earned less. It buys nothing quickly, and closed admission (invites) bounds k. In a
brand-new run every weight is 0 and the vote falls back to counting identities.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping

CREDIT_SCHEMA = """
CREATE TABLE run_credit (
    run        TEXT NOT NULL,
    peer_id    TEXT NOT NULL,
    credit     INTEGER NOT NULL DEFAULT 0,
    last_step  INTEGER,
    PRIMARY KEY (run, peer_id)
);
"""


# -- pure rules ---------------------------------------------------------------------------------
def majority(ballots: Mapping[str, str], weights: Mapping[str, int],
             prior: str | None = None) -> str | None:
    """The winning hash of ``ballots`` (voter -> hash); None when nobody voted. Order: total
    weight of its voters, then their number, then equality with ``prior``, then the smallest hash."""
    weight: dict[str, int] = {}
    count: dict[str, int] = {}
    for voter, h in ballots.items():
        weight[h] = weight.get(h, 0) + max(0, weights.get(voter, 0))
        count[h] = count.get(h, 0) + 1
    if not count:
        return None
    return max(count, key=lambda h: (weight[h], count[h], h == prior, [-ord(c) for c in h]))


def accusation_stands(accusers: Iterable[str], screeners: Iterable[str],
                      weights: Mapping[str, int]) -> bool:
    """Whether the ``accusers`` (distinct reporters of one peer at one step) outweigh the other
    ``screeners`` of that peer (every participant but the accused) who did not report it."""
    accusers = set(accusers)
    silent = set(screeners) - accusers
    w_acc = sum(max(0, weights.get(p, 0)) for p in accusers)
    w_silent = sum(max(0, weights.get(p, 0)) for p in silent)
    if w_acc != w_silent:
        return w_acc > w_silent
    return len(accusers) > len(silent)


def decided_majority(ballots: Mapping[str, str], weights: Mapping[str, int],
                     voters: Iterable[str]) -> str | None:
    """The ``majority`` of ``ballots`` if its backers hold more than half of all ``voters``'
    weight (by count when they all weigh 0), else None: the first ballot in cannot decide."""
    voters = list(voters)
    winner = majority(ballots, weights)
    if winner is None:
        return None
    total = sum(max(0, weights.get(p, 0)) for p in voters)
    backers = [p for p, h in ballots.items() if h == winner]
    if total:
        return winner if 2 * sum(max(0, weights.get(p, 0)) for p in backers) > total else None
    return winner if 2 * len(backers) > len(voters) else None


# -- store helpers (called inside Store.run transactions) ---------------------------------------
def credits(conn: sqlite3.Connection, run: str) -> dict[str, int]:
    """peer id -> credit in ``run`` (peers without credit are absent: weight 0)."""
    return {r["peer_id"]: r["credit"] for r in conn.execute(
        "SELECT peer_id, credit FROM run_credit WHERE run = ?", (run,))}


def window_participants(conn: sqlite3.Connection, run: str, generation: int,
                        step: int) -> list[str] | None:
    """The participants (ring order) of closed window ``step``; None when it did not close."""
    row = conn.execute("SELECT participants FROM run_windows WHERE run = ? AND generation = ? "
                       "AND step = ? AND closed_at IS NOT NULL", (run, generation, step)).fetchone()
    return None if row is None else [p for p, _ in json.loads(row["participants"])]


def report_majority(conn: sqlite3.Connection, run: str, generation: int, step: int,
                    weights: Mapping[str, int] | None = None, *, decided: bool = False,
                    voters: list[str] | None = None) -> str | None:
    """Weighted majority of the step-``step`` reports of ``voters``: by default window
    ``step``'s participants when that window exists (offline steps had none: every member's
    report counts, unless the caller names the voters, e.g. the last window's participants).
    With ``decided``, None unless the winner holds more than half of all the voters' weight
    (by count when they all weigh 0), so the first report in cannot name the state alone."""
    weights = credits(conn, run) if weights is None else weights
    if voters is None:
        voters = window_participants(conn, run, generation, step)
    ballots = {r["peer_id"]: r["state_hash"] for r in conn.execute(
        "SELECT peer_id, state_hash FROM run_reports WHERE run = ? AND generation = ? AND step = ?",
        (run, generation, step)) if voters is None or r["peer_id"] in voters}
    if not decided or voters is None:
        return majority(ballots, weights)
    return decided_majority(ballots, weights, voters)


def step_majority(conn: sqlite3.Connection, run: str, generation: int, step: int) -> str | None:
    """The agreed hash of the global state after outer step ``step`` (rule in the module
    docstring); None when the coordinator has no vote on it (yet)."""
    row = conn.execute("SELECT majority_hash FROM run_windows WHERE run = ? AND generation = ? "
                       "AND step = ? AND closed_at IS NOT NULL",
                       (run, generation, step + 1)).fetchone()
    if row is not None and row["majority_hash"]:
        return row["majority_hash"]
    return report_majority(conn, run, generation, step, decided=True)


def accusers_of(conn: sqlite3.Connection, run: str, generation: int, step: int,
                peer_id: str) -> set[str]:
    """Distinct reporters of ``peer_id`` at ``step`` (table ``offenses``, coordinator/offenses.py;
    empty while that table does not exist)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'offenses'").fetchone() is None:
        return set()
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT reporter FROM offenses WHERE run = ? AND generation = ? AND step = ? "
        "AND peer_id = ?", (run, generation, step, peer_id))}


def standing_at(conn: sqlite3.Connection, run: str, generation: int, step: int, peer_id: str,
                participants: list[str], weights: Mapping[str, int]) -> set[str]:
    """The accusers of ``peer_id`` at ``step`` when their accusation stands, else empty."""
    accusers = accusers_of(conn, run, generation, step, peer_id) & set(participants)
    screeners = [p for p in participants if p != peer_id]
    return accusers if accusers and accusation_stands(accusers, screeners, weights) else set()


def credit_window(conn: sqlite3.Connection, run: str, generation: int, step: int,
                  participants: list[str], averaged: set[str] | None = None) -> list[str]:
    """Window ``step`` closed with ``participants``: credit step ``step``-1 to those of them that
    also took part in it, are not standing offenders there and, when the coordinator judged who
    averaged step ``step``-1 (``averaged``, coordinator/benching.py), are in that set: a seat
    taken without averaging earns nothing. -> the credited peers."""
    before = window_participants(conn, run, generation, step - 1)
    if not before:
        return []
    weights = credits(conn, run)
    earned = [p for p in participants if p in before and (averaged is None or p in averaged)
              and not standing_at(conn, run, generation, step - 1, p, before, weights)]
    conn.executemany(
        "INSERT INTO run_credit (run, peer_id, credit, last_step) VALUES (?, ?, 1, ?) "
        "ON CONFLICT (run, peer_id) DO UPDATE SET credit = credit + 1, "
        "last_step = excluded.last_step", [(run, p, step - 1) for p in earned])
    return earned
