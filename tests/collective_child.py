"""Child process for tests/test_collectives.py: one real peer (own process, own PeerHost on
127.0.0.x) that runs a collectives scenario and saves what it got.

    python tests/collective_child.py CONFIG.json INDEX

CONFIG (written by the test): token, peers [{id, identity, listen}], routes {index: {peer: addr}},
go (a file to wait for before dialing anyone), out (a directory), scenario, options.
Prints ``READY {json}`` once listening, then ``DONE`` after saving ``out/peer{INDEX}.pt``.
Inputs are a pure function of (seed, peer index), so the test rebuilds them for its fp64
reference with ``make_inputs``.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectives import (CollectiveError, DeadlinePolicy, Group, all_gather, all_reduce, broadcast,  # noqa: E402
                         optimize_ring, recv_tensors, reduce_scatter, ring_deadline_s, send_tensors,
                         star_all_reduce)
from compression import get_codec  # noqa: E402
from peer.identity import Identity  # noqa: E402
from peer.transport import PeerHost  # noqa: E402

CODECS = ["fp32", "fp16", "bf16", "int8", "uint8", "int4"]
# Uneven sizes, a 0-dim, empty tensors and mixed dtypes in one bucket.
SHAPES = [((1000,), torch.float32), ((3, 77), torch.float16), ((), torch.float64), ((0,), torch.float32),
          ((5, 0, 2), torch.bfloat16), ((4099,), torch.float32), ((2, 3, 5), torch.bfloat16)]


def make_inputs(seed: int, index: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * seed + index)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * (index + 1)).to(dtype)
            for shape, dtype in shapes]


def big_input(index: int, numel: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(77 + index)
    return [torch.randn(numel, generator=gen)]


async def wait_for_file(path: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class _GrowPolicy(DeadlinePolicy):
    """Claims a measured rate on peer 0's and peer 1's link from prev: with 512-byte chunks
    (1028 bytes of int8) peer 0 starts its shard with 4x chunks, peer 1 with 2x, others 1x."""

    index: int = 0

    def measured_bandwidth(self, host, peer: str) -> float | None:
        return {0: 1e12, 1: 1.5e5}.get(self.index)


async def scenario_basic(group: Group, index: int, opts: dict) -> dict:
    host, me, members = group.host, group.self_id, group.members
    n = len(members)
    out: dict = {"members": members}
    inputs = make_inputs(1, index)
    for codec in CODECS:
        out[f"ar_{codec}"] = list(await all_reduce(group, inputs, tag=f"ar-{codec}", codec=codec))
    out["ar_sum_int8"] = list(await all_reduce(group, inputs, tag="ar-sum", codec="int8", op="sum"))
    # Paced: the same bytes as unpaced int8, this peer's sends spread over about 1 s.
    t0 = time.perf_counter()
    out["ar_paced"] = list(await all_reduce(group, inputs, tag="ar-paced", codec="int8", pace_s=1.0))
    out["paced_s"] = time.perf_counter() - t0
    try:
        await all_reduce(group, inputs, tag="bad-pace", pace_s=float("nan"))
        out["bad_pace"] = "no error"
    except CollectiveError as exc:
        out["bad_pace"] = str(exc)
    # Many tiny chunks: the pipeline with several chunks per shard in flight.
    out["ar_chunked"] = list(await all_reduce(group, make_inputs(2, index), tag="ar-chunked", codec="int8",
                                              chunk_bytes=512))
    # Ring originators pick different chunk multipliers (ring.GROWS: 4x, 2x, the plan's): other
    # bytes on the wire, the same result as ar_chunked.
    grown = Group(host, members, policy=_GrowPolicy(index=index))
    out["ar_grown"] = list(await all_reduce(grown, make_inputs(2, index), tag="ar-grown", codec="int8",
                                            chunk_bytes=512))
    # Two collectives at once under different tags, different inputs and codecs.
    a, b = await asyncio.gather(
        all_reduce(group, make_inputs(3, index), tag="cc-a", codec="int8"),
        all_reduce(group, make_inputs(4, index), tag="cc-b", codec="fp16", op="sum"))
    out["cc_a"], out["cc_b"] = list(a), list(b)
    shard = await reduce_scatter(group, inputs, tag="rs", codec="fp32", op="sum")
    out["rs"] = {"start": shard.start, "stop": shard.stop, "values": shard.values}
    mine = [torch.arange(index + 2, dtype=torch.int64), torch.full((index,), float(index)).bfloat16()]
    gathered = await all_gather(group, mine, tag="ag")
    out["ag"] = {members.index(p): ts for p, ts in gathered.items()}
    root = members[0]
    out["bc_raw"] = await broadcast(group, inputs if me == root else None, root=root, tag="bc-raw")
    out["bc_int8"] = await broadcast(group, [inputs[0]] if me == root else None, root=root, tag="bc-q",
                                     codec="int8")
    nxt, prev = members[(index + 1) % n], members[(index - 1) % n]
    sent = [torch.arange(6, dtype=torch.int64).reshape(2, 3) * index, inputs[1]]
    _, got = await asyncio.gather(send_tensors(host, nxt, sent, tag="p2p"),
                                  recv_tensors(host, prev, tag="p2p"))
    out["p2p"] = got
    out["star_sum"] = list(await star_all_reduce(group, inputs, tag="star"))
    out["star_int8"] = list(await star_all_reduce(group, inputs, tag="star-q", codec="int8", op="mean"))
    try:  # every peer passes a different shape: a clear error everywhere, no hang
        await all_reduce(group, [torch.zeros(index + 1)], tag="mismatch")
        out["mismatch"] = "no error"
    except CollectiveError as exc:
        out["mismatch"] = str(exc)
    alone = Group(host, [me])
    out["alone"] = list(await all_reduce(alone, inputs, tag="alone"))
    ring, matrix = await optimize_ring(group, tag="topo")
    out["topology"] = {"order": ring.members, "matrix": matrix.as_dict()}
    out["ar_ring"] = list(await all_reduce(ring, inputs, tag="ar-ring", codec="int8"))
    return out


async def scenario_fault(group: Group, index: int, opts: dict) -> dict:
    """Warm up (measures the links), then one big all-reduce during which a peer dies or stalls."""
    host = group.host
    await all_reduce(group, big_input(index, 1 << 18), tag="warm", codec="int8")
    print("WARM", flush=True)
    await wait_for_file(opts["go2"])
    if index == opts.get("suicide_index"):
        # SIGKILL ourselves after this many chunk sends of the big all-reduce: mid-operation,
        # deterministically, with no chance to say goodbye.
        real_send, sends = host.send, [0]

        async def send(peer, tag, header, payload=b"", **options):
            if "|big|" in tag and "|rs|" in tag:
                sends[0] += 1
                if sends[0] > opts["sends_before_kill"]:
                    os.kill(os.getpid(), signal.SIGKILL)
            return await real_send(peer, tag, header, payload, **options)
        host.send = send
    numel = opts["numel"]
    # The deadline the library derives for the first attempt, from the links the warm-up measured.
    budget = ring_deadline_s(group, numel, get_codec(opts["codec"]))
    t0 = time.monotonic()
    print("BIG", flush=True)
    try:
        result = await all_reduce(group, big_input(index, numel), tag="big", codec=opts["codec"],
                                  chunk_bytes=opts.get("chunk_bytes", 1 << 20))
    except CollectiveError as exc:
        return {"error": str(exc), "elapsed": time.monotonic() - t0}
    return {"result": result[0], "members": result.members, "attempts": result.attempts,
            "elapsed": time.monotonic() - t0, "budget": budget}


SCENARIOS = {"basic": scenario_basic, "fault": scenario_fault}


async def main(config_path: str, index: int) -> None:
    cfg = json.loads(Path(config_path).read_text())
    me = cfg["peers"][index]
    host = PeerHost(Identity.load_or_create(me["identity"]), bytes.fromhex(cfg["token"]))
    ip, port = me["listen"].rsplit(":", 1)
    await host.start(ip, int(port))
    print("READY " + json.dumps({"peer_id": host.peer_id, "address": host.address}), flush=True)
    await wait_for_file(cfg["go"])
    for peer, address in cfg["routes"][str(index)].items():
        host.add_route(peer, address)
    opts = cfg.get("options", {})
    group = Group(host, [p["id"] for p in cfg["peers"]], min_peers=opts.get("min_peers", 1))
    result = await SCENARIOS[cfg["scenario"]](group, index, opts)
    torch.save(result, Path(cfg["out"]) / f"peer{index}.pt")
    print("DONE", flush=True)
    await asyncio.sleep(opts.get("linger_s", 1.0))  # let peers drain what they still read from us
    await host.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
