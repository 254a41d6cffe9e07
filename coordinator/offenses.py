"""Poisoned-update reports and bans: ``POST /api/runs/{run}/offenses``.

A training peer running the robust all-reduce (collectives.robust) screens the contributions to
the shard it owns; the offenders it catches itself (non-finite, undecodable, norm, direction ...)
it reports here, signed like every run request:
``{step, offenses: [{peer_id, code, detail, shard}]}``. ``shard`` is the shard whose owner
screened the contribution: the reporter's own, i.e. its index in the ring order of that step
(the window's participants, sorted ids; a peer reports only averages over exactly those
participants, diloco/mesh.py). The coordinator checks that the reporter owned that shard and
that reporter and offender are participants of that step's closed window; a peer cannot report
itself. Reports are kept (idempotent per run, step, offender and reporter) and shown in
/api/status (section ``offenses``).

Ban rule: every owner screens every other participant, so an offender's screeners at step s
are all other participants of window s. A report stands only when its step's accusers outweigh
the screeners that did not accuse (coordinator/votes.py ``accusation_stands``: verified
contribution, then count), so fresh identities cannot accuse peers that credited peers screened
and found clean. A peer accused in standing reports by ``ban_after`` distinct reporters (any
runs, any steps) is banned (coordinator/registry.py: it is ``left`` at once and refused from
then on). Distinct reporters, not reports: one lying owner cannot get an honest peer banned
however often it reports. ``ban_after`` = 0 leaves bans to the operator (``coordinator ban
PEER_ID``).
"""
from __future__ import annotations

import re
import sqlite3
import time
from typing import Sequence

from aiohttp import web

from coordinator.defaults import DEFAULT_BAN_AFTER
from coordinator.registry import check_not_banned, select_bans
from coordinator.runs import RUNS, RunService, body_int, run_member, run_name_of, run_row, signed_body
from coordinator.store import add_event
from coordinator.validation import PEER_ID_RE, ApiError, bad, get_str
from coordinator.votes import credits, standing_at, window_participants

