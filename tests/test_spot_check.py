"""Inference spot checks over real processes and real TCP: a coordinator and `peer join --serve`
stage servers of a tiny 6-block model: blocks 0:3 on two honest servers and one liar (scales its
activations; tests/serving_child.py), blocks 3:6 on two honest servers. With
``InferenceClient(spot_check=1)`` the greedy output must equal single-process
``pipeline.generate`` while the liar is caught, avoided and reported to the coordinator; no
honest server may be blamed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from peer.identity import Identity
from peer.membership import signing_bytes
from pipeline.client import Hop, InferenceClient, _Session, outputs_agree, outvoted
from tests.harness import ROOT, Procs, start_coordinator, wait_until

TOKEN = "spot-check-token"
PROMPT = "w1 w2 w3 w4"
NEW = 8
SPANS = {"head1": "0:3", "head2": "0:3", "liar": "0:3", "tail1": "3:6", "tail2": "3:6"}


def write_tiny_model(folder: Path) -> None:
    """A random 6-block llama as a Hugging Face folder, with a word-level tokenizer ("w0".."w63";
    "w63" ends a completion) so text prompts work end to end."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline.loading import _hf_name
    from pipeline.model import Llama, LlamaConfig

    cfg = LlamaConfig.tiny(vocab_size=64, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(cfg)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings}))
    # tied embeddings: lm_head.weight maps to the embedding's name, holding the same values
    save_file({_hf_name(k, cfg): v.contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w63"}))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("spot")
    model = tmp / "tiny"
    write_tiny_model(model)
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        servers = {}
        for name, span in SPANS.items():
            join = ["--coordinator", url, "--token", TOKEN, "--listen", "127.0.0.1:0", "--key",
                    str(tmp / f"{name}.key"), "--device", "cpu", "--serve", str(model), "--blocks", span]
            servers[name] = procs.python(*(["tests/serving_child.py", "liar"] if name == "liar"
                                           else ["-m", "peer.cli", "join"]), *join, wait_ready=False)
        for child in servers.values():
            child.wait_for_line("READY ", timeout=120)
        yield url, {name: child.ready["peer_id"] for name, child in servers.items()}, str(model)
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def reference(swarm) -> str:
    """The single-process greedy completion (the oracle)."""
    from pipeline.generate import generate
    from pipeline.loading import load_model
    from pipeline.tokenizer import Tokenizer

    return generate(load_model(swarm[2]), Tokenizer.from_file(swarm[2]), PROMPT, NEW)


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/status", timeout=10) as r:
        return json.loads(r.read())


def test_verdict_rule_and_tolerance():
    a = torch.linspace(-2.0, 2.0, 8)
    near, far = a + 1e-3, a * 1.1
    assert outputs_agree(a, near, 1e-3) and not outputs_agree(a, far, 1e-3)
    assert not outputs_agree(a, None, 1e-3) and not outputs_agree(a, a[:4], 1e-3)
    assert not outputs_agree(a, torch.full_like(a, float("nan")), 1e-3)
    assert outvoted({"p": a, "c": near}, 1e-3) == set()
    assert outvoted({"p": far, "c": a}, 1e-3) == {"p", "c"}          # no referee: both distrusted
    assert outvoted({"p": far, "c": a, "r": near}, 1e-3) == {"p"}     # the primary lied
    assert outvoted({"p": a, "c": None, "r": a}, 1e-3) == {"c"}       # the checker lied
    assert outvoted({"p": a, "c": far, "r": a * 2}, 1e-3) == {"p", "c", "r"}
    ids = torch.tensor([5, 40000, 7])  # greedy token ids: equal or not, no tolerance
    assert outputs_agree(ids, ids.clone(), 1e-3)
    assert not outputs_agree(ids, ids + torch.tensor([0, 1, 0]), 1e-3)
    assert not outputs_agree(ids, ids.float(), 1e-3)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="spot_check"):
            InferenceClient("http://127.0.0.1:1", TOKEN, spot_check=bad)


def test_liar_is_caught_avoided_and_reported(swarm, reference):
    url, ids, model = swarm
    liar = ids["liar"]
    client = InferenceClient(url, TOKEN, spot_check=1.0)
    try:
        wait_until(lambda: len(client.call(client.servers, model)) == len(SPANS), 60, "every announcement")
        # Each step's head hop is checked by a random other head server: the liar serves or checks
        # it with probability >= 1/2 per step, so a few generations catch it (miss odds < 2^-40).
        for _ in range(5):
            assert client.generate(model, PROMPT, NEW) == reference
            assert client.last_checks > 0
            if liar in client.untrusted:
                break
        assert set(client.untrusted) == {liar}, "the liar, and only the liar, is distrusted"
        assert client.generate(model, PROMPT, NEW) == reference
        assert liar not in {peer for peer, _, _ in client.last_route}

        def reported() -> list:
            return [(e["peer_id"], e["detail"]["blocks"]) for e in status(url)["events"]
                    if e["kind"] == "inference_offense" and e["detail"]["reporter"] == client.identity.peer_id]

        assert wait_until(reported, 10, "the offense report") == [(liar, [0, 3])]
    finally:
        client.close()


def test_liar_on_the_route_is_evicted_and_its_step_redone(swarm, reference):
    """The liar put on a session's route by hand: the first step's check outvotes it, its span
    moves to an honest server, the later hop is rebuilt, and the tokens are the honest ones."""
    url, ids, model = swarm
    client = InferenceClient(url, TOKEN, spot_check=1.0)

    async def generate_through_liar() -> tuple[str, _Session]:
        tok = await client.tokenizer(model)
        servers, _ = await client.candidates(model)
        session = _Session(client, model, servers, 64)
        await session.open()
        session.route[0] = Hop(next(s for s in servers if s.peer_id == ids["liar"]), 0, 3)
        out: list[int] = []
        try:
            logits = await session.step(torch.tensor([tok.encode(PROMPT)]))
            while len(out) < NEW and (t := int(logits.argmax())) != tok.eos_id:  # greedy, as generate()
                out.append(t)
                logits = await session.step(torch.tensor([[t]]))
        finally:
            await session.close()
        return tok.decode(out), session

    try:
        text, session = client.call(generate_through_liar)
        assert text == reference
        assert set(client.untrusted) == {ids["liar"]} and session.failovers == 1
        assert session.route[0].server.peer_id in (ids["head1"], ids["head2"])
    finally:
        client.close()


def test_offense_reports_are_signed_and_checked(swarm):
    """POST /api/inference/offenses takes only a well-formed report signed by the key it carries."""
    url, ids, _ = swarm
    reporter = Identity.generate()

    def post(body: dict, token: str = TOKEN) -> tuple[int, dict]:
        req = urllib.request.Request(url + "/api/inference/offenses", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def signed(offender: str) -> dict:
        body = {"peer_id": reporter.peer_id, "public_key": reporter.public_bytes.hex(), "timestamp": time.time(),
                "offender": offender, "detail": {"blocks": [3, 6]}}
        return {**body, "signature": reporter.sign(signing_bytes("inference_offense", body)).hex()}

    body = signed(ids["tail1"])
    assert post(body, "wrong-token")[0] == 401
    status_code, answer = post({**body, "offender": ids["tail2"]})  # not what was signed
    assert (status_code, answer["error"]) == (403, "bad_signature")
    assert post(signed("not-a-peer-id"))[0] == 400
    assert post(body) == (200, {"recorded": True})
    assert any(e["kind"] == "inference_offense" and e["detail"]["reporter"] == reporter.peer_id
               for e in status(url)["events"])


def test_peer_generate_spot_check_flag(swarm, reference):
    url, _, model = swarm
    cmd = [sys.executable, "-m", "peer.cli", "generate", "--coordinator", url, "--token", TOKEN,
           "--model", model, "--max-new-tokens", str(NEW)]
    run = subprocess.run([*cmd, "--spot-check", "1", PROMPT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference + "\n"
    run = subprocess.run([*cmd, "--spot-check", "2", PROMPT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and "probability" in run.stderr
