"""`make bench`: run every benchmark in turn; each writes bench/results/<name>.json and .md."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ["codecs", "transport", "allreduce", "inference", "diloco", "coordinator", "fuzz", "attacks", "nat"]


def main() -> int:
    only = sys.argv[1:] or BENCHES
    failed = []
    for name in only:
        script = ROOT / "bench" / f"{name}.py"
        if not script.exists():
            print(f"== {name}: missing ({script}), skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        rc = subprocess.call([sys.executable, str(script)], cwd=ROOT, env=env)
        print(f"== {name}: exit {rc} in {time.monotonic() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
