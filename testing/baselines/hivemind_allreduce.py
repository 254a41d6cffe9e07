"""Anchor: hivemind 1.1.12 DecentralizedAverager, one process per host of a ``testing.links.Links``.

    from testing.baselines.hivemind_allreduce import run_hivemind
    result = run_hivemind(links, numel=25_000_000, codecs=("fp32", "fp16", "8bit"), repeats=3)
    # {"codecs": {"8bit": {"median": s, "samples": [...], "verified_rounds": 3, "failed_rounds": 0, ...}}}

    .venv/bin/python -m testing.baselines.hivemind_allreduce --links tbf100 [--codecs fp32,fp16,8bit]

Workers run under bench/.venv-hivemind (``sh bench/hivemind_env.sh`` makes it): hivemind's 8-bit
codecs need numpy<2 -- with numpy 2 they fail to decode and the averager silently keeps each
peer's local values (docs/architecture.md §Measuring performance). So every round is *checked by value*: host r holds
``g + 4 * 2**r`` (g shared, standard normal), no host's values equal the mean, and a round counts
only if the result's mean absolute error against ``g + mean(4 * 2**r)`` is small (and, for fp32 /
fp16, the largest error too). Rounds that fail the check are counted (``failed_rounds``) and left
out of the timing; a codec with no verified round raises BaselineError.

Setup per host: a DHT whose p2pd listens on the host's own address (inside its namespace on
tbf100); hosts 1.. bootstrap from host 0's visible multiaddrs. Per codec one averager
(target_group_size = min_group_size = N); timeouts set by hand (sender < reducer). A round:
write the local values, step(require_trigger=True), wait until the group is assembled, then time
from the trigger to the averaged result; a sample is the slowest rank. One untimed warmup round
per codec. hivemind peers dial the addresses they learn from the DHT, so emu100d25 relays cannot
be put in their way: those links raise LinksUnsupported.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from testing import ROOT
from testing.baselines.workers import (BaselineError, anchor_main, anchor_parser, announce, report, run_workers,
                                     slowest_per_repeat)
from testing.links import Links, LinksUnsupported

# Made by bench/hivemind_env.sh (the Makefile's bench target).
VENV_PYTHON = ROOT / "bench" / ".venv-hivemind" / "bin" / "python"
#: codec name -> (hivemind compression class, wire bytes per value)
CODECS = {"fp32": ("NoCompression", 4), "fp16": ("Float16Compression", 2), "8bit": ("Uniform8BitQuantization", 1)}
# Tolerances of the value check (values are O(10); local values sit >= 1 away from the mean).
_MEAN_ERROR = {"fp32": 1e-5, "fp16": 0.01, "8bit": 0.05}
_MAX_ERROR = {"fp32": 1e-4, "fp16": 0.05}
_SENDER_TIMEOUT_S = 60.0
_REDUCER_TIMEOUT_S = 120.0
# hivemind's defaults; request_timeout >= min_matchmaking_time risks matchmaking deadlocks (its docs).
# The group is assembled as soon as all N peers joined, and only the all-reduce itself is timed.
_MATCHMAKING_TIME_S = 5.0
_REQUEST_TIMEOUT_S = 3.0
_FIND_GROUP_TIMEOUT_S = 120.0
_ROUND_TIMEOUT_S = 600.0
_P2PD_STARTUP_S = 60.0


def run_hivemind(links: Links, numel: int = 25_000_000, codecs: Sequence[str] = ("fp32", "fp16", "8bit"),
                 repeats: int = 3, *, warmup: int = 1, timeout: float = 1800.0,
                 python: Path = VENV_PYTHON) -> dict:
    """Median seconds of a hivemind all-reduce of `numel` fp32 values per codec, every round
    checked by value. Needs bench/.venv-hivemind (see bench/hivemind_env.sh)."""
    if not links.supports_direct_dial:
        raise LinksUnsupported(f"hivemind dials the addresses its DHT spreads; it cannot cross {links.kind} relays")
    unknown = [c for c in codecs if c not in CODECS]
    if unknown or not codecs:
        raise ValueError(f"codecs must be among {', '.join(CODECS)}, got {list(codecs)!r}")
    if not (numel >= 2 and repeats >= 1 and warmup >= 0):
        raise ValueError(f"need numel >= 2, repeats >= 1, warmup >= 0; got {numel!r}, {repeats!r}, {warmup!r}")
    if not Path(python).exists():
        raise BaselineError(f"{python} not found: run `sh bench/hivemind_env.sh` first")

    def argv(i: int) -> list[str]:
        return [str(python), "-m", "testing.baselines.hivemind_allreduce", "--worker", "--rank", str(i),
                "--world", str(links.n), "--address", links.address(i), "--numel", str(numel),
                "--codecs", ",".join(codecs), "--repeats", str(repeats), "--warmup", str(warmup)]

    results = run_workers(links, argv, lambda ready: {"initial_peers": ready[0]["maddrs"]}, timeout=timeout)
    out = {}
    for codec in codecs:
        per_rank = [r["codecs"][codec] for r in results]
        good = [k for k in range(repeats) if all(rank[k]["ok"] for rank in per_rank)]
        if not good:
            worst = max((rank[k] for rank in per_rank for k in range(repeats)), key=lambda r: r["mean_abs_error"])
            raise BaselineError(f"hivemind {codec}: no round averaged on every rank (worst: {worst})")
        out[codec] = {"wire_bytes": CODECS[codec][1] * numel, "verified_rounds": len(good),
                      "failed_rounds": repeats - len(good),
                      "max_mean_abs_error": max(rank[k]["mean_abs_error"] for rank in per_rank for k in good),
                      **slowest_per_repeat([[rank[k]["seconds"] for k in good] for rank in per_rank])}
    return {"anchor": "hivemind", "version": results[0]["version"], "numpy": results[0]["numpy"],
            "links": links.kind, "hosts": links.n, "numel": numel, "codecs": out}


# ----------------------------------------------------------------------------------- worker side
def _worker(args: argparse.Namespace) -> None:
    import hivemind
    import numpy
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind import compression

    dht_kwargs = dict(host_maddrs=[f"/ip4/{args.address}/tcp/0"], auto_nat=False, nat_port_map=False,
                      use_relay=False, startup_timeout=_P2PD_STARTUP_S)
    dht = hivemind.DHT(start=True, **dht_kwargs) if args.rank == 0 else None
    go = announce({"maddrs": [str(m) for m in dht.get_visible_maddrs()]} if dht is not None else {})
    if dht is None:
        dht = hivemind.DHT(initial_peers=go["initial_peers"], start=True, **dht_kwargs)

    g = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    offsets = [4.0 * 2 ** r for r in range(args.world)]
    local = g + offsets[args.rank]
    expected = g + sum(offsets) / args.world

    # All averagers live until every rank reported: shutting one down while a slower peer still
    # reads its last parts resets those streams and spoils the peer's next round.
    averagers = {codec: hivemind.DecentralizedAverager(
        [torch.zeros(args.numel)], dht, prefix=f"lowband-bench-{codec}", start=True,
        target_group_size=args.world, min_group_size=args.world,
        min_matchmaking_time=_MATCHMAKING_TIME_S, request_timeout=_REQUEST_TIMEOUT_S,
        sender_timeout=_SENDER_TIMEOUT_S, reducer_timeout=_REDUCER_TIMEOUT_S,
        next_chunk_timeout=_SENDER_TIMEOUT_S, allreduce_timeout=_ROUND_TIMEOUT_S,
        compression=getattr(compression, CODECS[codec][0])()) for codec in args.codecs.split(",")}
    out = {}
    for codec, averager in averagers.items():
        rounds = []
        for _ in range(args.warmup + args.repeats):
            with averager.get_tensors() as tensors:
                tensors[0].copy_(local)
            control = averager.step(wait=False, require_trigger=True, timeout=_FIND_GROUP_TIMEOUT_S)
            while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                time.sleep(0.005)
            start = time.perf_counter()
            control.allow_allreduce()
            gathered = control.result(timeout=_ROUND_TIMEOUT_S)
            elapsed = time.perf_counter() - start
            with averager.get_tensors() as tensors:
                error = (tensors[0] - expected).abs_()
                mean_error, max_error = error.mean().item(), error.max().item()
            # hivemind returns normally when parts were lost (it keeps local values there), so
            # success is judged by value.
            ok = (gathered is not None and len(gathered) == args.world and mean_error <= _MEAN_ERROR[codec]
                  and max_error <= _MAX_ERROR.get(codec, float("inf")))
            rounds.append({"seconds": elapsed, "ok": ok, "group": len(gathered or ()),
                           "mean_abs_error": mean_error, "max_abs_error": max_error})
        out[codec] = rounds[args.warmup:]
    report({"rank": args.rank, "codecs": out, "version": hivemind.__version__, "numpy": numpy.__version__})
    for averager in averagers.values():
        averager.shutdown()
    dht.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = anchor_parser("testing.baselines.hivemind_allreduce",
                           "hivemind DecentralizedAverager anchor; prints JSON")
    parser.add_argument("--codecs", default="fp32,fp16,8bit")
    parser.add_argument("--warmup", type=int, default=1)
    anchor_main(parser, argv, _worker,
                lambda links, args: run_hivemind(links, args.numel, args.codecs.split(","), args.repeats,
                                                 warmup=args.warmup),
                lambda result: result["codecs"].values())


if __name__ == "__main__":
    main()