OFFENSES_MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE offenses (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL NOT NULL,
        run      TEXT NOT NULL,
        step     INTEGER NOT NULL,
        peer_id  TEXT NOT NULL,
        reporter TEXT NOT NULL,
        code     TEXT NOT NULL,
        detail   TEXT NOT NULL,
        UNIQUE (run, step, peer_id, reporter)
    );
    CREATE INDEX offenses_peer ON offenses(peer_id);
    """,
    # Which window (generation) and shard a report is about: the ban rule weighs each step.
    """
    ALTER TABLE offenses ADD COLUMN generation INTEGER;
    ALTER TABLE offenses ADD COLUMN shard INTEGER;
    """,
)

MAX_OFFENSES = 64        # per report: one per other participant is all a peer can catch
MAX_DETAIL = 300
MAX_LISTED = 50          # offenders shown in /api/status
MAX_STEPS_WEIGHED = 200  # latest accused steps per peer the ban rule weighs
MAX_SHARD = 10**4        # bound of a shard index (one per participant of a window)
CODE_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,39}$")
BAN_AFTER = web.AppKey("offense_ban_after", int)


def _parse_offenses(body: dict, reporter: str) -> list[tuple[str, str, str, int]]:
    items = body.get("offenses")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_OFFENSES:
        raise bad(f"field 'offenses' must be a list of 1..{MAX_OFFENSES} objects")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise bad("each offense must be an object {peer_id, code, detail, shard}")
        peer = get_str(item, "peer_id", max_len=40, pattern=PEER_ID_RE)
        if peer == reporter:
            raise bad("a peer cannot report itself", "self_report")
        code = get_str(item, "code", max_len=40, pattern=CODE_RE)
        detail = item.get("detail", "")
        if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
            raise bad(f"offense detail must be a string of at most {MAX_DETAIL} characters")
        shard = item.get("shard")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < MAX_SHARD:
            raise bad(f"offense shard must be an integer in [0, {MAX_SHARD}): the index of the "
                      f"shard whose owner (the reporter) screened the contribution")
        out.append((peer, code, detail, shard))
    return out


def _record(conn: sqlite3.Connection, run: str, step: int, reporter: str,
            offenses: list[tuple[str, str, str, int]], ban_after: int, now: float) -> dict:
    """Store the reports; -> {recorded, banned: reported peers already banned, to_ban: {peer:
    reason} that reached ``ban_after`` distinct reporters of standing accusations}."""
    check_not_banned(conn, reporter)
    row = run_row(conn, run)
    run_member(conn, run, reporter)
    generation = row["generation"]
    ring = window_participants(conn, run, generation, step) or []
    for peer in (reporter, *(o[0] for o in offenses)):
        if peer not in ring:
            raise ApiError(409, "not_in_step", f"peer {peer} is not a participant of step {step} "
                                               f"of run {run!r}")
    for _, _, _, shard in offenses:
        if shard >= len(ring) or ring[shard] != reporter:
            raise ApiError(403, "not_shard_owner",
                           f"shard {shard} of step {step} of run {run!r} is owned by "
                           f"{ring[shard] if shard < len(ring) else 'nobody'}, not by the "
                           f"reporter: only the owner that screened a contribution may report it")
    recorded = 0
    for peer, code, detail, shard in offenses:
        cur = conn.execute("INSERT OR IGNORE INTO offenses (ts, run, generation, step, shard, "
                           "peer_id, reporter, code, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (now, run, generation, step, shard, peer, reporter, code, detail))
        if cur.rowcount:
            recorded += 1
            add_event(conn, "offense", peer, {"run": run, "step": step, "reporter": reporter[:12],
                                              "code": code}, now)
    banned, to_ban = [], {}
    for peer in sorted({o[0] for o in offenses}):
        if conn.execute("SELECT 1 FROM bans WHERE peer_id = ?", (peer,)).fetchone() is not None:
            banned.append(peer)
            continue
        reporters, codes = standing_reporters(conn, peer)
        if ban_after and len(reporters) >= ban_after:
            to_ban[peer] = (f"poisoned updates ({','.join(sorted(codes))}) reported by "
                            f"{len(reporters)} peers")
    return {"recorded": recorded, "banned": banned, "to_ban": to_ban}


def standing_reporters(conn: sqlite3.Connection, peer_id: str) -> tuple[set[str], set[str]]:
    """Distinct reporters (and their codes) of the accusations of ``peer_id`` that stand
    (coordinator/votes.py), over its ``MAX_STEPS_WEIGHED`` latest accused steps."""
    reporters: set[str] = set()
    codes: set[str] = set()
    weights: dict[str, dict[str, int]] = {}
    for r in conn.execute("SELECT run, generation, step, MAX(id) AS last FROM offenses "
                          "WHERE peer_id = ? AND generation IS NOT NULL "
                          "GROUP BY run, generation, step ORDER BY last DESC LIMIT ?",
                          (peer_id, MAX_STEPS_WEIGHED)).fetchall():
        ring = window_participants(conn, r["run"], r["generation"], r["step"]) or []
        if r["run"] not in weights:
            weights[r["run"]] = credits(conn, r["run"])
        accusers = standing_at(conn, r["run"], r["generation"], r["step"], peer_id, ring,
                               weights[r["run"]])
        if accusers:
            reporters |= accusers
            codes |= {c[0] for c in conn.execute(
                "SELECT DISTINCT code FROM offenses WHERE run = ? AND generation = ? AND step = ? "
                "AND peer_id = ?", (r["run"], r["generation"], r["step"], peer_id))}
    return reporters, codes


def forget_reports(conn: sqlite3.Connection, peer_id: str) -> int:
    """Drop every report about ``peer_id`` (an unbanned peer starts with a clean slate)."""
    return conn.execute("DELETE FROM offenses WHERE peer_id = ?", (peer_id,)).rowcount


def offense_summary(conn: sqlite3.Connection) -> dict:
    """/api/status section ``offenses``: per reported peer (latest first) the report and distinct
    reporter counts, codes and latest report; and the bans."""
    bans = select_bans(conn)
    banned = {b["peer_id"] for b in bans}
    peers = []
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'offenses'").fetchone() is not None:
        for r in conn.execute(
                "SELECT peer_id, COUNT(*) AS reports, COUNT(DISTINCT reporter) AS reporters, "
                "GROUP_CONCAT(DISTINCT code) AS codes, MAX(id) AS last FROM offenses "
                "GROUP BY peer_id ORDER BY last DESC LIMIT ?", (MAX_LISTED,)).fetchall():
            last = conn.execute("SELECT ts, run, step, reporter, code, detail FROM offenses "
                                "WHERE id = ?", (r["last"],)).fetchone()
            peers.append({"peer_id": r["peer_id"], "reports": r["reports"],
                          "reporters": r["reporters"], "codes": r["codes"].split(","),
                          "last": dict(last), "banned": r["peer_id"] in banned})
    return {"peers": peers, "bans": bans}


async def report_offenses(request: web.Request) -> web.Response:
    run = run_name_of(request)
    body, reporter = await signed_body(request, "run_offense")
    step = body_int(body, "step", 1, 10**12)
    offenses = _parse_offenses(body, reporter)
    service: RunService = request.app[RUNS]
    result = await service.store.run(_record, run, step, reporter, offenses,
                                     request.app[BAN_AFTER], time.time())
    for peer, reason in result["to_ban"].items():
        await service.registry.ban(peer, reason, "auto")
    return web.json_response({"run": run, "step": step, "recorded": result["recorded"],
                              "banned": sorted([*result["banned"], *result["to_ban"]])})


def setup_offenses(app: web.Application, ban_after: int = DEFAULT_BAN_AFTER) -> None:
    """Register the offense route (after setup_runs: it shares the run service and its checks)."""
    if ban_after < 0:
        raise ValueError(f"ban_after must be >= 0 (0 = never ban automatically), got {ban_after}")
    app[RUNS].store.apply_schema("offenses", OFFENSES_MIGRATIONS)
    app[BAN_AFTER] = ban_after
    app.router.add_post("/api/runs/{run}/offenses", report_offenses)
