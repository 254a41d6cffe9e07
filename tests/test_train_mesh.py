"""`peer join --train RUN`: DiLoCo over the mesh, as real processes over real TCP on 127.0.0.1.

A coordinator and peers (the `train` role plug-in) train the `micro` preset on a small generated
corpus. The coordinator's reports are the oracle: every participant of a step must report the
same global-state hash.
"""
from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import pytest

from testing.api import signed_get
from tests.harness import Child, Procs, wait_until

TOKEN = "train-mesh-token-fb45005b29acbab65a51e7fdf67159136b405576"
RUN = "mesh"
INTERVAL, TIMEOUT = 0.5, 3.0
PEER_CMD = [sys.executable, "-m", "peer.cli"]
TRAIN_FLAGS = ["--preset", "micro", "--inner-steps", "5", "--seq-len", "32", "--batch-size", "4",
               "--sync-timeout", "60"]


def corpus(tmp_path: Path) -> Path:
    """~120 KB of deterministic pseudo-text (words drawn with a fixed seed)."""
    rng = random.Random(7)
    words = ("the of and to in peer mesh train model outer inner step average ring chunk hash "
             "state token shard loss gradient momentum codec quantize join leave checkpoint").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(1500)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_coordinator(procs: Procs, data_dir: Path) -> Child:
    return procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                        "--data-dir", str(data_dir), "--token", TOKEN,
                        "--heartbeat-interval", str(INTERVAL), "--peer-timeout", str(TIMEOUT))


def start_trainers(procs: Procs, url: str, keys: list[Path], data: Path, *flags: str) -> list[Child]:
    """Start one peer per key at once (their imports overlap), then wait for every READY."""
    children = [procs.spawn([*PEER_CMD, "join", "--coordinator", url, "--token", TOKEN,
                             "--listen", "127.0.0.1:0", "--key", str(key), "--device", "cpu",
                             "--ping-interval", "0.5", "--train", RUN, "--data", str(data),
                             *flags], wait_ready=False) for key in keys]
    for child in children:
        wait_until(lambda: child.ready or child.proc.poll() is not None, 180, "READY")
        assert child.ready, "\n".join(child.lines[-40:])
    return children


def api(url: str, path: str) -> dict:
    return signed_get(url, path, token=TOKEN)


def reports_by_step(url: str) -> dict[int, dict[str, dict]]:
    out: dict[int, dict[str, dict]] = {}
    for r in api(url, f"/api/runs/{RUN}/reports")["reports"]:
        out.setdefault(r["step"], {})[r["peer_id"]] = r
    return out


def steps_reported_by(url: str, peers: set[str], n: int):
    """Steps (sorted) that all of ``peers`` reported, once there are at least ``n`` of them."""
    steps = sorted(s for s, rows in reports_by_step(url).items() if peers <= set(rows))
    return steps if len(steps) >= n else None


def assert_hashes_agree(url: str, steps) -> None:
    by_step = reports_by_step(url)
    for s in steps:
        hashes = {r["state_hash"] for r in by_step[s].values()}
        assert len(hashes) == 1, f"step {s}: peers disagree on the global state: {by_step[s]}"


