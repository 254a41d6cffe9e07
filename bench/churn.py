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

    python bench/churn.py                 # 10 minutes -> bench/results/churn.{json,md}
    python bench/churn.py --minutes 2 --out /tmp/churn

``run_churn`` is also what tests/test_churn.py runs (short variant in `make test`).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_results  # noqa: E402
from tests.harness import Child, Procs, free_port  # noqa: E402

TOKEN = "churn-token"
RUN = "churn"
PEER_CMD = [sys.executable, "-m", "peer"]
# Fast failure detection: a SIGKILLed peer is suspect after 1.5 s and dead after 3 s.
COORDINATOR_FLAGS = ["--heartbeat-interval", "0.5", "--peer-timeout", "3"]
TRAIN_FLAGS = ["--preset", "micro", "--seq-len", "32", "--batch-size", "4", "--sync-timeout", "20",
               "--checkpoint-every", "5"]


def train_flags(inner_seconds: float) -> list[str]:
    """Run flags; the inner phase is a wall-clock budget (0: H = 5 steps, as fast as it goes)."""
    inner = ["--inner-seconds", str(inner_seconds)] if inner_seconds else ["--inner-steps", "5"]
    return [*TRAIN_FLAGS, *inner]


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


def corpus(path: Path) -> Path:
    """~120 KB of deterministic pseudo-text (words drawn with a fixed seed)."""
    rng = random.Random(7)
    words = ("the of and to in peer mesh train model outer inner step average ring chunk hash "
             "state token shard loss gradient momentum codec quantize join leave checkpoint").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(1500)]
    path.write_text("\n".join(lines) + "\n")
    return path


