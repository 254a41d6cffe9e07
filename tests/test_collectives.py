"""Collectives over real peers: separate processes, real TCP on 127.0.0.x, real codecs.

One 4-peer run (module fixture) exercises every collective and codec; each test checks one
property of what the peers saved. The fault tests SIGKILL or stall a peer in the middle of a
large all-reduce and check the survivors' retried result.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from pathlib import Path

import pytest
import torch

from collectives import CollectiveError, Group, LinkMatrix, ring_order
from compression import get_codec
from peer.identity import Identity
from testing.netem import LinkEmulatorSet, LinkSpec
from tests.collective_child import CODECS, SHAPES, big_input, make_inputs
from tests.harness import Procs, free_port

CHILD = str(Path(__file__).with_name("collective_child.py"))
N = 4


def _config(tmp: Path, n: int, scenario: str, options: dict) -> tuple[Path, dict]:
    peers = []
    for i in range(n):
        ip = f"127.0.0.{i + 2}"
        ident = Identity.load_or_create(tmp / f"id{i}.key")
        peers.append({"id": ident.peer_id, "identity": str(tmp / f"id{i}.key"), "listen": f"{ip}:{free_port(ip)}"})
    routes = {str(i): {p["id"]: p["listen"] for j, p in enumerate(peers) if j != i} for i in range(n)}
    cfg = {"token": secrets.token_hex(16), "peers": peers, "routes": routes, "go": str(tmp / "go"),
           "out": str(tmp), "scenario": scenario, "options": options}
    return tmp / "config.json", cfg


def _spawn(procs: Procs, path: Path, cfg: dict) -> list:
    path.write_text(json.dumps(cfg))
    return [procs.python(CHILD, str(path), str(i), ready_timeout=90) for i in range(len(cfg["peers"]))]


def _lines_have(child, needle: str) -> bool:
    return any(needle in line for line in list(child.lines))


async def _await_line(children, needle: str, timeout: float) -> None:
    """Poll children's output without blocking the event loop (relays may run on it)."""
    end = time.monotonic() + timeout
    while not all(_lines_have(c, needle) or c.proc.poll() is not None for c in children):
        if time.monotonic() > end:
            tails = "\n".join(f"--- child {c.pid}:\n" + "\n".join(c.lines[-15:]) for c in children)
            raise TimeoutError(f"children never printed {needle!r}:\n{tails}")
        await asyncio.sleep(0.05)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() + repr(t.dtype).encode()
                          + repr(tuple(t.shape)).encode()).hexdigest()


def _ref(inputs_per_peer: list[list[torch.Tensor]], op: str) -> list[torch.Tensor]:
    n = len(inputs_per_peer)
    out = []
    for k in range(len(inputs_per_peer[0])):
        total = sum(ins[k].double() for ins in inputs_per_peer)
        out.append(total / n if op == "mean" else total)
    return out


def _ring_bound(codec_name: str, inputs_per_peer: list[list[torch.Tensor]], op: str) -> float:
    """Worst case of the ring: n-1 re-quantized partial sums (each no larger than the sum of
    |inputs|), then the owner's quantization of the result. x2 covers min-max codecs, whose
    block range can double once signs mix; plus fp32-accumulation slop."""
    codec = get_codec(codec_name)
    n = len(inputs_per_peer)
    s_abs = torch.cat([sum(ins[k].double().abs().reshape(-1) for ins in inputs_per_peer)
                       for k in range(len(inputs_per_peer[0]))]).float()
    if s_abs.numel() == 0:
        return 0.0
    hop, last = codec.error_bound(s_abs), codec.error_bound(s_abs / n if op == "mean" else s_abs)
    bound = 2 * ((n - 1) * hop / (n if op == "mean" else 1) + last)
    return bound + 1e-6 * float(s_abs.max())


def _out_rounding(t: torch.Tensor, ref: torch.Tensor) -> float:
    """Rounding from casting the fp32 result back to a narrow output dtype."""
    eps = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}.get(t.dtype, 0.0)
    return eps * float(ref.abs().max()) if ref.numel() else 0.0


