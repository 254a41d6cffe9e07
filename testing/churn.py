"""Churn: a training run that keeps going while peers are SIGKILLed and new ones join.

A coordinator and up to ``max_peers`` `peer join --train RUN` processes (the ``micro`` preset,
a 2 s inner phase per outer step) on 127.0.0.1. For ``minutes`` from the first completed outer
step, at random intervals (``interval_s`` on average) a random peer is SIGKILLed or a new one
(fresh identity) is started; at least ``min_alive`` stay alive. The coordinator's per-step
reports are the oracle, read while the run goes on:

- progress: an outer step completes at least every ``stall_limit_s`` (60 s), else FAIL;
- agreement: every report of one step carries the same global-state hash, else FAIL;
- no state lost: the run never restarts from older state (a new generation), else FAIL;
- learning: the mean loss of the last quarter of the steps is below the first quarter's.

Recovery time of a fault: from the kill to the first step completed after it (reported by a
survivor); from a start to the newcomer's first reported step.

``run_churn`` is what tests/test_churn.py runs (short variant in `make test`) and what
bench/churn.py runs for 10 minutes and reports.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testing.procs import Procs
from testing.swarm import ReportWatch, Swarm, train_flags


@dataclass
class ChurnConfig:
    minutes: float = 10.0
    max_peers: int = 6
    min_alive: int = 2
    start_peers: int = 3
    interval_s: float = 20.0        # mean time between two faults (uniform 0.5x .. 1.5x)
    # Outer steps of a few seconds, so a joiner's snapshot fits in one step; with much shorter
    # steps joiners may never get in (bench/results/reliability.md, finding 1).
    inner_seconds: float = 2.0
    stall_limit_s: float = 60.0     # longest allowed time without a completed outer step
    first_step_limit_s: float = 180.0
    seed: int = 0
    poll_s: float = 1.0


@dataclass
class Fault:
    t: float                        # seconds since the run started
    kind: str                       # "kill" or "start"
    peer: str
    alive_after: int
    step_at: int                    # highest completed step when it happened
    recovery_s: float | None = None
    note: str = ""


@dataclass
class ChurnResult:
    config: dict
    duration_s: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    outer_steps: int = 0            # distinct steps completed
    last_step: int = 0
    max_step_gap_s: float = 0.0     # longest time between two completed steps
    max_step_gap: dict | None = None  # where it was: after which step, when (s since start)
    stalls: list[dict] = field(default_factory=list)   # gaps over stall_limit_s
    steps_checked: int = 0
    hash_disagreements: list[dict] = field(default_factory=list)
    run_restarts: list[dict] = field(default_factory=list)      # generation changes
    loss_first_quarter: float | None = None
    loss_last_quarter: float | None = None
    peers_started: int = 0
    peers_killed: int = 0
    unexpected_exits: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_recovery_s(self) -> float | None:
        done = [f.recovery_s for f in self.faults if f.recovery_s is not None]
        return max(done) if done else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_recovery_s"] = self.max_recovery_s
        d["passed"] = self.passed
        return d


def run_churn(cfg: ChurnConfig, work: Path, procs: Procs, log=print) -> ChurnResult:
    """Run the churn scenario; the caller owns ``procs`` (and cleans it up)."""
    rng = random.Random(cfg.seed)
    result = ChurnResult(config=asdict(cfg))
    t_start = time.time()
    swarm = Swarm(procs, work)
    swarm.start_coordinator()
    flags = train_flags(cfg.inner_seconds)
    for _ in range(cfg.start_peers):
        swarm.start_peer(flags)
    result.peers_started = cfg.start_peers
    watch = ReportWatch(swarm.url)
    pending: list[tuple[Fault, float, str | None]] = []   # fault, wall time, peer whose report counts
    # The churn period (cfg.minutes) starts with the first completed outer step: slow process
    # starts on a loaded machine must not eat into it.
    end = next_fault = math.inf
    while time.time() < end:
        time.sleep(cfg.poll_s)
        now = time.time()
        watch.poll()
        for peer, code in swarm.exited().items():
            result.unexpected_exits.append({"t": now - t_start, "peer": peer[:12], "code": code,
                                            "output": swarm.peers[peer].lines[-15:]})
            swarm.peers.pop(peer)
            result.failures.append(f"peer {peer[:12]} exited by itself (code {code})")
        last = watch.last_completion()
        if last is not None and end == math.inf:
            end = now + 60 * cfg.minutes
            next_fault = now + rng.uniform(0.5, 1.5) * cfg.interval_s
        if last is None:
            if now - t_start > cfg.first_step_limit_s:
                result.failures.append(f"no outer step within {cfg.first_step_limit_s:.0f}s of the start")
                break
        elif now - last > cfg.stall_limit_s:
            result.failures.append(f"no outer step completed for {now - last:.0f}s (after step {watch.last_step})")
            break
        for fault, t_wall, by in list(pending):
            done = watch.first_step_after(t_wall, fault.step_at, by)
            if done is not None:
                fault.recovery_s = round(done - t_wall, 2)
                pending.remove((fault, t_wall, by))
        # No fault in the last stretch: each one gets time to recover before the end.
        if now < next_fault or now > end - cfg.interval_s:
            continue
        next_fault = now + rng.uniform(0.5, 1.5) * cfg.interval_s
        alive = list(swarm.peers)
        kill = len(alive) > cfg.min_alive and (len(alive) >= cfg.max_peers or rng.random() < 0.5)
        if kill:
            victim = rng.choice(alive)
            swarm.kill_peer(victim)
            for entry in [e for e in pending if e[2] == victim]:  # killed before its first step
                entry[0].note = "killed before its first step"
                pending.remove(entry)
            result.peers_killed += 1
            fault = Fault(round(now - t_start, 1), "kill", victim[:12], len(swarm.peers), watch.last_step)
            pending.append((fault, time.time(), None))
        else:
            child = swarm.start_peer(flags)
            result.peers_started += 1
            pid = child.ready["peer_id"]
            fault = Fault(round(now - t_start, 1), "start", pid[:12], len(swarm.peers), watch.last_step)
            pending.append((fault, time.time(), pid))
        result.faults.append(fault)
        log(f"[{fault.t:6.1f}s] {fault.kind} {fault.peer}: {fault.alive_after} alive, step {fault.step_at}")
    time.sleep(cfg.poll_s)
    watch.poll()
    for fault, t_wall, by in pending:
        done = watch.first_step_after(t_wall, fault.step_at, by)
        fault.recovery_s = None if done is None else round(done - t_wall, 2)
        # A fault near the end may simply not have had its step yet; past the stall limit it
        # is a failure.
        if done is None and time.time() - t_wall > cfg.stall_limit_s:
            result.failures.append(f"no step completed after {fault.kind} {fault.peer} at {fault.t}s")
    result.duration_s = round(time.time() - t_start, 1)
    # (time a step completed, that step); the end of the run closes the last gap.
    done = sorted((t, s) for s, t in watch.completed_at.items()) + [(time.time(), None)]
    gaps = [{"gap_s": round(b - a, 2), "after_step": s, "at_s": round(a - t_start, 1)}
            for (a, s), (b, _) in zip(done, done[1:])]
    worst = max(gaps, key=lambda g: g["gap_s"], default=None)
    result.max_step_gap_s = worst["gap_s"] if worst else 0.0
    result.max_step_gap = worst
    result.stalls = [g for g in gaps if g["gap_s"] > cfg.stall_limit_s]
    result.outer_steps = len(watch.steps)
    result.last_step = watch.last_step
    result.steps_checked = sum(1 for rows in watch.steps.values() if len(rows) >= 2)
    result.hash_disagreements = [{"step": s, "hashes": h} for s, h in sorted(watch.disagreements.items())]
    result.run_restarts = watch.restarts
    if watch.restarts:
        result.failures.append(f"the run restarted from older state: {watch.restarts}")
    if result.hash_disagreements:
        result.failures.append(f"{len(result.hash_disagreements)} step(s) with disagreeing state hashes")
    losses = watch.losses()
    if len(losses) >= 8:
        q = len(losses) // 4
        result.loss_first_quarter = round(sum(losses[:q]) / q, 4)
        result.loss_last_quarter = round(sum(losses[-q:]) / q, 4)
        if not result.loss_last_quarter < result.loss_first_quarter:
            result.failures.append(f"loss did not fall: {result.loss_first_quarter} -> {result.loss_last_quarter}")
    else:
        result.failures.append(f"only {len(losses)} steps with a loss")
    return result