def api(url: str, path: str, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Swarm:
    """The coordinator and the training peers of one run, as real processes."""

    def __init__(self, procs: Procs, work: Path, *, port: int | None = None) -> None:
        self.procs, self.work = procs, work
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = corpus(work / "corpus.txt")
        self.coordinator: Child | None = None
        self.peers: dict[str, Child] = {}     # live peers by peer id
        self._keys = 0

    def start_coordinator(self) -> Child:
        self.coordinator = self.procs.python(
            "-m", "coordinator", "start", "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.work / "coordinator"), "--token", TOKEN, *COORDINATOR_FLAGS)
        return self.coordinator

    def start_peer(self, flags: list[str]) -> Child:
        self._keys += 1
        child = self.procs.spawn(
            [*PEER_CMD, "join", "--coordinator", self.url, "--token", TOKEN, "--listen", "127.0.0.1:0",
             "--key", str(self.work / f"peer{self._keys}.key"), "--device", "cpu", "--ping-interval", "0.5",
             "--train", RUN, "--data", str(self.data), *flags], ready_timeout=120)
        self.peers[child.ready["peer_id"]] = child
        return child

    def kill_peer(self, peer_id: str) -> None:
        child = self.peers.pop(peer_id)
        child.kill(signal.SIGKILL)
        child.wait(timeout=20)

    def exited(self) -> dict[str, int]:
        """Peers that died without being killed (their exit codes)."""
        return {p: c.proc.returncode for p, c in self.peers.items() if c.proc.poll() is not None}


class ReportWatch:
    """Follows ``/api/runs/RUN/reports``: step completion times, hash agreement, losses."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.generation: int | None = None
        self.steps: dict[int, dict[str, dict]] = {}   # step -> peer id -> report
        self.completed_at: dict[int, float] = {}      # step -> wall time of its first report
        self.disagreements: dict[int, dict] = {}
        self.restarts: list[dict] = []                # generation changes (state lost)

    def poll(self) -> None:
        since = max(0, max(self.steps, default=0) - 5)  # late reports of recent steps still count
        answer = api(self.url, f"/api/runs/{RUN}/reports?since={since}")
        if self.generation is not None and answer["generation"] != self.generation:
            # Nobody holding the current state was left: the run restarted from older state.
            self.restarts.append({"from": self.generation, "to": answer["generation"],
                                  "after_step": self.last_step})
        self.generation = answer["generation"]
        for r in answer["reports"]:
            rows = self.steps.setdefault(r["step"], {})
            rows[r["peer_id"]] = r
            self.completed_at[r["step"]] = min(self.completed_at.get(r["step"], r["ts"]), r["ts"])
            hashes = {row["state_hash"] for row in rows.values()}
            if len(hashes) > 1:
                self.disagreements[r["step"]] = {p[:12]: row["state_hash"][:16] for p, row in rows.items()}

    @property
    def last_step(self) -> int:
        return max(self.steps, default=0)

    def last_completion(self) -> float | None:
        return max(self.completed_at.values(), default=None)

    def first_step_after(self, t: float, step: int, by: str | None = None) -> float | None:
        """Wall time of the first report after ``t`` of a step after ``step`` (by peer ``by``
        if given)."""
        times = [r["ts"] for s, rows in self.steps.items() if s > step for p, r in rows.items()
                 if r["ts"] > t and (by is None or p == by)]
        return min(times, default=None)

    def losses(self) -> list[float]:
        out = []
        for step in sorted(self.steps):
            vals = [r["loss"] for r in self.steps[step].values() if isinstance(r.get("loss"), (int, float))]
            if vals:
                out.append(sum(vals) / len(vals))
        return out


def save_logs(procs: Procs, folder: Path) -> None:
    """Every child's output (coordinator first, then peers in start order) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, child in enumerate(procs.children):
        name = child.ready.get("peer_id", "coordinator" if i == 0 else "unready")[:12]
        (folder / f"{i:02d}-{name}.log").write_text("\n".join(child.lines) + "\n")


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


def write_report(result: ChurnResult, out_dir: Path, command: str) -> tuple[Path, Path]:
    cfg = result.config
    summary = [{"minutes": cfg["minutes"], "peers (max / min alive)": f"{cfg['max_peers']} / {cfg['min_alive']}",
                "faults": len(result.faults), "kills": result.peers_killed, "starts": result.peers_started,
                "outer steps": result.outer_steps, "steps checked (≥2 reports)": result.steps_checked,
                "hash disagreements": len(result.hash_disagreements),
                "max step gap s": result.max_step_gap_s, "stalls > 60 s": len(result.stalls),
                "max recovery s": result.max_recovery_s,
                "loss first → last quarter": f"{result.loss_first_quarter} → {result.loss_last_quarter}",
                "result": "pass" if result.passed else "FAIL"}]
    faults = [asdict(f) for f in result.faults]
    notes = [f"command: {command}",
             "recovery: kill -> first step reported by a survivor after it; start -> the newcomer's first report",
             "peers: `peer join --train churn` with " + " ".join(train_flags(cfg["inner_seconds"])),
             *[f"FAILURE: {f}" for f in result.failures]]
    return write_results("churn", result.to_dict(), {"Summary": summary, "Faults": faults}, notes,
                         results_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-peers", type=int, default=6)
    p.add_argument("--interval", type=float, default=20.0, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner-seconds", type=float, default=2.0,
                   help="wall-clock inner phase per outer step (0: 5 inner steps, as fast as it goes)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for churn.json / churn.md")
    p.add_argument("--logs", type=Path, help="keep every process's output in this directory")
    args = p.parse_args(argv)
    cfg = ChurnConfig(minutes=args.minutes, max_peers=args.max_peers, interval_s=args.interval, seed=args.seed,
                      inner_seconds=args.inner_seconds)
    # SIGTERM unwinds like Ctrl-C, so the finally below still kills every child it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="lowband-churn-", ignore_cleanup_errors=True) as tmp:
        procs = Procs()
        try:
            result = run_churn(cfg, Path(tmp), procs)
        finally:
            procs.cleanup()
            if args.logs:
                save_logs(procs, args.logs)
    json_path, md_path = write_report(result, args.out, "python bench/churn.py " + " ".join(argv or sys.argv[1:]))
    print(f"churn: {'pass' if result.passed else 'FAIL'}; {len(result.faults)} faults, {result.outer_steps} steps, "
          f"{len(result.hash_disagreements)} disagreements, max gap {result.max_step_gap_s}s, "
          f"max recovery {result.max_recovery_s}s -> {json_path}, {md_path}")
    for f in result.failures:
        print("FAILURE:", f)
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
