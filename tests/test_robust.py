"""Robust all-reduce (collectives.robust): poisoned contributions are caught at the shard owners,
excluded, attributed to the sender's peer id on every peer, and results stay bit-identical.

The screening and aggregation rules are checked in-process on crafted rows; the protocol runs on
4 real peers (separate processes, real TCP on 127.0.0.x), one of which (index 2) is malicious.
This file is also the peers' child script: it adds a 'poison' scenario to
tests/collective_child.py and runs that child's main.
"""
from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectives import CollectiveError, Group, RobustConfig, all_reduce  # noqa: E402
from collectives.robust import aggregate, coordinate_median, screen, sorted_rows  # noqa: E402
from testing.poison import install_payload_poisoner  # noqa: E402
from tests import collective_child  # noqa: E402
from tests.test_collectives import _config  # noqa: E402

N = 4
BAD = 2  # index of the malicious peer
SHAPES = [(3000,), (41, 13)]
# case -> (what the malicious peer does, codec, RobustConfig kwargs, expected offense code or None)
CASES = {
    "clean": (None, "fp32", {}, None),
    "nan": ("crafted-nan", "fp32", {}, "undecodable"),
    "huge": ("huge", "fp32", {}, "norm"),
    "flip": ("flip", "fp32", {}, "direction"),
    "abstain": ("nan-input", "fp32", {}, "non-finite"),
    "huge_int8": ("huge", "int8", {}, "norm"),
    "trimmed": ("huge", "fp32", {"detect": False, "aggregate": "trimmed_mean"}, None),
}


def honest_inputs(index: int) -> list[torch.Tensor]:
    """A shared signal plus per-peer noise: honest updates that broadly agree (like pseudo-
    gradients of one model on different data shards)."""
    out = []
    for k, shape in enumerate(SHAPES):
        signal = torch.randn(shape, generator=torch.Generator().manual_seed(100 + k))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * index + k))
        out.append(signal + 0.5 * noise)
    return out


def sent_inputs(case: str, index: int) -> list[torch.Tensor]:
    xs = honest_inputs(index)
    attack = CASES[case][0]
    if index != BAD or attack is None:
        return xs
    if attack == "huge":
        return [x * 1e6 for x in xs]
    if attack == "flip":
        return [-x for x in xs]
    if attack == "nan-input":
        xs[1][3, 4] = float("nan")
    return xs


# ----------------------------------------------------------------------------- child side
async def scenario_poison(group: Group, index: int, opts: dict) -> dict:
    out: dict = {"members": group.members}
    for case, (attack, codec, kwargs, _) in CASES.items():
        hooked: list = []
        cfg = RobustConfig(on_offender=lambda peer, reason: hooked.append((peer, reason)), **kwargs)
        honest_again = install_payload_poisoner(group.host) if attack == "crafted-nan" and index == BAD else None
        t0 = time.monotonic()
        res = await all_reduce(group, sent_inputs(case, index), tag=case, codec=codec, robust=cfg)
        if honest_again is not None:
            honest_again()
        out[case] = {"result": list(res), "offenders": [(o.peer, o.code) for o in res.offenders],
                     "hooked": hooked, "seconds": time.monotonic() - t0}
    return out


# ----------------------------------------------------------------------------- in-process rules
def _rows(k: int = 4, numel: int = 500) -> torch.Tensor:
    signal = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    return torch.stack([signal + 0.5 * torch.randn(numel, generator=torch.Generator().manual_seed(i + 1))
                        for i in range(k)])


@pytest.mark.parametrize("attack, code", [("nan", "non-finite"), ("inf", "non-finite"), ("huge", "norm"),
                                          ("flip", "direction")])
def test_screen_names_the_poisoned_row_only(attack, code):
    rows = _rows()
    rows[BAD] = {"nan": rows[BAD].clone().fill_(float("nan")), "inf": rows[BAD].clone().fill_(float("inf")),
                 "huge": rows[BAD] * 1e3, "flip": -rows[BAD]}[attack]
    bad = screen(rows, RobustConfig())
    assert list(bad) == [BAD] and bad[BAD][0] == code


def test_screen_absolute_bounds_and_honest_majority_rule():
    rows = _rows()
    assert screen(rows, RobustConfig()) == {}  # no false positive on honest, noisy rows
    assert set(screen(rows, RobustConfig(max_abs=1e-3))) == {0, 1, 2, 3}
    assert screen(rows, RobustConfig(max_norm=1e-3))[0][0] == "bound"
    two = _rows(2)
    two[1] = -two[1] * 100
    assert screen(two, RobustConfig()) == {}  # two peers: no majority to tell who lies
    short = _rows(4, 8)
    short[BAD] = -short[BAD]
    assert screen(short, RobustConfig()) == {}  # too few values for a meaningful cosine
    assert list(screen(short, RobustConfig(min_numel=8))) == [BAD]


