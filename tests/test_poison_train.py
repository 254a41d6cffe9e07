"""Poisoned updates in training runs: a peer sending a sign-flipped, huge or NaN pseudo-gradient is
excluded from the average by the robust all-reduce (run config ``robust``), attributed to its
peer id by the shard owners that caught it, reported to the coordinator and banned there.

The training test runs real processes over real TCP on 127.0.0.1: a coordinator, three honest
`peer join --train` peers and one peer started through tests/poison_child.py (the shipped code,
with its pseudo-gradient poisoned: flip, huge, nan at steps 1, 2, 3). The ban rule is checked on
the real coordinator app in-process with real signed clients, plus the `coordinator ban|unban`
CLI as a separate process on the live database.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from diloco.run_client import RunClient
from peer.membership import CoordinatorError, PeerBanned
from tests.harness import ROOT, Child, Procs
from tests.poison_child import ENV
from tests.test_runs_api import Coord
from tests.test_runs_api import start as start_inprocess
from tests.test_train_mesh import (INTERVAL, PEER_CMD, RUN, TIMEOUT, TOKEN, api, corpus,
                                   reports_by_step, wait_until)

H0 = "0" * 64
ATTACK_CODES = {1: "direction", 2: "norm", 3: "non-finite"}  # flip, huge, nan


def coordinator_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60)


def join(procs: Procs, url: str, cmd: list[str], key: Path, *flags: str, env: dict | None = None) -> Child:
    return procs.spawn([*cmd, "join", "--coordinator", url, "--token", TOKEN, "--listen",
                        "127.0.0.1:0", "--key", str(key), "--device", "cpu", "--ping-interval", "0.5",
                        "--train", RUN, *flags], wait_ready=False, env=env)


def test_poisoned_peer_is_excluded_reported_and_banned(procs, tmp_path):
    coord_dir = tmp_path / "coord"
    # --ban-after 0: the offender stays in for all three attacks; the operator bans it.
    url = procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                       "--data-dir", str(coord_dir), "--token", TOKEN, "--heartbeat-interval",
                       str(INTERVAL), "--peer-timeout", str(TIMEOUT), "--ban-after", "0").ready["url"]
    data = corpus(tmp_path)
    # --min-peers 4: the first step waits for the poisoner too. After the ban a step waits
    # --sync-timeout for a fourth peer that never comes.
    flags = ["--preset", "micro", "--inner-steps", "3", "--seq-len", "32", "--batch-size", "4",
             "--sync-timeout", "12", "--min-peers", "4", "--robust", "detect", "--data", str(data)]
    honest = [join(procs, url, PEER_CMD, tmp_path / f"h{i}.key", *flags) for i in range(3)]
    bad = join(procs, url, [sys.executable, "-m", "tests.poison_child"], tmp_path / "bad.key", *flags,
               env={ENV: "flip,huge,nan"})
    for child in (*honest, bad):
        wait_until(lambda: child.ready or child.proc.poll() is not None, 180, "READY")
        assert child.ready, "\n".join(child.lines[-40:])
    honest_ids = {p.ready["peer_id"] for p in honest}
    bad_id = bad.ready["peer_id"]

    def wait(predicate, timeout: float, what: str):
        try:
            return wait_until(predicate, timeout, what)
        except AssertionError as e:  # say what the peers were doing
            tails = "\n\n".join("\n".join(p.lines[-25:]) for p in (*honest, bad))
            raise AssertionError(f"{e}; offenses {api(url, '/api/status')['offenses']}\n{tails}") from None

    def offender_entry():
        peers = api(url, "/api/status")["offenses"]["peers"]
        return peers if peers and peers[0]["reporters"] == 3 and \
            set(ATTACK_CODES.values()) <= set(peers[0]["codes"]) else None

    peers = wait(offender_entry, 150, "reports of all three attacks by the three honest peers")
    # Attributed to the poisoner only, by every honest shard owner, and not banned yet (ban_after 0).
    assert [p["peer_id"] for p in peers] == [bad_id] and not peers[0]["banned"]
    for p in honest:  # every peer names the offender and the reason of each step
        for step, code in ATTACK_CODES.items():
            line = p.wait_for_line(f"train {RUN}: step {step}: excluded peer {bad_id}", timeout=10)
            assert f": {code} (shard" in line, line
    by_step = reports_by_step(url)
    for step in ATTACK_CODES:
        rows = [by_step[step][p] for p in honest_ids]
        assert len({r["state_hash"] for r in rows}) == 1, f"step {step}: honest peers disagree"
        assert all(r["participants"] == 3 for r in rows), rows  # the mean left the offender out
        assert all(r["loss"] < 10 for r in rows)  # finite, nothing blew up

    banned = coordinator_cli("ban", bad_id[:12], "--data-dir", str(coord_dir), "--reason", "poisoner")
    assert banned.returncode == 0 and f"banned {bad_id}" in banned.stdout, banned.stderr
    # Its next heartbeat is refused: the peer stops with the reason.
    assert bad.wait(timeout=30) == 1
    assert bad.wait_for_line("is banned from this swarm (poisoner)", timeout=5)
    again = join(procs, url, PEER_CMD, tmp_path / "bad.key")  # a restart, checked below
    # The run goes on without it. Its reports are refused since the ban and it is gone, so the
    # next step (which it may have entered before the ban) is the honest peers' alone.
    last = max(reports_by_step(url))
    rows = wait(lambda: honest_ids <= set(reports_by_step(url).get(last + 1, {})) and
                reports_by_step(url)[last + 1], 120, "a step after the ban")
    assert set(rows) == honest_ids and len({r["state_hash"] for r in rows.values()}) == 1
    assert all(r["participants"] == 3 for r in rows.values())
    # The restart with the banned key is refused before it starts.
    assert again.wait(timeout=60) == 2
    assert again.wait_for_line("is banned from this swarm", timeout=5)
    bans = api(url, "/api/status")["offenses"]["bans"]
    assert [(b["peer_id"], b["source"]) for b in bans] == [(bad_id, "operator")]


async def test_distinct_reporters_ban_and_the_operator_can_lift_it(tmp_path):
    coord: Coord = await start_inprocess(tmp_path / "coord")  # ban_after: the default, 2
    clients: list[RunClient] = []
    try:
        for _ in range(3):
            client, _ = await coord.peer()
            clients.append(client)
        a, b, x = clients
        xid = x.identity.peer_id
        await asyncio.gather(*(c.sync("r", 1, H0, deadline_s=20) for c in clients))
        ring = sorted(c.identity.peer_id for c in clients)  # the window's ring order
        # an offense names the shard its reporter owned and screened in that step's ring
        offense = [{"peer_id": xid, "code": "direction", "detail": "cosine -0.9",
                    "shard": ring.index(a.identity.peer_id)}]

        for who, step, offenses, status, code in (
                (x, 1, [{**offense[0], "peer_id": xid}], 400, "self_report"),
                (a, 2, offense, 409, "not_in_step"),  # step 2 has no closed window yet
                (a, 1, [{**offense[0], "code": "Bad Code"}], 400, "bad_request")):
            with pytest.raises(CoordinatorError) as err:
                await who.report_offenses("r", step, offenses)
            assert (err.value.status, err.value.code) == (status, code)
        # One reporter, however often it reports, does not ban: a lying shard owner cannot.
        assert await a.report_offenses("r", 1, offense) == {"run": "r", "step": 1, "recorded": 1,
                                                            "banned": []}
        assert (await a.report_offenses("r", 1, offense))["recorded"] == 0
        by_b = [{**offense[0], "shard": ring.index(b.identity.peer_id)}]
        assert (await b.report_offenses("r", 1, by_b))["banned"] == [xid]

        peers = {p.peer_id: p.state for p in await a.peers()}
        assert peers[xid] == "left"  # out of every rendezvous at once
        for call in (x.heartbeat({}), x.join("127.0.0.1:9999", {}), x.sync("r", 2, H0, deadline_s=5)):
            with pytest.raises(PeerBanned, match="banned from this swarm"):
                await call
        section = (await a.status())["offenses"]
        assert section["ban_after"] == 2 and [b["source"] for b in section["bans"]] == ["auto"]
        assert [(p["peer_id"], p["reports"], p["reporters"], p["codes"], p["banned"])
                for p in section["peers"]] == [(xid, 2, 2, ["direction"], True)]

        # The CLI works on the running coordinator's database; a prefix names a known peer.
        data_dir = str(tmp_path / "coord")
        bad = await asyncio.to_thread(coordinator_cli, "unban", "0000", "--data-dir", data_dir)
        assert bad.returncode == 1 and "matches 0 known peers" in bad.stderr
        done = await asyncio.to_thread(coordinator_cli, "unban", xid[:10], "--data-dir", data_dir)
        assert done.returncode == 0 and f"unbanned {xid} (forgot 2 offense reports)" in done.stdout
        assert (await x.join("127.0.0.1:9999", {}))["state"] == "joining"
        assert (await a.status())["offenses"] == {"ban_after": 2, "peers": [], "bans": []}
    finally:
        for c in clients:
            await c.close()
        await coord.stop()
