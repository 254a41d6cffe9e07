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

import pytest
import torch

from peer.membership import CoordinatorError, error_code, sync_exchange
from pipeline.client import Hop, InferenceClient, _Session, outputs_agree, outvoted
from testing.api import SignedApi, operator_api
from testing.tiny_serving import write_tiny_model
from tests.harness import ROOT, Procs, start_coordinator, wait_until

TOKEN = "spot-check-token-7a367ff86b77413e1fce8acd1f94489f1ddf04ad"
PROMPT = "w1 w2 w3 w4"
NEW = 8
SPANS = {"head1": "0:3", "head2": "0:3", "liar": "0:3", "tail1": "3:6", "tail2": "3:6"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("spot")
    model = tmp / "tiny"
    write_tiny_model(model)
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        OPERATORS[url] = operator_api(url, tmp / "coord")
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


OPERATORS: dict[str, SignedApi] = {}  # coordinator URL -> an operator (events with details)


def status(url: str) -> dict:
    return OPERATORS[url].get("/status")


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
    """POST /api/inference/offenses takes only a well-formed report signed by an admitted
    identity holding the client or serve role; the event names that identity as the reporter."""
    url, ids, _ = swarm
    reporter = SignedApi(url, token=TOKEN)
    body = {"offender": ids["tail1"], "detail": {"blocks": [3, 6]}}
    unsigned = sync_exchange(reporter.access, None, "POST", "/inference/offenses",
                             json.dumps(body).encode(), "application/json")
    assert unsigned[0] == 401 and error_code(unsigned[1]) == "missing_signature"
    with pytest.raises(CoordinatorError) as refused:  # an operator holds neither role
        OPERATORS[url].post("/inference/offenses", body)
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    with pytest.raises(CoordinatorError) as bad:
        reporter.post("/inference/offenses", {**body, "offender": "not-a-peer-id"})
    assert bad.value.status == 400
    assert reporter.post("/inference/offenses", body) == {"recorded": True}
    assert any(e["kind"] == "inference_offense" and e["detail"]["reporter"] == reporter.peer_id
               for e in status(url)["events"])


def test_peer_generate_spot_check_flag(swarm, reference, tmp_path):
    url, _, model = swarm
    cmd = [sys.executable, "-m", "peer.cli", "generate", "--coordinator", url, "--token", TOKEN,
           "--key", str(tmp_path / "client.key"), "--model", model, "--max-new-tokens", str(NEW)]
    run = subprocess.run([*cmd, "--spot-check", "1", PROMPT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference + "\n"
    run = subprocess.run([*cmd, "--spot-check", "2", PROMPT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and "probability" in run.stderr