def _check_close(outs: list[torch.Tensor], refs: list[torch.Tensor], bound: float, what: str) -> None:
    for k, (o, r) in enumerate(zip(outs, refs)):
        if r.numel():
            err = float((o.double() - r).abs().max())
            assert err <= bound + _out_rounding(o, r), f"{what} tensor {k}: error {err} > bound {bound}"


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    """One 4-peer run of the 'basic' scenario; returns each peer's saved results."""
    tmp = tmp_path_factory.mktemp("coll_basic")
    procs = Procs()
    try:
        path, cfg = _config(tmp, N, "basic", {"linger_s": 2.0})
        children = _spawn(procs, path, cfg)
        t0 = time.monotonic()
        (tmp / "go").write_text("go")
        for c in children:
            c.wait_for_line("DONE", timeout=150)
        elapsed = time.monotonic() - t0
        results = [torch.load(tmp / f"peer{i}.pt", weights_only=False) for i in range(N)]
        return {"results": results, "peers": [p["id"] for p in cfg["peers"]], "elapsed": elapsed}
    finally:
        procs.cleanup()


def test_all_reduce_within_codec_bound_of_fp64_reference(basic):
    inputs = [make_inputs(1, i) for i in range(N)]
    refs = _ref(inputs, "mean")
    for codec in CODECS:
        bound = _ring_bound(codec, inputs, "mean")
        for i, res in enumerate(basic["results"]):
            _check_close(res[f"ar_{codec}"], refs, bound, f"peer {i} codec {codec}")
    for i, res in enumerate(basic["results"]):
        _check_close(res["ar_sum_int8"], _ref(inputs, "sum"), _ring_bound("int8", inputs, "sum"), f"peer {i} sum")
        _check_close(res["ar_ring"], refs, _ring_bound("int8", inputs, "mean"), f"peer {i} reordered ring")
        chunked = [make_inputs(2, j) for j in range(N)]
        _check_close(res["ar_chunked"], _ref(chunked, "mean"), _ring_bound("int8", chunked, "mean"),
                     f"peer {i} small chunks")


def test_results_bit_identical_on_every_peer(basic):
    keys = [f"ar_{c}" for c in CODECS] + ["ar_sum_int8", "ar_chunked", "ar_grown", "cc_a", "cc_b", "ar_ring",
                                          "bc_raw", "bc_int8", "star_sum", "star_int8"]
    for key in keys:
        digests = {tuple(_digest(t) for t in res[key]) for res in basic["results"]}
        assert len(digests) == 1, f"{key}: peers disagree bitwise"


def test_chunk_size_chosen_per_originator_leaves_results_unchanged(basic):
    """Shards started with 4x, 2x and 1x chunks (fast measured links grow chunks, ring.GROWS)
    reduce to exactly the bits of the same all-reduce with the plan's chunks."""
    for res in basic["results"]:
        assert [_digest(t) for t in res["ar_grown"]] == [_digest(t) for t in res["ar_chunked"]]


def test_paced_all_reduce_spreads_the_same_result(basic):
    """pace_s spreads each peer's sends (the first at once) over about that long; the bytes,
    hence the result, are those of the unpaced ring (which takes milliseconds here). Shards
    are block-aligned, so some peers send less than the average the rate is set from."""
    for res in basic["results"]:
        assert [_digest(t) for t in res["ar_paced"]] == [_digest(t) for t in res["ar_int8"]]
        assert 0.5 <= res["paced_s"] < 10.0, res["paced_s"]
        assert "pace_s" in res["bad_pace"]


def test_shapes_dtypes_uneven_empty_and_zero_dim_preserved(basic):
    for res in basic["results"]:
        for key in [f"ar_{c}" for c in CODECS] + ["ar_sum_int8", "star_sum", "alone", "bc_raw"]:
            got = [(tuple(t.shape), t.dtype) for t in res[key]]
            assert got == [(shape, dtype) for shape, dtype in SHAPES], key


def test_inputs_untouched_and_group_of_one_returns_input(basic):
    for i, res in enumerate(basic["results"]):
        for got, want in zip(res["alone"], make_inputs(1, i)):
            assert torch.equal(got, want)


def test_two_concurrent_tagged_all_reduces(basic):
    a_in, b_in = [make_inputs(3, i) for i in range(N)], [make_inputs(4, i) for i in range(N)]
    for i, res in enumerate(basic["results"]):
        _check_close(res["cc_a"], _ref(a_in, "mean"), _ring_bound("int8", a_in, "mean"), f"peer {i} cc-a")
        _check_close(res["cc_b"], _ref(b_in, "sum"), _ring_bound("fp16", b_in, "sum"), f"peer {i} cc-b")


