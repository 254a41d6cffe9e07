"""Training goes on while the coordinator is down (docs/architecture.md §Coordinator outage; diloco/role.py point 4).

Real `peer join --train` processes and a real coordinator on 127.0.0.1. The coordinator is
SIGKILLed mid-run: the peers must keep completing outer steps WITHOUT it (their own step log
lines, read while it is down, show the step numbers advancing, all peers with the same global
state hash), queue their reports, keep retrying the checkpoint that falls due meanwhile, and,
once it is restarted on the same data dir and port, hand it all over: the run's step counter
has advanced, the offline steps' reports are recorded (marked ``offline``) and agree, the
checkpoint is there, and the coordinator leads the next steps over the same three peers with
no late/resync and no run restart.
"""
from __future__ import annotations

import re
import signal
import time

import pytest

from testing.swarm import RUN, ReportWatch, Swarm, api, train_flags
from tests.test_churn import live_peers, status_code, steps_by_all, wait_until

CHECKPOINT_EVERY = 4
MIN_DOWN_S = 10.0  # > 3 peer timeouts (3 s): the peers have long stopped hearing from it
# "... INFO lowband.train: train churn: step 7 loss 2.1 | ... | 3 peers | outer 0.31s | hash
# 0123456789abcdef | offline" (a log line: searched, after the log prefix)
STEP_LINE = re.compile(rf"train {RUN}: step (\d+) loss \S+ \|.*\| (\d+) peers \|.*\| hash "
                       r"([0-9a-f]{16})( \| offline)?$")


def logged_steps(child) -> dict[int, tuple[str, int, bool]]:
    """step -> (hash prefix, participants, offline) from a peer's own log lines."""
    out = {}
    for line in list(child.lines):
        m = STEP_LINE.search(line)
        if m:
            out[int(m[1])] = (m[3], int(m[2]), m[4] is not None)
    return out


def offline_steps(child) -> list[int]:
    return sorted(s for s, (_, _, offline) in logged_steps(child).items() if offline)


def led_steps(watch: ReportWatch, peers: set[str], after: int) -> list[int]:
    """Steps after ``after`` the coordinator led, reported by all ``peers``, over all of them."""
    return [s for s in steps_by_all(watch, peers, after)
            if all(not r.get("offline") and r["participants"] == len(peers)
                   for r in watch.steps[s].values())]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_outer_steps_continue_while_the_coordinator_is_down(procs, tmp_path):
    try:
        check_outage(procs, tmp_path)
    except AssertionError:
        for i, child in enumerate(procs.children):  # what each process said, for the post-mortem
            print(f"--- process {i} ---", *child.lines[-80:], sep="\n")
        raise


def check_outage(procs, tmp_path) -> None:
    swarm = Swarm(procs, tmp_path)
    swarm.start_coordinator()
    for _ in range(3):
        swarm.start_peer([*train_flags(inner_seconds=1.0), "--checkpoint-every",
                          str(CHECKPOINT_EVERY)])
    ids, url = set(swarm.peers), swarm.url
    peers = list(swarm.peers.values())
    watch = ReportWatch(url)
    wait_until(lambda: len(steps_by_all(watch, ids)) >= 3, 150, "three steps by all peers")
    before = api(url, f"/api/runs/{RUN}")

    swarm.coordinator.kill(signal.SIGKILL)
    swarm.coordinator.wait(timeout=20)
    t_kill = time.monotonic()
    last_led = max(max(logged_steps(c)) for c in peers)
    # Enough offline steps that one of them is due for a checkpoint.
    wait_until(lambda: all(len(offline_steps(c)) >= CHECKPOINT_EVERY + 1 for c in peers)
               and time.monotonic() - t_kill >= MIN_DOWN_S, 90,
               f"{CHECKPOINT_EVERY + 1} offline steps on every peer")
    down_s = time.monotonic() - t_kill
    assert status_code(url) == 0, "the coordinator is really down"
    assert not swarm.exited(), f"peers died while the coordinator was down: {swarm.exited()}"

    # While it is down: the steps advanced, every peer took the same steps with the same states.
    logs = [logged_steps(c) for c in peers]
    offline = sorted(set.intersection(*(set(offline_steps(c)) for c in peers)))
    assert len(offline) >= CHECKPOINT_EVERY, logs
    assert offline[0] in (last_led + 1, last_led + 2), (last_led, offline)
    assert all(set(range(last_led, offline[-1] + 1)) <= set(log) for log in logs), "step missing"
    for s in offline:
        assert len({log[s][0] for log in logs}) == 1, f"step {s}: {[log[s] for log in logs]}"
        assert all(log[s][1] == 3 for log in logs), f"step {s} not over all three peers"

    t_restart, t_restart_wall = time.monotonic(), time.time()
    swarm.start_coordinator()
    wait_until(lambda: live_peers(url) >= ids, 60, "all peers to re-register")
    rejoin_s = time.monotonic() - t_restart
    # It leads again: steps after the outage, reported by all three peers, not offline.
    wait_until(lambda: len(led_steps(watch, ids, offline[-1])) >= 2, 90,
               "two coordinator-led steps by all peers after the restart")
    led = led_steps(watch, ids, offline[-1])
    back_s = watch.completed_at[led[0]] - t_restart_wall

    run = api(url, f"/api/runs/{RUN}")
    assert run["generation"] == before["generation"], "the run must not restart from a checkpoint"
    assert run["step"] >= led[-1] > offline[-1]
    assert all(run["data_positions"][k] >= v for k, v in before["data_positions"].items())
    slots = {m["peer_id"]: str(m["slot"]) for m in run["members"]}
    assert all(run["data_positions"][slots[p]] >= watch.steps[offline[-1]][p]["data_position"]
               for p in ids), "the data positions reached offline were not recorded"
    for s in offline:  # the queued reports arrived, marked offline, dated back, in agreement
        rows = watch.steps[s]
        assert set(rows) == ids, f"step {s}: reports from {sorted(p[:8] for p in rows)}"
        assert all(r.get("offline") == 1 for r in rows.values())
        assert watch.completed_at[s] < t_restart_wall
        assert len({r["state_hash"][:16] for r in rows.values()}) == 1
        assert {r["state_hash"][:16] for r in rows.values()} == {logs[0][s][0]}
    assert not watch.disagreements, watch.disagreements
    assert not watch.restarts, watch.restarts
    # The checkpoint of the last offline step due for one was kept for the coordinator (earlier
    # ones are superseded by it) and has the state the peers logged.
    taken_offline = offline_steps(peers[0])
    due = max(s for s in taken_offline if s % CHECKPOINT_EVERY == 0)
    wait_until(lambda: due in api(url, f"/api/runs/{RUN}/checkpoints")["steps"], 60,
               f"the checkpoint of offline step {due}")
    manifest = api(url, f"/api/runs/{RUN}/checkpoints/{due}")
    assert manifest["meta"]["global_state_hash"][:16] == logged_steps(peers[0])[due][0]
    resyncs = [line for c in peers for line in c.lines if "resync" in line]  # late or outvoted
    assert not resyncs, resyncs
    assert not swarm.exited()
    print(f"coordinator down {down_s:.1f}s (then restarted); steps {offline[0]}-{offline[-1]} "
          f"seen offline on all 3 peers while it was down ({len(taken_offline)} offline in "
          f"all), last coordinator-led step before: {last_led}; peers "
          f"re-registered {rejoin_s:.1f}s and the coordinator led step {led[0]} "
          f"{back_s:.1f}s after the restart; checkpoint {due} uploaded after it")