def test_three_peers_train_with_agreeing_state_hashes(procs, tmp_path):
    t0 = time.monotonic()
    url = start_coordinator(procs, tmp_path / "coord").ready["url"]
    data = corpus(tmp_path)
    peers = start_trainers(procs, url, [tmp_path / f"p{i}.key" for i in range(3)], data,
                           *TRAIN_FLAGS, "--outer-steps", "4", "--min-peers", "3", "--zstd")
    # A peer asking for another H than the run's is refused before it starts (exit 2).
    odd = procs.spawn([*PEER_CMD, "join", "--coordinator", url, "--token", TOKEN, "--listen",
                       "127.0.0.1:0", "--key", str(tmp_path / "odd.key"), "--device", "cpu",
                       "--train", RUN, "--inner-steps", "7"], wait_ready=False)
    ids = {p.ready["peer_id"] for p in peers}
    for p in peers:
        p.wait_for_line(f"train {RUN}: done at step 4", timeout=120)
    by_step = reports_by_step(url)
    assert sorted(by_step) == [1, 2, 3, 4]
    for step, rows in by_step.items():
        assert set(rows) == ids, f"step {step} lacks reports: {sorted(rows)}"
        assert len({r["state_hash"] for r in rows.values()}) == 1, f"step {step}: hashes differ"
        for r in rows.values():
            assert r["participants"] == 3 and r["bytes_sent"] > 0 and r["bytes_received"] > 0
            assert r["inner_steps"] == 5 and r["tokens"] == 5 * 4 * 32 and r["loss"] > 0
    first = sum(r["loss"] for r in by_step[1].values())
    last = sum(r["loss"] for r in by_step[4].values())
    assert last < first, f"loss did not go down: {first / 3:.3f} -> {last / 3:.3f}"
    # The per-step progress line is printed locally too.
    assert peers[0].wait_for_line(f"train {RUN}: step 4 loss", timeout=5)
    summary = api(url, f"/api/runs/{RUN}")
    assert summary["step"] == 4 and summary["config"]["inner_steps"] == 5 and summary["config"]["zstd"]
    assert all(s["agree"] for s in summary["steps"])
    assert odd.wait(timeout=60) == 2
    assert odd.wait_for_line("inner_steps: run has 5, you asked 7", timeout=5)
    print(f"3 peers x 4 outer steps in {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_joiner_catches_up_and_run_survives_sigkill(procs, tmp_path):
    url = start_coordinator(procs, tmp_path / "coord").ready["url"]
    data = corpus(tmp_path)
    first = start_trainers(procs, url, [tmp_path / f"p{i}.key" for i in range(2)], data,
                           *TRAIN_FLAGS)
    first_ids = {p.ready["peer_id"] for p in first}
    wait_until(lambda: steps_reported_by(url, first_ids, 2), 120, "two steps by the first peers")

    joiner, = start_trainers(procs, url, [tmp_path / "p2.key"], data)  # no flags: the run's config
    jid = joiner.ready["peer_id"]
    line = joiner.wait_for_line(f"train {RUN}: state from peer", timeout=60)
    joined_at = int(line.split("step ")[1].split()[0])
    everyone = first_ids | {jid}
    steps = wait_until(lambda: steps_reported_by(url, everyone, 3), 120,
                       "three steps reported by all three peers")
    # Its first step (zero contribution) already ends in the same state as the others'. If they
    # had begun step joined_at + 1 without it, it was told so, synced again and joined the next.
    synced = [int(x.split("step ")[1].split()[0]) for x in list(joiner.lines) if "state from peer" in x]
    first_own = min(s for s, rows in reports_by_step(url).items() if jid in rows)
    assert synced[0] == joined_at and first_own == steps[0]
    assert first_own - 1 == max(s for s in synced if s < first_own), (synced, first_own)
    assert_hashes_agree(url, steps)
    by_step = reports_by_step(url)
    later = by_step[steps[-1]][jid]
    assert later["participants"] == 3 and later["inner_steps"] > 0 and later["bytes_sent"] > 0

    victim, survivors = first[0], [first[1], joiner]
    survivor_ids = {p.ready["peer_id"] for p in survivors}
    # Kill it while it is in a rendezvous / all-reduce (the outer step is most of the step time
    # here; whatever phase it dies in, the others must go on without it).
    victim.wait_for_line(f"train {RUN}: step {steps[-1] + 1} loss", timeout=60)
    victim.kill(signal.SIGKILL)
    killed_after = steps[-1] + 1
    after = wait_until(
        lambda: [s for s in (steps_reported_by(url, survivor_ids, 1) or []) if s > killed_after + 1]
        or None, 120, "survivors to complete two steps after the kill")
    assert_hashes_agree(url, sorted(s for s in reports_by_step(url) if s > killed_after))
    rows = reports_by_step(url)[after[0]]
    assert set(rows) == survivor_ids and all(r["participants"] == 2 for r in rows.values())


@pytest.mark.slow
def test_whole_run_resumes_from_checkpoint(procs, tmp_path):
    url = start_coordinator(procs, tmp_path / "coord").ready["url"]
    data = corpus(tmp_path)
    # --min-peers 2 (kept in the run config): after the restart, the first rendezvous waits for
    # both fresh peers, so both start from the checkpoint rather than one from the other.
    peers = start_trainers(procs, url, [tmp_path / f"p{i}.key" for i in range(2)], data,
                           *TRAIN_FLAGS, "--checkpoint-every", "2", "--min-peers", "2")
    wait_until(lambda: (api(url, f"/api/runs/{RUN}/checkpoints")["latest"] or 0) >= 2, 120,
               "a checkpoint at step 2")
    for p in peers:
        p.kill(signal.SIGKILL)
    for p in peers:
        p.wait(timeout=20)
    manifest = api(url, f"/api/runs/{RUN}/checkpoints/latest")
    saved_step, saved_hash = manifest["step"], manifest["meta"]["global_state_hash"]
    assert manifest["meta"]["outer_step"] == saved_step

    fresh = start_trainers(procs, url, [tmp_path / f"q{i}.key" for i in range(2)], data)
    fresh_ids = {p.ready["peer_id"] for p in fresh}
    for p in fresh:
        line = p.wait_for_line(f"train {RUN}: state from checkpoint", timeout=60)
        assert f"step {saved_step} hash {saved_hash}" in line, line
    steps = wait_until(lambda: steps_reported_by(url, fresh_ids, 2), 120,
                       "two steps after the restart")
    assert steps[0] == saved_step + 1
    assert_hashes_agree(url, steps)