def test_reduce_scatter_all_gather_broadcast_send_recv_star(basic):
    inputs = [make_inputs(1, i) for i in range(N)]
    flat_sum = torch.cat([r.reshape(-1) for r in _ref(inputs, "sum")])
    covered = 0
    for i, res in enumerate(basic["results"]):
        rs = res["rs"]
        covered += rs["stop"] - rs["start"]
        assert torch.allclose(rs["values"].double(), flat_sum[rs["start"]:rs["stop"]], atol=1e-4)
        for j in range(N):  # all-gather of per-peer lists, exact raw bytes, int64 included
            ints, halves = res["ag"][j]
            assert torch.equal(ints, torch.arange(j + 2, dtype=torch.int64))
            assert torch.equal(halves, torch.full((j,), float(j)).bfloat16())
        for got, want in zip(res["bc_raw"], inputs[0]):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert float((res["bc_int8"][0] - inputs[0][0]).abs().max()) <= get_codec("int8").error_bound(inputs[0][0])
        prev = (i - 1) % N
        assert torch.equal(res["p2p"][0], torch.arange(6, dtype=torch.int64).reshape(2, 3) * prev)
        assert torch.equal(res["p2p"][1], inputs[prev][1])
        _check_close(res["star_sum"], _ref(inputs, "sum"), 1e-5 * float(flat_sum.abs().max()), f"peer {i} star")
        _check_close(res["star_int8"], _ref(inputs, "mean"), _ring_bound("int8", inputs, "mean"), f"star {i}")
    assert covered == flat_sum.numel()


def test_topology_matrix_and_ring_agree(basic):
    orders = {tuple(res["topology"]["order"]) for res in basic["results"]}
    assert len(orders) == 1 and sorted(next(iter(orders))) == sorted(basic["peers"])
    matrix = basic["results"][0]["topology"]["matrix"]
    assert set(matrix["bandwidth_Bps"]) == set(basic["peers"])
    for a, row in matrix["bandwidth_Bps"].items():
        assert set(row) == set(basic["peers"]) - {a} and all(v > 0 for v in row.values())
    # Ordering itself: the one slow link must not be on the ring.
    peers = ["a", "b", "c", "d"]
    bw = [[0 if i == j else 100.0 for j in range(4)] for i in range(4)]
    bw[0][1] = 1.0  # a -> b is slow
    order = ring_order(LinkMatrix(peers, bw, [[0.0] * 4 for _ in range(4)]))
    assert order[0] == "a" and LinkMatrix(peers, bw, []).bottleneck(order) == 100.0


def test_mismatched_inputs_give_a_clear_error_on_every_peer(basic):
    for res in basic["results"]:
        assert "different tensors" in res["mismatch"], res["mismatch"]


def test_group_rejects_bad_input():
    class FakeHost:  # Group validation needs only a peer id
        peer_id = "me"
    with pytest.raises(CollectiveError):
        Group(FakeHost(), ["a", "b"])
    with pytest.raises(CollectiveError):
        Group(FakeHost(), ["me", "me"])


def _survivor_checks(results: list[dict], survivors: list[int], numel: int, codec: str, children) -> None:
    logs = "\n".join(f"--- peer {i}:\n" + "\n".join(c.lines[-20:]) for i, c in enumerate(children))
    try:
        _check_survivors(results, survivors, numel, codec)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs}") from None


def _check_survivors(results: list[dict], survivors: list[int], numel: int, codec: str) -> None:
    inputs = [big_input(i, numel) for i in survivors]
    ref = _ref(inputs, "mean")[0]
    bound = _ring_bound(codec, inputs, "mean")
    digests = set()
    for i, res in zip(survivors, results):
        assert "result" in res, f"survivor {i} failed: {res.get('error')}"
        assert res["attempts"] >= 2 and len(res["members"]) == len(survivors)
        err = float((res["result"].double() - ref).abs().max())
        assert err <= bound, f"survivor {i}: error {err} > {bound} (not the survivors' average?)"
        assert res["elapsed"] < res["budget"], f"survivor {i} took {res['elapsed']:.1f}s > deadline {res['budget']:.1f}s"
        digests.add(_digest(res["result"]))
    assert len(digests) == 1


@pytest.mark.slow
def test_sigkill_mid_all_reduce_survivors_retry(procs, tmp_path):
    numel, victim = 8 << 20, 2
    opts = {"numel": numel, "codec": "int8", "suicide_index": victim, "sends_before_kill": 3,
            "go2": str(tmp_path / "go2"), "min_peers": 2}
    path, cfg = _config(tmp_path, N, "fault", opts)
    children = _spawn(procs, path, cfg)
    (tmp_path / "go").write_text("go")
    for c in children:
        c.wait_for_line("WARM", timeout=90)
    (tmp_path / "go2").write_text("go")
    survivors = [i for i in range(N) if i != victim]
    for i in survivors:
        children[i].wait_for_line("DONE", timeout=120)
    assert children[victim].wait(timeout=10) == -9  # it really died by SIGKILL mid-operation
    results = [torch.load(tmp_path / f"peer{i}.pt", weights_only=False) for i in survivors]
    _survivor_checks(results, survivors, numel, "int8", children)


