"""Poisoned-update reports and bans: ``POST /api/runs/{run}/offenses``.

A training peer running the robust all-reduce (collectives.robust) screens the contributions to
the shard it owns; the offenders it catches itself (non-finite, undecodable, norm, direction ...)
it reports here, signed like every run request: ``{step, offenses: [{peer_id, code, detail}]}``.
Both the reporter and the offender must be participants of that step's closed rendezvous window,
and a peer cannot report itself. Reports are kept (idempotent per run, step, offender and
reporter) and shown in /api/status (section ``offenses``).

Ban rule: a peer reported by ``ban_after`` distinct reporters (any runs, any steps) is banned
(coordinator/registry.py: it is ``left`` at once and refused from then on). Distinct reporters,
not reports: a shard owner is trusted only for its own shard, so one lying owner cannot get an
honest peer banned however often it reports. ``ban_after`` = 0 leaves bans to the operator
(``coordinator ban PEER_ID``).
"""
from __future__ import annotations

import json
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
)

MAX_OFFENSES = 64        # per report: one per other participant is all a peer can catch
MAX_DETAIL = 300
MAX_LISTED = 50          # offenders shown in /api/status
CODE_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,39}$")
BAN_AFTER = web.AppKey("offense_ban_after", int)


def _parse_offenses(body: dict, reporter: str) -> list[tuple[str, str, str]]:
    items = body.get("offenses")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_OFFENSES:
        raise bad(f"field 'offenses' must be a list of 1..{MAX_OFFENSES} objects")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise bad("each offense must be an object {peer_id, code, detail}")
        peer = get_str(item, "peer_id", max_len=40, pattern=PEER_ID_RE)
        code = get_str(item, "code", max_len=40, pattern=CODE_RE)
        detail = item.get("detail", "")
        if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
            raise bad(f"offense detail must be a string of at most {MAX_DETAIL} characters")
        if peer == reporter:
            raise bad("a peer cannot report itself", "self_report")
        out.append((peer, code, detail))
    return out


def _record(conn: sqlite3.Connection, run: str, step: int, reporter: str,
            offenses: list[tuple[str, str, str]], ban_after: int, now: float) -> dict:
    """Store the reports; -> {recorded, banned: reported peers already banned, to_ban: {peer:
    reason} that reached ``ban_after`` distinct reporters with this report}."""
    check_not_banned(conn, reporter)
    row = run_row(conn, run)
    run_member(conn, run, reporter)
    window = conn.execute("SELECT participants FROM run_windows WHERE run = ? AND generation = ? "
                          "AND step = ? AND closed_at IS NOT NULL",
                          (run, row["generation"], step)).fetchone()
    took_part = {p for p, _ in json.loads(window["participants"])} if window else set()
    for peer in (reporter, *(o[0] for o in offenses)):
        if peer not in took_part:
            raise ApiError(409, "not_in_step", f"peer {peer} is not a participant of step {step} "
                                               f"of run {run!r}")
    recorded = 0
    for peer, code, detail in offenses:
        cur = conn.execute("INSERT OR IGNORE INTO offenses (ts, run, step, peer_id, reporter, code, "
                           "detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (now, run, step, peer, reporter, code, detail))
        if cur.rowcount:
            recorded += 1
            add_event(conn, "offense", peer, {"run": run, "step": step, "reporter": reporter[:12],
                                              "code": code}, now)
    banned, to_ban = [], {}
    for peer in sorted({o[0] for o in offenses}):
        if conn.execute("SELECT 1 FROM bans WHERE peer_id = ?", (peer,)).fetchone() is not None:
            banned.append(peer)
            continue
        reporters, codes = conn.execute(
            "SELECT COUNT(DISTINCT reporter), GROUP_CONCAT(DISTINCT code) FROM offenses "
            "WHERE peer_id = ?", (peer,)).fetchone()
        if ban_after and reporters >= ban_after:
            to_ban[peer] = f"poisoned updates ({codes}) reported by {reporters} peers"
    return {"recorded": recorded, "banned": banned, "to_ban": to_ban}


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
