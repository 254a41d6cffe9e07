"""Silent participants (coordinator/benching.py): keys that take a seat in a rendezvous window
and never send are benched after one failed step, fresh keys enter behind a growing newcomer
gate, and an honest peer that crashed mid-average gets back in after one short bench.

Coordinator tests run the real app over real HTTP (fake clock for window deadlines, as in
tests/test_votes.py); the last test is attack 19 against a live open swarm (real coordinator and
``peer join --train`` processes), measuring the honest outer step time before, during and after.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.benching import bench_windows, gate_windows, lottery
from tests.test_runs_api import Coord, start
from tests.test_votes import answers, arrive, credit_of, h


@pytest.fixture
async def coord(tmp_path):
    c = await start(tmp_path / "coord")
    yield c
    await c.stop()


async def report(client, step: int, averaged: list[str]) -> dict:
    return await client._post("/runs/r/report", {"step": step, "state_hash": h(step),
                                                 "metrics": {}, "averaged": sorted(averaged)})


async def window(coord: Coord, honest, silent, step: int) -> tuple[list[str], list[dict]]:
    """One outer step: ``silent`` arrive first with the agreed base hash, then ``honest``; the
    honest peers average among themselves and report that. -> (participants, silent answers)."""
    quiet = await arrive(coord, silent, step, h(step - 1)) if silent else []
    tasks = await arrive(coord, honest, step, h(step - 1))
    got = await answers(coord, tasks, [*honest, *silent])
    bad = await answers(coord, quiet, []) if quiet else []
    ids = [c.identity.peer_id for c in honest]
    assert all(a["participant"] for a in got), got
    for c in honest:
        await report(c, step, ids)
    return got[0]["participants"], bad


@pytest.mark.fast
def test_backoff_schedules():
    assert [bench_windows(k) for k in range(1, 9)] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert [gate_windows(f) for f in range(1, 8)] == [2, 4, 8, 16, 32, 64, 64]
    peers = [f"{i:040x}" for i in range(10)]
    order = lottery("r.g1.s5", peers)
    assert order == lottery("r.g1.s5", reversed(peers)) != lottery("r.g1.s6", peers)


async def test_a_silent_participant_is_benched_after_one_failed_step(coord):
    honest = [(await coord.peer())[0] for _ in range(3)]
    silent = None
    try:
        for step in (1, 2, 3):
            await window(coord, honest, [], step)
        silent = (await coord.peer())[0]  # (a member before window 1 would be waited for)
        sid = silent.identity.peer_id
        # Step 4: the fresh key takes a seat (no newcomer failed yet) and sends nothing.
        ring, (ans,) = await window(coord, honest, [silent], 4)
        assert sid in ring and ans["participant"]
        # Step 5: the reports of step 4 say it did not average: benched, no credit.
        ring, (ans,) = await window(coord, honest, [silent], 5)
        assert sid not in ring and len(ring) == 3
        assert not ans["participant"] and ans["resync"] and ans["bench"]["until_step"] == 5
        assert await credit_of(coord, sid) == 0
        # Step 6: its own bench is over, but a newcomer failed: the gate is closed (2 windows).
        ring, (ans,) = await window(coord, honest, [silent], 6)
        assert sid not in ring and ans["bench"]["newcomers_closed_until"] == 6
        # Step 7: the gate lets one newcomer in; it fails again: two strikes, two windows out.
        ring, _ = await window(coord, honest, [silent], 7)
        assert sid in ring
        ring, (ans,) = await window(coord, honest, [silent], 8)
        assert sid not in ring and ans["bench"] == {"strikes": 2, "until_step": 9,
                                                    "newcomers_closed_until": 11}
        assert await credit_of(coord, sid) == 0
        assert [await credit_of(coord, c.identity.peer_id) for c in honest] == [7, 7, 7]
        info = await honest[0].run_info("r")
        assert [s["participants"] for s in info["steps"][:5]] == [3, 4, 3, 3, 4]
    finally:
        for c in (*honest, *([silent] if silent else [])):
            await c.close()


async def test_a_stream_of_fresh_silent_keys_costs_a_bounded_fraction_of_steps(coord):
    honest = [(await coord.peer())[0] for _ in range(3)]
    fresh = []
    try:
        for step in (1, 2):
            await window(coord, honest, [], step)
        seated, unused = [], []
        for step in range(3, 3 + 24):  # two never-seated keys at every window
            while len(unused) < 2:  # (admissions per address are rate-limited: reuse the unseated)
                unused.append((await coord.peer())[0])
                fresh.append(unused[-1])
            new, unused = unused[:2], unused[2:]
            ring, _ = await window(coord, honest, new, step)
            seated.append(len(ring) - 3)
            for c in new:
                if c.identity.peer_id in ring:  # used: it leaves (windows stop waiting for it)
                    await c.leave_run("r")
                else:
                    unused.append(c)
        slow = [i + 1 for i, n in enumerate(seated) if n]
        # Gate openings at windows 1, 4, 9, 18 of the attack: 4 slow steps in 24, one key each
        # after the first (both entered before any newcomer had failed).
        assert slow == [1, 4, 9, 18], seated
        assert seated[0] == 2 and all(n <= 1 for n in seated[1:])
    finally:
        for c in (*honest, *fresh):
            await c.close()


async def test_an_honest_peer_that_restarts_gets_back_in(coord):
    a, b, c = [(await coord.peer())[0] for _ in range(3)]
    cid = c.identity.peer_id
    try:
        for step in (1, 2, 3):
            await window(coord, [a, b, c], [], step)
        # Step 4: c crashes mid-average; a and b finish over the survivors and say so.
        tasks = await arrive(coord, [a, b, c], 4, h(3))
        assert all(x["participant"] for x in await answers(coord, tasks, [a, b, c]))
        for p in (a, b):
            await report(p, 4, [a.identity.peer_id, b.identity.peer_id])
        await c.join("127.0.0.1:9001", {"roles": ["train"]})  # restarted: a new incarnation
        ring, (ans,) = await window(coord, [a, b], [c], 5)
        assert cid not in ring and ans["bench"]["until_step"] == 5  # one short bench
        ring, (ans,) = await window(coord, [a, b], [c], 6)
        assert cid in ring and ans["participant"]  # a veteran: no newcomer gate for it
        for p in (a, b, c):
            await report(p, 6, [a.identity.peer_id, b.identity.peer_id, cid])
        ring, _ = await window(coord, [a, b, c], [], 7)
        assert cid in ring
        # A flaky-once peer does not stay on probation: its averaged step took the strike back.
        strikes = await coord.store.run(lambda conn: conn.execute(
            "SELECT strikes FROM run_standing WHERE run = 'r' AND peer_id = ?",
            (cid,)).fetchone()[0])
        assert strikes == 0
    finally:
        for p in (a, b, c):
            await p.close()


@pytest.mark.parametrize("averaged, match", [
    ("x", "list of 1"), ([], "list of 1"), (["nothex"], "40 lowercase hex"),
    (["a" * 40], "the reporter among them"), (["a" * 40] * 2, "distinct"),
])
async def test_malformed_averaged_lists_are_refused(coord, averaged, match):
    client, _ = await coord.peer()
    try:
        status, body = await coord.raw("POST", "/api/runs/r/report", json={
            "step": 1, "state_hash": h(1), "averaged": averaged}, identity=client.identity)
        assert status == 400 and match in body["message"], body
    finally:
        await client.close()


@pytest.mark.slow
def test_silent_keys_cost_one_slow_step_against_a_live_swarm(procs, tmp_path):
    """Attack 19 against real processes: honest outer step time before, during (2 silent keys
    at every window) and after; the silent seats stay within the gate's openings."""
    from testing.attacks import RUN, LiveSwarm, run_attack, silent_participants

    swarm = LiveSwarm(procs, tmp_path)
    target = swarm.start(3)
    swarm.wait_training(target, steps=2)

    def step_time(seconds: float) -> float:
        s0, t0 = int(target.api.get(f"/runs/{RUN}")["step"]), time.monotonic()
        time.sleep(seconds)
        return (time.monotonic() - t0) / max(1, int(target.api.get(f"/runs/{RUN}")["step"]) - s0)

    before = step_time(4.0)
    result = asyncio.run(run_attack(silent_participants, target, False, timeout=240))
    after = step_time(4.0)
    d = result["detail"]
    print(f"\nouter step before {before:.2f}s, during {d['step_s_with_them']:.2f}s, after "
          f"{after:.2f}s; seated {d['participants_per_window']}; per window {d['window_s']}")
    assert result["defended"], result
    assert d["participants_per_window"][0] >= 1  # the attack did take a seat once
    assert after < 3 * max(before, 0.5)
