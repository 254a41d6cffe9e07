"""Tensor split combined with the pipeline split, real processes over real TCP: blocks 0:15 of
SmolLM2-135M (9 query / 3 KV heads) served by a 3-way tensor-split group (`peer join --serve
"smollm2-135m,tp=g:RANK/3" --blocks 0:15`), blocks 15:30 by a plain stage server. Logits must
match the single-process model within 1e-4. A follower takes steps only from the leader the
coordinator's table names: another admitted peer that claims to lead is refused, and the group
keeps serving."""
from __future__ import annotations

import asyncio

import pytest
import torch

from peer.errors import RemoteError
from peer.membership import PeerInfo
from pipeline.model import Llama, LlamaConfig
from pipeline.protocol import STATS_KEY, TP_STEP, Span, TensorSplitSpec, pack_tensor
from pipeline.server import Session, StageServer
from pipeline.tensor_split import TensorSplitFollower, group_ranks, named_group, shard_model
from tests.harness import Procs, reference_model, start_coordinator, wait_until

TOKEN = "tensor-split-test-token-13c89251be5b9ff77b3186af9e2d8581cdcdd2e1"
MODEL = "smollm2-135m"
K = 3
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("tied", [True, False])
def test_shards_sum_to_the_whole_model(tied):
    """In one process: K shards' partial embeddings, block updates and logits, summed, equal the
    unsplit model's (embedding and logits exactly: one shard's value plus zeros)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=72, n_layers=2, n_heads=9, n_kv_heads=3, hidden_dim=96, max_seq_len=32,
                      tie_embeddings=tied)
    full = Llama(cfg).eval()
    shards = [shard_model(full, r, K) for r in range(K)]
    assert shards[1].blocks["0"].q.weight.shape[0] == cfg.dim // K
    whole = sum(p.numel() for p in full.parameters())
    for s in shards:  # about 1/K of every weight, embedding and head included
        assert abs(sum(p.numel() for p in s.parameters()) / whole - 1 / K) < 0.02
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(sum(s.embed(ids) for s in shards), full.embed(ids))
        x = torch.randn(2, 3, cfg.dim)
        assert torch.allclose(sum(s.head(x) for s in shards), full.head(x), atol=1e-6)
    h = torch.randn(1, 5, cfg.dim)
    ctx = full.context(h, None, None)
    with torch.no_grad():
        for i in range(cfg.n_layers):
            want = full.blocks[str(i)](h, ctx)
            attn = sum(s.blocks[str(i)].attn_partial(h, ctx, None) for s in shards)
            mid = h + attn
            got = mid + sum(s.blocks[str(i)].mlp_partial(mid) for s in shards)
            assert torch.allclose(got, want, atol=1e-5)
            h = want
    with pytest.raises(ValueError, match="divide"):
        shard_model(full, 0, 2)


def _row(peer_id: str, rank: int, joined: float, members=None, state="active", model="m", blocks=(0, 4)) -> PeerInfo:
    tp = {"group": "g", "rank": rank, "k": 3, **({"members": members} if members else {})}
    return PeerInfo(peer_id, "127.0.0.1:1", state, joined_at=joined,
                    stats={STATS_KEY: {"model": model, "blocks": list(blocks), "tp": tp}})


@pytest.mark.fast
def test_group_membership_comes_from_the_table():
    """Each rank goes to the peer that joined first; a later key claiming rank 0 (or a leader
    whose member list leaves us out) does not name the group."""
    tp, span = TensorSplitSpec("g", 1, 3), Span(0, 4)
    rows = [_row("lead", 0, 10.0, ["lead", "f1", "f2"]), _row("f1", 1, 11.0), _row("f2", 2, 12.0),
            _row("usurper", 0, 50.0, ["usurper", "f1", "f2"]), _row("late-f1", 1, 60.0),
            _row("other-model", 0, 1.0, model="x"), _row("other-span", 0, 1.0, blocks=(0, 3)),
            _row("dead", 0, 1.0, state="dead")]
    assert {r: p for r, (p, _) in group_ranks(rows, tp, "m", span).items()} == {0: "lead", 1: "f1", 2: "f2"}
    assert named_group(rows, tp, "m", span, "f1") == ("lead", ("lead", "f1", "f2"))
    assert named_group(rows, tp, "m", span, "late-f1") is None
    # The leader gone from the table, the next rank-0 claimant by join time leads (the follower
    # then frees the old group's sessions: test_follower_resets_when_the_group_changes).
    assert named_group(rows[1:], tp, "m", span, "f1") == ("usurper", ("usurper", "f1", "f2"))
    assert named_group([_row("lead", 0, 10.0)], tp, "m", span, "f1") is None  # not formed yet


@pytest.mark.fast
def test_follower_resets_when_the_group_changes():
    cfg = LlamaConfig.tiny(vocab_size=64, max_seq_len=64)
    server = StageServer(None, "m", Llama(cfg), Span(0, cfg.n_layers), None)
    follower = TensorSplitFollower(server, lookup=None)
    follower.adopt(("lead", ("lead", "me")))
    server.sessions[("client", "s1", 0)] = Session(0, cfg.n_layers, 8, None)
    follower.adopt(("lead", ("lead", "me")))                           # same group: sessions kept
    assert len(server.sessions) == 1
    follower.adopt(("lead2", ("lead2", "me")))                         # a new leader: freed
    assert server.sessions == {} and follower.leader == "lead2"
    server.sessions[("client", "s2", 0)] = Session(0, cfg.n_layers, 8, None)
    follower.adopt(None)                                               # no group: freed, nobody leads
    assert server.sessions == {} and follower.leader is None
    server.executor.shutdown()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("tp")
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        serve = {f"tp{r}": (f"{MODEL},tp=g:{r}/{K}", "0:15") for r in range(K)}
        serve["tail"] = (MODEL, "15:30")
        children = {name: procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                                       "--listen", "127.0.0.1:0", "--key", str(tmp / f"{name}.key"),
                                       "--device", "cpu", "--serve", arg, "--blocks", blocks, wait_ready=False)
                    for name, (arg, blocks) in serve.items()}
        yield url, children
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def reference():
    from pipeline.generate import generate

    model, tok = reference_model()
    ids = tok.encode(tok.apply_chat_template(PROMPT))
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0, -1]
    return {"ids": ids, "logits": logits, "text": generate(model, tok, PROMPT, 12),
            "span_params": model.embedding.weight.numel()
            + sum(p.numel() for i in range(15) for p in model.blocks[str(i)].parameters())}


@pytest.fixture(scope="module")
def client(swarm, reference):
    from pipeline.client import InferenceClient

    url, children = swarm
    for child in children.values():
        child.wait_for_line("READY ", timeout=240)
    c = InferenceClient(url, TOKEN)
    # Entry points: the group's leader (once it found its shards) and the tail server.
    wait_until(lambda: len(c.call(c.servers, MODEL)) == 2, 60, "the tensor-split group to form")
    yield c
    c.close()


def test_follower_refuses_a_self_named_leader(swarm, client):
    """An admitted peer (open/token admission grants the serve role) that sends a shard a step
    naming itself leader is refused: the coordinator's table names the group's leader."""
    url, children = swarm
    follower = children["tp1"].ready

    async def attack() -> str:
        from pipeline.client import InferenceClient

        attacker = InferenceClient(url, TOKEN)
        try:
            host = await attacker.connect()
            host.add_route(follower["peer_id"], follower["address"])
            meta, raw = pack_tensor(torch.ones((1, 1), dtype=torch.long))
            header = {**meta, "owner": "victim", "sid": "s", "start": 0, "end": 15, "pos": 0, "chunks": [1],
                      "capacity": 4, "pad": [0], "input": "tokens", "out": "hidden", "wire": "fp32",
                      "members": [host.peer_id, follower["peer_id"]], "prefix": "tp-evil-0"}
            with pytest.raises(RemoteError) as e:
                await host.call(follower["peer_id"], TP_STEP, header, raw, timeout=30)
            return str(e.value)
        finally:
            await attacker.aclose()

    assert "named by the coordinator" in asyncio.run(attack())


def test_tensor_split_stage_matches_single_process_logits(client, reference):
    logits = client.call(client.alogits, MODEL, reference["ids"])
    diff = (logits - reference["logits"]).abs().max().item()
    print(f"max |logit diff| tensor split K={K} + pipeline vs single process: {diff:.2e}")
    assert diff < 1e-4


def test_tensor_split_generation_and_sessions(client, reference, swarm):
    assert client.generate(MODEL, PROMPT, 12) == reference["text"]
    assert [(a, b) for _, a, b in client.last_route] == [(0, 15), (15, 30)]
    where = {child.ready["peer_id"]: child.ready["address"] for child in swarm[1].values()}
    infos = {name: client.call(client.server_info, child.ready["peer_id"], child.ready["address"])
             for name, child in swarm[1].items()}
    # Each shard holds about 1/K of the span's weights: blocks and (vocab-split) embedding.
    for r in range(K):
        assert abs(infos[f"tp{r}"]["params"] / reference["span_params"] - 1 / K) < 0.01
    assert infos["tp0"]["tp"]["members"][0] == swarm[1]["tp0"].ready["peer_id"]
    wait_until(lambda: all(client.call(client.server_info, pid, a)["sessions"] == 0 for pid, a in where.items()), 15,
               "every shard's session to be released")
