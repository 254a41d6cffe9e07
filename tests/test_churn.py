"""Training under churn and a coordinator crash: real `peer join --train` processes on 127.0.0.1.

- Short churn (testing/churn.py, 2 minutes): peers SIGKILLed and started every ~15 s; an outer step
  completes at least once a minute, every step's reports agree on the global-state hash, the
  loss falls. `python bench/churn.py` is the 10-minute variant.
- Coordinator crash: SIGKILL the coordinator mid-run and restart it on the same data dir and
  port; the peers live through it and re-register, training resumes, and membership, run state
  and checkpoints are all still there; the status page answers again.
"""
from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import pytest

from testing.churn import ChurnConfig, run_churn
from testing.swarm import RUN, ReportWatch, Swarm, api, train_flags
from tests.harness import wait_until


def steps_by_all(watch: ReportWatch, peers: set[str], after: int = 0) -> list[int]:
    watch.poll()
    return sorted(s for s, rows in watch.steps.items() if s > after and peers <= set(rows))


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_short_churn(procs, tmp_path):
    cfg = ChurnConfig(minutes=2.0, max_peers=4, min_alive=2, start_peers=3, interval_s=15.0, seed=1)
    result = run_churn(cfg, tmp_path, procs)
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "faults"}, indent=1, default=str))
    for f in result.faults:
        print(f)
    assert result.passed, result.failures
    assert result.peers_killed >= 1 and result.peers_started > cfg.start_peers, "both kinds of fault happened"
    assert not result.hash_disagreements and not result.stalls
    assert result.max_step_gap_s < cfg.stall_limit_s
    assert all(f.recovery_s is not None for f in result.faults[:-1] if not f.note)
    assert result.steps_checked >= 10


def live_peers(url: str) -> set[str]:
    return {p["peer_id"] for p in api(url, "/api/peers")["peers"] if p["state"] in ("joining", "active")}


def status_code(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_coordinator_sigkill_and_restart_loses_nothing(procs, tmp_path):
    swarm = Swarm(procs, tmp_path)
    swarm.start_coordinator()
    for _ in range(3):
        swarm.start_peer(train_flags(inner_seconds=1.0))
    ids = set(swarm.peers)
    url = swarm.url
    watch = ReportWatch(url)
    wait_until(lambda: (api(url, f"/api/runs/{RUN}/checkpoints")["latest"] or 0) >= 5
               and len(steps_by_all(watch, ids)) >= 5, 180, "five steps and a checkpoint")
    assert status_code(url) == 200

    before_peers = live_peers(url)
    before_run = api(url, f"/api/runs/{RUN}")
    before_ckpts = api(url, f"/api/runs/{RUN}/checkpoints")["steps"]
    before_manifests = {s: api(url, f"/api/runs/{RUN}/checkpoints/{s}") for s in before_ckpts}
    assert before_peers == ids

    swarm.coordinator.kill(signal.SIGKILL)
    swarm.coordinator.wait(timeout=20)
    step_at_kill = watch.last_step
    down_s = 8.0  # longer than the peer timeout (3 s): peers notice, keep going, retry
    time.sleep(down_s)
    assert status_code(url) == 0, "the coordinator is really down"
    assert not swarm.exited(), f"peers died while the coordinator was down: {swarm.exited()}"

    t_restart = time.monotonic()
    swarm.start_coordinator()
    assert status_code(url) == 200, "status page is back"
    # Every peer re-registers by itself (heartbeats retry).
    wait_until(lambda: live_peers(url) >= ids, 60, "all peers to re-register")
    rejoin_s = time.monotonic() - t_restart

    after_run = api(url, f"/api/runs/{RUN}")
    assert after_run["config"] == before_run["config"]
    assert after_run["generation"] == before_run["generation"], "the run must not restart from a checkpoint"
    assert after_run["step"] >= before_run["step"]
    assert {m["peer_id"] for m in after_run["members"]} >= {m["peer_id"] for m in before_run["members"]}
    assert set(after_run["data_positions"]) >= set(before_run["data_positions"])
    assert all(after_run["data_positions"][k] >= v for k, v in before_run["data_positions"].items())
    after_ckpts = api(url, f"/api/runs/{RUN}/checkpoints")["steps"]
    assert set(after_ckpts) >= set(before_ckpts)
    for s, manifest in before_manifests.items():
        assert api(url, f"/api/runs/{RUN}/checkpoints/{s}") == manifest, f"checkpoint {s} changed"

    # Training resumes over all three peers, still in agreement; the reports of the steps before
    # the crash are all still there.
    after = wait_until(lambda: [s for s in steps_by_all(watch, ids, step_at_kill) if s > step_at_kill + 2],
                       120, "three steps by all peers after the restart")
    assert all(s in watch.steps for s in range(1, step_at_kill + 1))
    assert not watch.disagreements, watch.disagreements
    assert not watch.restarts, watch.restarts
    assert all(r["participants"] == 3 for r in watch.steps[after[-1]].values())
    assert not swarm.exited()
    wait_until(lambda: (api(url, f"/api/runs/{RUN}/checkpoints")["latest"] or 0) > max(before_ckpts), 120,
               "a new checkpoint after the restart")
    print(f"coordinator down {down_s:.0f}s; peers re-registered {rejoin_s:.1f}s after the restart; "
          f"step {step_at_kill} at the kill, {after[-1]} now")
