"""One worker process per host, a two-line protocol with the parent, and the per-repeat summary.

Worker side (stdlib only, so it runs in any venv):
    go = announce({"port": ...})   # prints READY {json}, then blocks for the parent's go line
    ...                            # the measured work
    report({"times": [...]})       # prints RESULT {json}, then blocks until the parent closes stdin

The final wait keeps every worker alive until all have finished, so an early finisher never tears
down connections a slower peer still reads from; stdin closing (parent done or dead) ends it.

A PeerHost mesh: ``host, go = await start_mesh_host(address, token, rank)`` in each worker,
``run_workers(links, argv, mesh_go(links), ...)`` in the parent.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from testing import ROOT
from testing.links import HostProcess, Links, LinksError, measure_link_rate, open_links, ring_bound_fields
from testing.samples import Samples

if TYPE_CHECKING:
    from peer.transport import PeerHost

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


async def start_mesh_host(address: str, token_hex: str, rank: int) -> tuple[PeerHost, dict]:
    """Worker side of a PeerHost mesh: listen on ``address``, announce port and peer id, and dial
    every other peer through the route the parent sent (``Links.routes``: relays on emulated
    links). Returns ``(host, go)``; ``go["peers"]`` are the peer ids in rank order."""
    from peer.identity import Identity
    from peer.transport import PeerHost

    host = PeerHost(Identity.generate(), bytes.fromhex(token_hex))
    await host.start(address, 0)
    go = await asyncio.to_thread(announce, {"port": int(host.address.rsplit(":", 1)[1]), "peer_id": host.peer_id})
    for j, (peer, route) in enumerate(zip(go["peers"], go["routes"][rank])):
        if j != rank:
            host.add_route(peer, route)
    return host, go


def mesh_go(links: Links) -> Callable[[list[dict]], dict]:
    """Parent side of ``start_mesh_host``: the go message (every peer id, every host's routes)."""
    def go(ready: list[dict]) -> dict:
        return {"peers": [r["peer_id"] for r in ready], "routes": links.routes([r["port"] for r in ready])}
    return go


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
    median / min / max over repeats (seconds) with the raw samples (testing.samples.Samples)."""
    samples = Samples([max(rank[k] for rank in times_per_rank) for k in range(len(times_per_rank[0]))])
    return samples.as_dict()


def anchor_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The command line every anchor shares: links, hosts, size, repeats, --no-rate, and the hidden
    flags its parent passes a worker (--worker --rank --world --address)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--links", default="loopback", help="loopback | tbf100")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-rate", action="store_true", help="skip measuring the link rate")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    return parser


def anchor_main(parser: argparse.ArgumentParser, argv: list[str] | None,
                worker: Callable[[argparse.Namespace], None],
                run: Callable[[Links, argparse.Namespace], dict],
                rows: Callable[[dict], Iterable[dict]]) -> None:
    """Parse ``argv``; with --worker run ``worker``, else open the links, measure their rate (unless
    --no-rate), ``run`` the anchor and print its JSON, every row of ``rows(result)`` given its
    ring bound (testing.links.ring_bound_fields)."""
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with open_links(args.links, args.hosts) as links:
        rate = None if args.no_rate else measure_link_rate(links)
        result = run(links, args)
        for row in rows(result):
            row.update(ring_bound_fields(links.n, row["wire_bytes"], row["median"], rate))
        print(json.dumps(result, indent=2))
