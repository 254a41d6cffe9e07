"""Helpers shared by the benchmarks: medians of repeats, pass/fail checks, result files.

docs/architecture.md §Measuring performance: the machines are small, shared and noisy, so a benchmark reports medians of
several repeats, ratios against anchors measured in the same run, and the raw samples in JSON.

    from bench.common import Samples, check, write_results   # with the repo root on sys.path
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from testing.samples import Samples  # shared with the all-reduce anchors (testing/baselines)

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Samples:
    """Wall time of ``fn()``, ``warmup`` untimed calls then ``repeats`` timed ones."""
    for _ in range(warmup):
        fn()
    samples = Samples()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.add(time.perf_counter() - start)
    return samples


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process from /proc/<pid>/stat (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(name: str, measured: float, target: float, *, higher_is_better: bool = True,
          unit: str = "") -> dict:
    """A table row: measured vs target and whether it passes."""
    ok = measured >= target if higher_is_better else measured <= target
    return {"check": name, "measured": round(measured, 4), "target": ("≥ " if higher_is_better else "≤ ") + f"{target:g}",
            "unit": unit, "result": "pass" if ok else "FAIL"}


def environment() -> dict:
    """What the numbers were measured on (load matters on shared machines)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": load}


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def write_results(name: str, data: dict, tables: dict[str, Sequence[dict]], notes: Sequence[str] = (),
                  results_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.json`` (data + tables + environment) and ``<name>.md`` (titled tables, notes)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **data, "tables": tables, "notes": list(notes)}
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = payload["environment"]
    parts = [f"# {name}", "", f"Measured {env['time_utc']} on {env['cpus']} CPUs, load average {env['loadavg']}.", ""]
    for title, rows in tables.items():
        parts += [f"## {title}", "", markdown_table(rows), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    md_path = results_dir / f"{name}.md"
    md_path.write_text("\n".join(parts))
    return json_path, md_path
