"""Data that grows with the swarm (issue 16 item 3): no two peers are handed the same batch at
any swarm size, and pseudo-gradients are averaged weighted by what each peer trained on.

- Data plans come from the real coordinator app (in-process aiohttp on 127.0.0.1, fake clock,
  real signed requests through diloco.run_client.RunClient), for a run whose initial shard
  count (``data_shards``) is smaller than the number of live peers, with peers joining and
  leaving between windows and an offline step reported afterwards. The batches are then drawn
  with ``diloco.data.RunBatches`` (in-process trainers' data).
- The weighted average runs over real PeerHosts on loopback (``diloco.weighted``) and in the
  in-process ``LocalGroup``; both are checked against the hand-computed sum(w*d)/sum(w).
"""
from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
import torch

from collectives import Group
from diloco.averager import LocalGroup, weighted_mean
from diloco.data import RunBatches
from diloco.errors import AveragingError, DataError
from diloco.weighted import weighted_all_reduce
from peer.dataplan import DataLease, DataPlan, DataPlanError
from peer.identity import Identity
from peer.transport import PeerHost
from tests.test_runs_api import coord  # noqa: F401 (fixture: the real coordinator app)

CONFIG = {"preset": "micro", "inner_steps": 3, "sync_timeout_s": 2.0, "checkpoint_every": 0,
          "data_shards": 2}
H0 = "0" * 64
TOKEN = b"shards-test-token-9c1f2b7a4e6d"


# -- data plans from the coordinator --------------------------------------------------------------
def _disjoint(leases: list[tuple[str, DataLease]]) -> None:
    ordered = sorted(leases, key=lambda x: x[1].start)
    for (p, a), (q, b) in itertools.pairwise(ordered):
        assert a.end <= b.start, f"{p[:8]} {a} overlaps {q[:8]} {b}"


