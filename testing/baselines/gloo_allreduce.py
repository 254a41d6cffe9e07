"""Anchor: torch.distributed gloo fp32 all-reduce, one process per host of a ``testing.links.Links``.

    from testing.baselines.gloo_allreduce import run_gloo
    result = run_gloo(links, numel=25_000_000, repeats=3)   # {"median": s, "samples": [...], ...}

    .venv/bin/python -m testing.baselines.gloo_allreduce --links tbf100 [--hosts 4 --numel N --repeats 3]

Rank 0 hosts the TCPStore on its own host address (port chosen by the OS, reported in READY);
gloo binds the interface that address lives on (GLOO_SOCKET_IFNAME = links.interface(i)). Every
rank holds ``full(rank + 1)``, so the sum is exact in fp32 and each rank checks every value of its result.
Warmup: one 1 Mi-value all-reduce (connections, buffers). Each repeat starts after a barrier and a
sample is the slowest rank's time. gloo learns peer addresses through its store, so it cannot be
sent through per-pair relays: emu100d25 links raise LinksUnsupported.
"""
from __future__ import annotations

import argparse
import sys
import time

from testing.baselines.workers import (BaselineError, anchor_main, anchor_parser, announce, report, run_workers,
                                     slowest_per_repeat)
from testing.links import Links, LinksUnsupported

_WARMUP_NUMEL = 1 << 20
_INIT_TIMEOUT_S = 300


def run_gloo(links: Links, numel: int = 25_000_000, repeats: int = 3, *, timeout: float = 900.0) -> dict:
    """Median seconds of a gloo fp32 all-reduce of `numel` values on every host of `links`."""
    if not links.supports_direct_dial:
        raise LinksUnsupported(f"gloo exchanges its own peer addresses; it cannot cross {links.kind} relays")
    if not (numel >= 1 and repeats >= 1):
        raise ValueError(f"numel and repeats must be >= 1, got {numel!r}, {repeats!r}")

    def argv(i: int) -> list[str]:
        return [sys.executable, "-m", "testing.baselines.gloo_allreduce", "--worker", "--rank", str(i),
                "--world", str(links.n), "--address", links.address(i), "--interface", links.interface(i),
                "--numel", str(numel), "--repeats", str(repeats)]

    def go(ready: list[dict]) -> dict:
        return {"store": f"{links.address(0)}:{ready[0]['port']}"}

    results = run_workers(links, argv, go, timeout=timeout)
    wrong = [r["rank"] for r in results if not r["verified"]]
    if wrong:
        raise BaselineError(f"gloo all-reduce gave wrong sums on ranks {wrong}")
    return {"anchor": "gloo", "codec": "fp32", "links": links.kind, "hosts": links.n, "numel": numel,
            "wire_bytes": 4 * numel, "verified": True,
            **slowest_per_repeat([r["times"] for r in results])}


def _worker(args: argparse.Namespace) -> None:
    import os
    from datetime import timedelta

    os.environ["GLOO_SOCKET_IFNAME"] = args.interface
    import torch
    import torch.distributed as dist

    store = dist.TCPStore(args.address, 0, args.world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=_INIT_TIMEOUT_S)) if args.rank == 0 else None
    go = announce({"port": store.port} if store is not None else {})
    if store is None:
        host, port = go["store"].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), args.world, is_master=False,
                              timeout=timedelta(seconds=_INIT_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=_INIT_TIMEOUT_S))
    dist.all_reduce(torch.ones(_WARMUP_NUMEL))
    x = torch.empty(args.numel)
    expected = args.world * (args.world + 1) / 2
    times, verified = [], True
    for _ in range(args.repeats):
        x.fill_(args.rank + 1)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
        verified = verified and bool((x == expected).all())
    dist.barrier()
    dist.destroy_process_group()
    report({"rank": args.rank, "times": times, "verified": verified})


def main(argv: list[str] | None = None) -> None:
    parser = anchor_parser("testing.baselines.gloo_allreduce", "gloo fp32 all-reduce anchor; prints JSON")
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    anchor_main(parser, argv, _worker, lambda links, args: run_gloo(links, args.numel, args.repeats),
                lambda result: [result])


if __name__ == "__main__":
    main()
