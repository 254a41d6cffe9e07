"""NAT traversal (issue 15): which method connects which NAT pair and how fast, and what peers
behind NATs cost a 4-peer all-reduce, in network namespaces with real NAT (testing/nat.py).

    .venv/bin/python bench/nat.py [--mbytes 100] [--repeats 3] [--skip-matrix] [--skip-allreduce]

1. Matrix: for each (dialler, target) pair of public / port-preserving NAT / fully-random NAT
   hosts and each method -- direct dial, reversal (the target, reserved at a public relay, is
   asked to dial back), relay circuit, hole punch (upgrading the relayed link) -- whether the
   link came up over THAT method (``host.link_path``) and how long the first call took (a
   method that fails falls back to the next one; the time then includes the failed try). Fresh
   processes per cell (tests/relay_child.py, driven by testing/relaypeer.py's Peer).
2. All-reduce: 4 peers, int8 codec, ``--mbytes`` of fp32 per peer, every access link (a public
   host's, or the NAT router's uplink) at 100 Mbit/s tbf; 0 NATed peers, then 2 behind
   fully-random NATs (no punch possible) reserved at public peer 0, which relays. Ring orders:
   ``rank`` (the NATed pair adjacent: one hop through the relay) and ``optimized``
   (collectives.topology.optimize_ring, which weighs relayed links down: it puts each NATed
   peer between public ones). Medians of the slowest rank per repeat; the relay's extra traffic
   (bytes it spliced during the timed repeats) beside them.
3. Relay throughput: a 24 MiB message from a peer behind a port-preserving NAT to one behind a
   fully-random NAT through a public relay whose access link is 100 Mbit/s tbf (best of 3),
   against that link rate.
Writes bench/results/nat.json and nat.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import check, write_results  # noqa: E402
from testing.links import Links  # noqa: E402

RATE_MBIT = 100.0
TOKEN_HEX = "6e61742d62656e63682d746f6b656e2d30313233343536373839616263646566"
PAIRS = [("public", "public"), ("public", "preserving"), ("public", "random"),
         ("preserving", "public"), ("preserving", "preserving"), ("preserving", "random"),
         ("random", "public"), ("random", "random")]
METHODS = ("direct", "reversal", "relay", "punch")
TARGET_SLOWDOWN = 1.15


# ----------------------------------------------------------------------------- 1. the matrix
def _matrix_lab():
    from testing.nat import Host, NatLab, Router

    hosts = [Host("relay"), Host("obs"), Host("pa"), Host("pb"),
             Host("ha", "rha"), Host("hb", "rhb"), Host("ca", "rca"), Host("cb", "rcb")]
    routers = {"rha": Router("preserving"), "rhb": Router("preserving"),
               "rca": Router("random"), "rcb": Router("random")}
    return NatLab(hosts, routers)


_HOSTS = {"public": ("pa", "pb"), "preserving": ("ha", "hb"), "random": ("ca", "cb")}


def _cell(lab, relay, observer_port: int, dialler: str, target: str, method: str) -> dict:
    """One (pair, method) trial on fresh processes: did the link come up over ``method``?"""
    from testing.relaypeer import Peer

    x_host, y_host = _HOSTS[dialler][0], _HOSTS[target][1]
    x_flags = () if method in ("direct", "reversal") else ("--unreachable",)
    x, y = Peer(lab, x_host, *x_flags), Peer(lab, y_host, "--unreachable")
    try:
        if method == "punch":
            for p in (x, y):
                p.ok(op="observe", host=lab.address("obs"), port=observer_port)
        if method == "direct":
            x.ok(op="route", peer=y.peer_id, address=y.address, reachable=True)
        else:
            y.ok(op="reserve", relay=relay.peer_id, address=relay.address)
            x.ok(op="route", peer=y.peer_id, address=y.address,
                 relays=[[relay.peer_id, relay.address]], reachable=False)
        t0 = time.monotonic()
        answer = x.ask(timeout=40, op="call", peer=y.peer_id, text="hi")
        seconds = time.monotonic() - t0
        path = answer.get("path") if answer["ok"] else None
        if method == "punch" and answer["ok"]:
            deadline = t0 + 15
            while path != "punched" and time.monotonic() < deadline:
                time.sleep(0.1)
                path = x.ok(op="info", peer=y.peer_id)["path"]
            seconds = time.monotonic() - t0
        want = {"direct": "direct", "reversal": "reversed", "relay": "relayed", "punch": "punched"}[method]
        return {"dialler": dialler, "target": target, "method": method, "connected": path == want,
                "path": path, "seconds": round(seconds, 3),
                "error": None if answer["ok"] else answer.get("error", "")[:160]}
    finally:
        for p in (x, y):
            p.proc.kill()
            p.proc.wait(5)


def bench_matrix() -> list[dict]:
    from testing import natprobe
    from testing.relaypeer import Peer

    rows = []
    with _matrix_lab() as lab:
        observer = lab.popen("obs", natprobe.argv("serve", lab.address("obs")),
                             stdout=subprocess.PIPE, text=True)
        port = json.loads(observer.stdout.readline())["port"]
        relay = Peer(lab, "relay", "--relay")
        for dialler, target in PAIRS:
            for method in METHODS:
                row = _cell(lab, relay, port, dialler, target, method)
                print(f"  {dialler:>10} -> {target:<10} {method:<8} "
                      f"{'yes' if row['connected'] else 'no ':<3} {row['seconds']:6.2f}s  path={row['path']}",
                      flush=True)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2. all-reduce
class NatLinks(Links):
    """``testing.links.Links`` over a NatLab: host i public, or behind its own fully-random NAT
    router (``natted``); every access link at ``rate_mbit`` (the router's uplink for a NATed host)."""

    kind = "nat-tbf100"

    def __init__(self, natted: Sequence[bool], rate_mbit: float = RATE_MBIT) -> None:
        from testing.nat import Host, NatLab, Router
        from testing.netns import LinkShape

        super().__init__(len(natted))
        shape = LinkShape(rate_mbit=rate_mbit, burst_bytes=256 * 1024)
        self.natted = list(natted)
        self.names = [f"h{i}" for i in range(self.n)]
        hosts = [Host(name, f"r{i}") if nat else Host(name, shape=shape)
                 for i, (name, nat) in enumerate(zip(self.names, natted))]
        routers = {f"r{i}": Router("random", uplink=shape) for i, nat in enumerate(natted) if nat}
        self.lab = NatLab(hosts, routers)
        self.nominal_rate_Bps = rate_mbit * 1e6 / 8

    def open(self) -> "NatLinks":
        self.lab.build()
        super().open()
        return self

    def close(self) -> None:
        super().close()
        self.lab.close()

    def address(self, i: int) -> str:
        return self.lab.address(self.names[i])

    def wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        return self.lab.exec_args(self.names[i], argv)


async def _worker(args: argparse.Namespace) -> None:
    import torch

    from collectives import Group, all_reduce
    from collectives.topology import optimize_ring
    from peer.errors import LowbandError
    from peer.identity import Identity
    from peer.transport import PeerHost
    from testing.baselines.workers import announce, report

    torch.set_num_threads(1)
    host = PeerHost(Identity.generate(), bytes.fromhex(TOKEN_HEX), relay=args.rank == 0)
    await host.start("0.0.0.0", 0)
    host.reachable = not args.natted
    port = int(host.address.rsplit(":", 1)[1])
    go = await asyncio.to_thread(announce, {"port": port, "peer_id": host.peer_id})
    peers, addresses, natted = go["peers"], go["addresses"], go["natted"]
    relay = (peers[0], addresses[0])
    if args.natted:
        await host.reserve(*relay)
    for j, peer in enumerate(peers):
        if j != args.rank:
            host.add_route(peer, addresses[j], relays=[relay] if natted[j] else [],
                           reachable=not natted[j])
    deadline = time.monotonic() + 60
    for j, peer in enumerate(peers):  # everyone reachable (reservations made) before timing
        while j != args.rank:
            try:
                await host.ping(peer, timeout=10)
                break
            except (LowbandError, OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(args.rank))
    group = Group(host, peers)
    await all_reduce(group, [x[:1 << 20]], tag="warm", codec="int8")
    if args.order == "optimized":
        group, _ = await optimize_ring(group, tag="topo")
    before = host.relay.stats()["total_bytes"] if host.relay else 0
    times = []
    for k in range(args.repeats):
        await all_reduce(group, [x[:1 << 10]], tag=f"barrier{k}", codec="fp32")
        t0 = time.perf_counter()
        await all_reduce(group, [x.clone()], tag=f"r{k}", codec="int8")
        times.append(time.perf_counter() - t0)
    relayed = (host.relay.stats()["total_bytes"] - before) if host.relay else 0
    paths = {f"h{j}": host.link_path(p) for j, p in enumerate(peers) if p != host.peer_id}
    report({"times": times, "relayed_bytes": relayed, "paths": paths,
            "order": [f"h{peers.index(p)}" + ("(nat)" if natted[peers.index(p)] else "") for p in group.members]})


def run_allreduce(natted: list[bool], order: str, numel: int, repeats: int) -> dict:
    from testing.baselines.workers import run_workers

    with NatLinks(natted) as links:
        def argv(i: int) -> list[str]:
            return [sys.executable, str(Path(__file__).resolve()), "--worker", "--rank", str(i),
                    "--numel", str(numel), "--repeats", str(repeats), "--order", order,
                    *(["--natted"] if natted[i] else [])]

        def go(ready: list[dict]) -> dict:
            return {"peers": [r["peer_id"] for r in ready], "natted": natted,
                    "addresses": [f"{links.address(i)}:{r['port']}" for i, r in enumerate(ready)]}

        results = run_workers(links, argv, go, timeout=600)
    slowest = [max(r["times"][k] for r in results) for k in range(repeats)]
    return {"natted": sum(natted), "order": order, "median_s": statistics.median(slowest),
            "times_s": slowest, "relay_extra_bytes": results[0]["relayed_bytes"],
            "ring": results[0]["order"], "paths_from_rank0": results[0]["paths"],
            "paths_from_rank2": results[2]["paths"]}


def bench_allreduce(mbytes: float, repeats: int) -> list[dict]:
    numel = int(mbytes * 1e6 / 4)
    rows = []
    for natted, order in (([False] * 4, "rank"), ([False, False, True, True], "rank"),
                          ([False, False, True, True], "optimized")):
        row = run_allreduce(natted, order, numel, repeats)
        print(f"  {row['natted']} NATed, {order:>9} ring: median {row['median_s']:.2f}s "
              f"(repeats {', '.join(f'{t:.2f}' for t in row['times_s'])}), relay spliced "
              f"{row['relay_extra_bytes'] / 1e6:.1f} MB, ring {row['ring']}", flush=True)
        rows.append(row)
    base = rows[0]["median_s"]
    for row in rows:
        row["vs_all_public"] = round(row["median_s"] / base, 3)
    return rows


# ----------------------------------------------------------------------------- 3. relay throughput
def bench_relay_throughput(size: int = 24 << 20, tries: int = 3) -> dict:
    from testing.nat import Host
    from testing.netns import LinkShape
    from testing.relaypeer import Peer, nat_lab, relayed_pair

    with nat_lab(Host("pub0", shape=LinkShape(rate_mbit=RATE_MBIT, burst_bytes=256 * 1024))) as lab:
        relay = Peer(lab, "pub0", "--relay")
        a, b = relayed_pair(lab, [relay])
        a.ok(op="call", peer=b.peer_id, text="warm")
        a.ok(op="send", peer=b.peer_id, tag="warm", size=2 << 20)
        seconds = []
        for k in range(tries):
            sent = a.ok(op="send", peer=b.peer_id, tag=f"bulk{k}", size=size)
            assert sent["sha_ok"] and sent["path"] == "relayed", sent
            seconds.append(sent["seconds"])
    mbit = size * 8 / min(seconds) / 1e6
    print(f"  relayed {size >> 20} MiB: best {min(seconds):.2f}s = {mbit:.1f} Mbit/s "
          f"({mbit / RATE_MBIT:.2f}x the relay's {RATE_MBIT:g} Mbit/s)", flush=True)
    return {"bytes": size, "seconds": seconds, "mbit_s": round(mbit, 2), "vs_link": round(mbit / RATE_MBIT, 3)}


# ----------------------------------------------------------------------------- report
def matrix_table(matrix: list[dict]) -> list[dict]:
    """One row per pair: per method "yes 0.12s" or "no -> relayed 5.3s" (the path it fell back to)."""
    rows = []
    for dialler, target in PAIRS:
        row = {"dialler": dialler, "target": target}
        for r in matrix:
            if (r["dialler"], r["target"]) == (dialler, target):
                row[r["method"]] = (f"yes {r['seconds']:.2f}s" if r["connected"]
                                    else f"no -> {r['path'] or 'failed'} {r['seconds']:.1f}s")
        rows.append(row)
    return rows


def allreduce_table(rows: list[dict]) -> list[dict]:
    return [{"NATed peers": r["natted"], "ring order": r["order"], "median s": r["median_s"],
             "x all-public": r["vs_all_public"], "relay extra MB": round(r["relay_extra_bytes"] / 1e6, 1),
             "ring": " ".join(r["ring"])} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbytes", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--skip-allreduce", action="store_true")
    parser.add_argument("--skip-relay", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--numel", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--order", default="rank", help=argparse.SUPPRESS)
    parser.add_argument("--natted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(_worker(args))
        return 0
    from testing.netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"bench/nat.py needs network namespaces with nft: {reason}", file=sys.stderr)
        return 2
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0],
            "mbytes": args.mbytes, "repeats": args.repeats, "rate_mbit": RATE_MBIT}
    t0 = time.monotonic()
    matrix = [] if args.skip_matrix else bench_matrix()
    allreduce = [] if args.skip_allreduce else bench_allreduce(args.mbytes, args.repeats)
    relay = None if args.skip_relay else bench_relay_throughput()
    targets = []
    if allreduce:
        best = min(r["vs_all_public"] for r in allreduce if r["natted"])
        targets.append(check("2 NATed peers, a public one relaying: best ring vs all-public (x)", best,
                             TARGET_SLOWDOWN, higher_is_better=False, unit="x"))
    if relay:
        targets.append(check("relay throughput vs the relay's link rate (x)", relay["vs_link"], 0.9, unit="x"))
    meta["seconds"] = round(time.monotonic() - t0, 1)
    tables = {}
    if matrix:
        tables["Which method connects which pair (dialler -> target; 'no': the path it fell back to)"] = \
            matrix_table(matrix)
    if allreduce:
        tables[f"4-peer int8 all-reduce, {args.mbytes:g} MB fp32 per peer, {RATE_MBIT:g} Mbit/s tbf access links"] = \
            allreduce_table(allreduce)
    tables["Targets"] = targets
    notes = ["Matrix cells run on fresh processes; a method that cannot connect falls back to the next "
             "one (direct, reversal, relay; punch upgrades a relayed link), and the time is until the "
             "first call returned (punch: until the link was punched).",
             "Ring 'rank' puts the two NATed peers side by side: that hop goes through the relay "
             "(relay extra MB = bytes it spliced over all timed repeats); 'optimized' is "
             "collectives.topology.optimize_ring, which weighs relayed links down.",
             "The machine was shared (see load average): single repeats can stall several seconds; "
             "medians are of the slowest rank per repeat."]
    write_results("nat", {"meta": meta, "matrix": matrix, "allreduce": allreduce, "relay": relay},
                  tables, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