async def test_more_live_peers_than_shards_never_share_a_batch(coord):  # noqa: F811
    async def join():
        client, answer = await coord.peer(CONFIG)
        handed.append((client.identity.peer_id,
                       DataPlan.from_json(answer["data"], [client.identity.peer_id])
                       .lease(client.identity.peer_id)))
        return client, answer

    async def window(step: int, peers) -> list[str]:
        answers = await asyncio.gather(*(p.sync("r", step, H0, deadline_s=20) for p in peers))
        participants = answers[0]["participants"]
        for p, a in zip(peers, answers):
            assert a["participant"] and a["participants"] == participants
            plan = DataPlan.from_json(a["data"], participants)
            lease = plan.lease(p.identity.peer_id)
            assert lease.count == CONFIG["inner_steps"]
            handed.append((p.identity.peer_id, lease))
            last[p.identity.peer_id] = plan
        return participants

    handed: list[tuple[str, DataLease]] = []
    last: dict[str, DataPlan] = {}
    joined = [await join() for _ in range(5)]           # 5 live peers, 2 initial shards
    peers = [c for c, _ in joined]
    assert len({a["slot"] for _, a in joined}) == 5     # legacy slots: never shared either
    await window(1, peers)
    more = [await join() for _ in range(2)]             # peers join between windows
    await peers[0].leave_run("r")                       # and one leaves
    peers = peers[1:] + [c for c, _ in more]
    participants = await window(2, peers)
    assert len(participants) == 6
    # An offline step: the peers derive the next plan from the last one, train, and report.
    plan = last[peers[0].identity.peer_id].then(participants)
    for p in peers:
        lease = plan.lease(p.identity.peer_id)
        handed.append((p.identity.peer_id, lease))
        await p.report("r", 3, H0, {"data_position": lease.end})
    late, _ = await join()                              # joins after the outage: no overlap
    await window(4, peers)
    _disjoint(handed)
    assert len(handed) == 5 + 5 + 2 + 6 + 6 + 1 + 6

    # The batches those numbers name: in-process trainers' streams never share a window within
    # an epoch, and a whole epoch covers every window once.
    tokens = np.arange(16 * 40 + 1, dtype=np.int64)    # 40 windows of 16+1 tokens, 10 batches of 4
    seen: dict[tuple[int, int], str] = {}
    for peer, lease in handed:
        data = RunBatches(tokens, 16, 4, seed=3)
        data.assign(lease)
        while data.remaining:
            g = data.position
            inputs, targets = data.next_batch()
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            for w in data.window_ids(g):
                key = (g // data.batches_per_epoch, int(w))
                assert key not in seen, f"window {key} trained by {seen[key][:8]} and {peer[:8]}"
                seen[key] = peer
        with pytest.raises(DataError, match="no batches left"):
            data.next_batch()
    stream = RunBatches(tokens, 16, 4, seed=3)
    epoch = np.concatenate([stream.window_ids(g) for g in range(10)])
    assert sorted(epoch.tolist()) == list(range(40))
    summary = await peers[0].run_info("r")
    assert summary["data_cursor"] == max(lease.end for _, lease in handed)
    for p in peers + [joined[0][0], late]:
        await p.close()


async def test_a_report_cannot_run_the_cursor_off_the_end(coord):  # noqa: F811
    a, answer = await coord.peer(CONFIG)
    await a.report("r", 1, H0, {"data_position": 1e300})
    summary = await a.run_info("r")
    # moved, but only by a bounded amount (members x inner_steps x MAX_OFFLINE_STEPS)
    assert answer["data"]["count"] < summary["data_cursor"] <= 3 + 3 * 10_000
    b, again = await coord.peer(CONFIG)
    assert again["data"]["base"] == summary["data_cursor"]
    await a.close()
    await b.close()


def test_data_plan_schema_refuses_bad_input():
    plan = DataPlan(10, 4, ("a", "b", "c"))
    assert plan.lease("c") == DataLease(18, 4) and plan.end == 22
    assert plan.then(["b"]).lease("b") == DataLease(22, 4)
    for bad in ({"base": -1, "count": 4}, {"base": 0, "count": 0}, {"base": True, "count": 4},
                {"base": 0}, {"base": 0, "count": 4, "x": 1}, [0, 4], {"base": 2**62, "count": 1}):
        with pytest.raises(DataPlanError):
            DataPlan.from_json(bad, ["a"])
    with pytest.raises(DataPlanError, match="not in this data plan"):
        plan.lease("z")
    with pytest.raises(DataPlanError, match="distinct"):
        DataPlan(0, 1, ("a", "a"))


# -- weighted average ------------------------------------------------------------------------------
def _inputs(n: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [[torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen)] for _ in range(n)]


def _by_hand(inputs, weights) -> list[torch.Tensor]:
    total = sum(weights)
    return [sum(w * x[i].double() for w, x in zip(weights, inputs)) / total for i in range(2)]


def test_local_group_weighted_mean_is_the_hand_computed_one():
    inputs, weights = _inputs(3), [3.0, 1.0, 0.0]
    group = LocalGroup(3)
    futs = [group.averager(r).start(inputs[r], "t", weight=weights[r]) for r in range(3)]
    results = [f.result(10) for f in futs]
    want = _by_hand(inputs, weights)
    for res in results:
        assert res.total_weight == 4.0
        for got, exp, first in zip(res, want, results[0]):
            assert torch.equal(got, first)
            assert torch.allclose(got.double(), exp, rtol=1e-6, atol=1e-7)
    # fp32 products summed in rank order, divided once: exactly weighted_mean
    assert all(torch.equal(a, b) for a, b in zip(results[0], weighted_mean(inputs, weights)))
    # weight 1 everywhere is the plain mean, bit for bit
    plain = LocalGroup(3)
    futs = [plain.averager(r).start(inputs[r], "t") for r in range(3)]
    ones = [plain.averager(r).start(inputs[r], "u", weight=1) for r in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(futs[0].result(10), ones[0].result(10)))
    with pytest.raises(AveragingError, match="weight"):
        LocalGroup(1).averager(0).start(inputs[0], "v", weight=float("nan")).result(10)


@pytest.fixture
async def hosts():
    made = [PeerHost(Identity.generate(), TOKEN) for _ in range(4)]
    try:
        addresses = [await h.start("127.0.0.1", 0) for h in made]
        for i, h in enumerate(made):
            for j in range(i + 1, len(made)):
                await h.connect(addresses[j], made[j].peer_id)
        yield made
    finally:
        for h in made:
            await h.close()


async def test_weighted_average_over_loopback_peers_is_the_hand_computed_one(hosts):
    members = sorted(h.peer_id for h in hosts)
    hosts = sorted(hosts, key=lambda h: h.peer_id)
    inputs = _inputs(4)
    # 20 and 5 batches trained, a joiner's zeros (weight 0), and a liar claiming 1000 (cap 20)
    inputs[2] = [torch.zeros_like(t) for t in inputs[2]]
    claimed, counted = [20.0, 5.0, 0.0, 1000.0], [20.0, 5.0, 0.0, 20.0]
    results = await asyncio.wait_for(asyncio.gather(*(
        weighted_all_reduce(Group(h, members), inputs[i], claimed[i], tag="w1", cap=20.0,
                            codec="fp32") for i, h in enumerate(hosts))), 60)
    want = _by_hand(inputs, counted)
    for res in results:
        assert res.total == 45.0 and res.weights == dict(zip(members, counted))
        assert list(res.reduced.members) == members
        for got, exp, first in zip(res.tensors, want, results[0].tensors):
            assert torch.equal(got, first)                     # bit-identical on every peer
            assert torch.allclose(got.double(), exp, rtol=1e-5, atol=1e-6)
    # Quantized on the wire (int8), still bit-identical everywhere and close to the truth.
    results = await asyncio.wait_for(asyncio.gather(*(
        weighted_all_reduce(Group(h, members), inputs[i], counted[i], tag="w2", cap=20.0,
                            codec="int8") for i, h in enumerate(hosts))), 60)
    for res in results:
        for got, exp, first in zip(res.tensors, want, results[0].tensors):
            assert torch.equal(got, first)
            assert torch.allclose(got.double(), exp, atol=0.05)
    # Every weight 0: zeros, never NaN.
    results = await asyncio.wait_for(asyncio.gather(*(
        weighted_all_reduce(Group(h, members), inputs[i], 0.0, tag="w3", cap=20.0, codec="fp32")
        for i, h in enumerate(hosts))), 60)
    assert all(not t.any() for res in results for t in res.tensors)


async def test_weighted_robust_average_clamps_weights_so_no_honest_peer_is_excluded(hosts):
    from collectives import RobustConfig

    members = sorted(h.peer_id for h in hosts)
    hosts = sorted(hosts, key=lambda h: h.peer_id)
    gen = torch.Generator().manual_seed(3)
    # large enough that every shard owner screens norm and direction (RobustConfig.min_numel)
    base = [torch.randn(32, 64, generator=gen), torch.randn(512, generator=gen)]
    inputs = [[b + 0.1 * torch.randn(b.shape, generator=gen) for b in base] for _ in range(4)]
    # a fast peer trained 10x the batches of the others: its term would be ~10x their norm and
    # be screened out as poisoned; clamped to 2x the median weight it is averaged in
    claimed, counted = [20.0, 2.0, 2.0, 2.0], [4.0, 2.0, 2.0, 2.0]
    results = await asyncio.wait_for(asyncio.gather(*(
        weighted_all_reduce(Group(h, members), inputs[i], claimed[i], tag="r1", cap=20.0,
                            codec="fp32", robust=RobustConfig()) for i, h in enumerate(hosts))), 60)
    want = _by_hand(inputs, counted)
    for res in results:
        assert not res.reduced.offenders and res.total == 10.0
        for got, exp, first in zip(res.tensors, want, results[0].tensors):
            assert torch.equal(got, first)
            assert torch.allclose(got.double(), exp, rtol=1e-5, atol=1e-6)