@pytest.mark.slow
async def test_stalled_peer_is_dropped_and_survivors_retry(procs, tmp_path):
    numel, victim = 2 << 20, 1
    opts = {"numel": numel, "codec": "int8", "chunk_bytes": 64 * 1024, "go2": str(tmp_path / "go2"),
            "min_peers": 2, "linger_s": 1.0}
    path, cfg = _config(tmp_path, N, "fault", opts)
    async with LinkEmulatorSet() as emus:
        targets = {}
        for i, p in enumerate(cfg["peers"]):
            ip, port = p["listen"].rsplit(":", 1)
            targets[i] = (ip, int(port))
        relays = await emus.mesh(targets, LinkSpec.from_ms(1.0, rate_mbit=16))
        ids = [p["id"] for p in cfg["peers"]]
        cfg["routes"] = {str(a): {ids[b]: relays[a, b].endpoint for b in range(N) if b != a} for a in range(N)}
        children = _spawn(procs, path, cfg)
        (tmp_path / "go").write_text("go")
        await _await_line(children, "WARM", 90)
        (tmp_path / "go2").write_text("go")
        await _await_line(children, "BIG", 30)
        await asyncio.sleep(0.5)  # mid-operation: the all-reduce needs well over a second at 16 Mbit/s
        for (a, b), relay in relays.items():
            if victim in (a, b):
                relay.stall(600)
        await _await_line(children, "DONE", 120)
    survivors = [i for i in range(N) if i != victim]
    results = [torch.load(tmp_path / f"peer{i}.pt", weights_only=False) for i in survivors]
    _survivor_checks(results, survivors, numel, "int8", children)
    stalled = torch.load(tmp_path / f"peer{victim}.pt", weights_only=False)
    assert "error" in stalled, "the stalled peer must get a clear error, not a partial result"


@pytest.mark.fast
def test_result_buffer_is_huge_page_aligned_and_owns_its_memory():
    import gc

    from collectives.buffers import empty_f32
    big = empty_f32(5_000_000, torch.device("cpu"))
    assert big.dtype == torch.float32 and big.shape == (5_000_000,) and big.is_contiguous()
    assert big.data_ptr() % (2 << 20) == 0  # huge pages can back all of it
    view = big[1000:2000]
    del big
    gc.collect()
    view.fill_(3.0)  # the mapping lives as long as any tensor on it
    assert float(view.sum()) == 3000.0
    small = empty_f32(10, torch.device("cpu"))  # small ones: torch's allocator
    assert small.shape == (10,) and small.dtype == torch.float32


@pytest.mark.parametrize("first, later", [(3, 3), ("4", "4"), (True, True), (2**40, 2**40), (1, 2)])
async def test_hostile_chunk_multiplier_is_a_clear_error(first, later):
    """A fresh identity in the ring echoes the victim's own chunk headers back with a forged
    chunk multiplier ``k`` (outside ring.GROWS, of the wrong type, or changed within a shard):
    the victim's all-reduce fails with a CollectiveError that names it, instead of cutting the
    shard on the attacker's grid."""
    from collectives import all_reduce
    from peer.transport import PeerHost

    token = secrets.token_bytes(32)
    async with PeerHost(Identity.generate(), token, conns_per_peer=1) as victim, \
            PeerHost(Identity.generate(), token, conns_per_peer=1) as attacker:
        await victim.start()
        await attacker.start()
        await attacker.connect(victim.address)
        chunk = 64 * 1024  # 4 chunks of the victim's shard, so the forged shard has several
        prefix = "lbc|ar|hostile|0|rs|0|"  # fault.attempt_prefix of the first attempt + ring tag

        async def forge() -> None:
            for c in range(4):
                hdr, payload = await attacker.recv(victim.peer_id, f"{prefix}{c}", timeout=20)
                k = first if c == 0 else later
                await attacker.send(victim.peer_id, f"{prefix}{c}", {**hdr, "k": k}, payload)

        forger = asyncio.create_task(forge())
        with pytest.raises(CollectiveError, match="chunk multiplier|chunk size within a shard"):
            await all_reduce(Group(victim, sorted([victim.peer_id, attacker.peer_id])),
                             [torch.ones(8 * chunk // 4)], tag="hostile", codec="fp32",
                             chunk_bytes=chunk, timeout=20)
        forger.cancel()
