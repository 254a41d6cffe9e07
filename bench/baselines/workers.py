"""One worker process per host, a two-line protocol with the parent, and the per-repeat summary.

Worker side (stdlib only, so it runs in any venv):
    go = announce({"port": ...})   # prints READY {json}, then blocks for the parent's go line
    ...                            # the measured work
    report({"times": [...]})       # prints RESULT {json}, then blocks until the parent closes stdin

The final wait keeps every worker alive until all have finished, so an early finisher never tears
down connections a slower peer still reads from; stdin closing (parent done or dead) ends it.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import Samples
from bench.links import HostProcess, Links, LinksError

ROOT = Path(__file__).resolve().parents[2]
_EXIT_TIMEOUT_S = 30.0


class BaselineError(RuntimeError):
    """An anchor run failed or produced wrong values; the message carries the worker's output."""


def announce(info: dict) -> dict:
    print("READY " + json.dumps(info), flush=True)
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("parent closed stdin before go")
    return json.loads(line)


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdin.read()


def run_workers(links: Links, argv: Callable[[int], list[str]], go: Callable[[list[dict]], dict],
                *, timeout: float, env: dict[str, str] | None = None) -> list[dict]:
    """Start ``argv(i)`` on every host, send ``go(ready_infos)`` to all once each printed READY,
    and return every worker's RESULT. Workers are killed by pid if anything fails or hangs."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    workers: list[HostProcess] = []
    try:
        for i in range(links.n):
            workers.append(links.start(i, argv(i), env=full_env))
        ready = [w.tagged("READY", timeout) for w in workers]
        message = go(ready)
        for w in workers:
            w.send(message)
        results = [w.tagged("RESULT", timeout) for w in workers]
    except LinksError as exc:
        for w in workers:
            w.close_stdin()
        failed = [f"worker {i} (exit {w.wait(_EXIT_TIMEOUT_S)}):\n{w.tail(12)}"
                  for i, w in enumerate(workers) if w.proc.poll() not in (None, 0)]
        for w in workers:
            w.wait(1.0)  # kills what still runs
        raise BaselineError(f"{exc}\n\n" + "\n\n".join(failed)) from exc
    for w in workers:
        w.close_stdin()
    codes = [w.wait(_EXIT_TIMEOUT_S) for w in workers]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        i, code = bad[0]
        raise BaselineError(f"worker {i} exited with {code}:\n{workers[i].tail()}")
    return results


def slowest_per_repeat(times_per_rank: Sequence[Sequence[float]]) -> dict:
    """A repeat lasts until the slowest rank has its result: per repeat the max over ranks, then
    median / min / max over repeats (seconds) with the raw samples (bench.common.Samples)."""
    samples = Samples([max(rank[k] for rank in times_per_rank) for k in range(len(times_per_rank[0]))])
    return samples.as_dict()
