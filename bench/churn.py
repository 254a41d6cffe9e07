"""Churn bench: the churn scenario of testing/churn.py (peers SIGKILLed and started while a run
trains; the oracles and recovery times are described there), run for 10 minutes and reported.

    python bench/churn.py                 # 10 minutes -> bench/results/churn.{json,md}
    python bench/churn.py --minutes 2 --out /tmp/churn

The scenario itself (``run_churn``, testing/churn.py) is also what tests/test_churn.py runs
(short variant in `make test`).
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_results  # noqa: E402
from testing.churn import ChurnConfig, ChurnResult, run_churn  # noqa: E402
from testing.procs import Procs  # noqa: E402
from testing.swarm import train_flags  # noqa: E402


def save_logs(procs: Procs, folder: Path) -> None:
    """Every child's output (coordinator first, then peers in start order) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, child in enumerate(procs.children):
        name = child.ready.get("peer_id", "coordinator" if i == 0 else "unready")[:12]
        (folder / f"{i:02d}-{name}.log").write_text("\n".join(child.lines) + "\n")


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
