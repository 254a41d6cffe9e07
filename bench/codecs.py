"""Codec throughput at one thread: encode+decode GB/s of fp32 input, compression ratio, and
max error against the documented bound, with a memory-copy anchor measured in the same run.

    .venv/bin/python bench/codecs.py [--sizes 4194304 16777216] [--repeats 7] [--threads 1]

Prints a markdown table and writes bench/results/codecs.json and bench/results/codecs.md.
The machine is shared and noisy (docs/architecture.md §Measuring performance): every timing is a median of repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compression import get_codec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CODECS = ["fp32", "fp16", "bf16", "int8", "int8:scale_dtype=fp16", "uint8", "int4", "int8:zstd=True"]


def parse_spec(spec: str) -> tuple[str, dict]:
    """'int8:block_size=512,zstd=True' -> ('int8', {'block_size': 512, 'zstd': True})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        opts[key] = {"True": True, "False": False}.get(value, int(value) if value.lstrip("-").isdigit() else value)
    return name, opts


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(spec: str, x: torch.Tensor, repeats: int) -> dict:
    name, opts = parse_spec(spec)
    codec = get_codec(name, **opts)
    meta, payload = codec.encode(x)
    y = codec.decode(meta, payload)
    encode_s = median_seconds(lambda: codec.encode(x), repeats)
    decode_s = median_seconds(lambda: codec.decode(meta, payload), repeats)
    max_err = float((y - x).abs().max())
    bound = codec.error_bound(x)
    return {
        "codec": spec,
        "numel": x.numel(),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "encode_GBps": x.numel() * 4 / encode_s / 1e9,
        "decode_GBps": x.numel() * 4 / decode_s / 1e9,
        "roundtrip_GBps": x.numel() * 4 / (encode_s + decode_s) / 1e9,
        "payload_bytes": len(payload),
        "ratio": x.numel() * 4 / max(len(payload), 1),
        "max_err": max_err,
        "bound": bound,
        "err_over_bound": max_err / bound if bound else 0.0,
    }


def markdown(rows: list[dict], anchors: dict[int, float], threads: int) -> str:
    lines = [
        f"Codec throughput, {threads} thread(s), fp32 randn input; GB/s of fp32 input, medians. "
        "Anchor: fp32 memory copy (clone) in the same run.",
        "",
        "| codec | numel | encode GB/s | decode GB/s | enc+dec GB/s | vs copy | ratio | max err | bound | err/bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['numel']:,} | {r['encode_GBps']:.2f} | {r['decode_GBps']:.2f} | "
            f"{r['roundtrip_GBps']:.2f} | {r['roundtrip_GBps'] / anchors[r['numel']]:.2f} | {r['ratio']:.2f}x | "
            f"{r['max_err']:.3g} | {r['bound']:.3g} | {r['err_over_bound']:.3f} |"
        )
    lines.append("")
    lines += [f"copy anchor at {n:,} values: {gbps:.2f} GB/s" for n, gbps in anchors.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4 * 2**20, 16 * 2**20])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="name[:opt=value,...]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows, anchors = [], {}
    for numel in args.sizes:
        x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        anchors[numel] = numel * 4 / median_seconds(x.clone, args.repeats) / 1e9
        for spec in args.codecs:
            rows.append(bench_one(spec, x, args.repeats))
            print(f"  {spec} @ {numel:,}: {rows[-1]['roundtrip_GBps']:.2f} GB/s", file=sys.stderr)

    table = markdown(rows, anchors, args.threads)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        # Shared machine: the load average says how much the numbers were disturbed.
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    (args.out / "codecs.json").write_text(json.dumps({"env": env, "copy_anchor_GBps": anchors, "rows": rows}, indent=2))
    (args.out / "codecs.md").write_text(table)


if __name__ == "__main__":
    main()
