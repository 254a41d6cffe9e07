"""A training swarm as real processes: a coordinator and `peer join --train RUN` peers on
127.0.0.1, and ``ReportWatch``, the oracle that follows the run's per-step reports (completion
times, global-state hash agreement, generation changes, losses). Used by the churn scenario
(testing/churn.py), tests/test_coordinator_outage.py and bench/churn.py.
"""
from __future__ import annotations

import random
import signal
import sys
from pathlib import Path

from testing.api import signed_get
from testing.procs import Child, Procs, free_port

TOKEN = "churn-token-7ae1e2ad87aaef7bd66b92892db3ddcafe16429f"
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


def corpus(path: Path) -> Path:
    """~120 KB of deterministic pseudo-text (words drawn with a fixed seed)."""
    rng = random.Random(7)
    words = ("the of and to in peer mesh train model outer inner step average ring chunk hash "
             "state token shard loss gradient momentum codec quantize join leave checkpoint").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(1500)]
    path.write_text("\n".join(lines) + "\n")
    return path


def api(url: str, path: str, timeout: float = 10.0) -> dict:
    """A signed GET by an identity admitted with the swarm token."""
    return signed_get(url, path, token=TOKEN, timeout=timeout)


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