def test_robust_aggregators_bound_an_outlier():
    rows = _rows(5)
    honest_mean = rows[:4].mean(dim=0)
    rows[4] = rows[4] * 1e6
    spread = float((rows[:4] - honest_mean).norm(dim=1).max())
    for agg in ("trimmed_mean", "centered_clip"):
        est = aggregate(rows, RobustConfig(detect=False, aggregate=agg))
        assert float((est - honest_mean).norm()) < spread, agg
    assert torch.equal(coordinate_median(torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0], [9.0, 1.0]])),
                       torch.tensor([2.5, 0.5]))


def test_sorting_network_matches_torch_sort():
    for k in (1, 2, 3, 4, 5, 8, 17):
        x = torch.randn(k, 300, generator=torch.Generator().manual_seed(k))
        assert torch.equal(torch.stack(sorted_rows(x)), x.sort(dim=0).values), k


def test_config_errors_are_typed():
    for bad in ({"aggregate": "median-ish"}, {"norm_factor": 1.0}, {"norm_factor": float("inf")},
                {"min_cosine": 2.0}, {"max_abs": 0.0}, {"trim": -1}, {"clip_iters": 0}, {"min_numel": 0}):
        with pytest.raises(CollectiveError):
            RobustConfig(**bad)


async def test_robust_needs_mean_and_a_config():
    from peer.identity import Identity
    from peer.transport import PeerHost

    host = PeerHost(Identity.generate(), b"t" * 16)
    group = Group(host, [host.peer_id])
    with pytest.raises(CollectiveError):
        await all_reduce(group, [torch.ones(3)], tag="x", op="sum", robust=RobustConfig())
    with pytest.raises(CollectiveError):
        await all_reduce(group, [torch.ones(3)], tag="x", robust={"aggregate": "mean"})


# ----------------------------------------------------------------------------- 4 real peers
@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    from tests.harness import Procs

    tmp = tmp_path_factory.mktemp("robust")
    procs = Procs()
    try:
        path, cfg = _config(tmp, N, "poison", {"linger_s": 2.0})
        path.write_text(__import__("json").dumps(cfg))
        children = [procs.python(__file__, str(path), str(i), ready_timeout=90) for i in range(N)]
        (tmp / "go").write_text("go")
        for c in children:
            c.wait_for_line("DONE", timeout=120)
        return {"results": [torch.load(tmp / f"peer{i}.pt", weights_only=False) for i in range(N)],
                "peers": [p["id"] for p in cfg["peers"]]}
    finally:
        procs.cleanup()


def _digest(ts: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _reference(case: str) -> list[torch.Tensor]:
    if case == "trimmed":  # trimmed mean over all four (no exclusion), trim 1 of each end
        rows = [sent_inputs(case, i) for i in range(N)]
        return [torch.stack([r[k] for r in rows]).sort(dim=0).values[1:3].double().mean(dim=0)
                for k in range(len(SHAPES))]
    peers = [i for i in range(N) if CASES[case][3] is None or i != BAD]
    return [sum(sent_inputs(case, i)[k].double() for i in peers) / len(peers) for k in range(len(SHAPES))]


@pytest.mark.parametrize("case", list(CASES))
def test_result_is_the_honest_aggregate_bit_identical_everywhere(poisoned, case):
    results = [r[case]["result"] for r in poisoned["results"]]
    assert len({_digest(r) for r in results}) == 1, f"{case}: peers disagree"
    tol = 0.05 if CASES[case][1] == "int8" else 1e-5  # int8: two quantizations of values |x| < ~4
    for got, ref in zip(results[0], _reference(case)):
        assert float((got.double() - ref).abs().max()) <= tol, case


@pytest.mark.parametrize("case", list(CASES))
def test_offender_reported_by_id_and_reason_on_every_peer(poisoned, case):
    code = CASES[case][3]
    expected = [] if code is None else [(poisoned["peers"][BAD], code)]
    for i, r in enumerate(poisoned["results"]):
        assert r[case]["offenders"] == expected, f"peer {i}"
        assert [p for p, _ in r[case]["hooked"]] == [p for p, _ in expected], f"peer {i} hook"
        assert all(reason.startswith(code) for _, reason in r[case]["hooked"])


if __name__ == "__main__":
    collective_child.SCENARIOS["poison"] = scenario_poison
    asyncio.run(collective_child.main(sys.argv[1], int(sys.argv[2])))
