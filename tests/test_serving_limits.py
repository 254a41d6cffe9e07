"""Stage servers charge KV reservations to the client that opened them (issue 14, item 6), over
real processes and real TCP: a coordinator, one `peer join --serve` server of a tiny 6-block model
(context 64) with small KV budgets (tests/tiny_serving.py: 8 sessions, 512 slots in all, a
client's share 2 sessions / 128 slots), a `peer gateway` configured far more generously than the
servers, and attackers speaking the serving protocol directly with their own keys.

Each attack must fail with a clear error while an honest InferenceClient still gets the same
greedy completion as a single process."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
import torch

from peer.errors import RemoteError
from pipeline.protocol import CLOSE, STEP, pack_tensor
from tests.harness import Procs, start_coordinator, wait_until
from tests.tiny_serving import write_tiny_model

TOKEN = "serving-limits-token-4c1e0b6f7d5a9e2c3b8f1a0d6e4c2b9a7f5e3d1c"
LIMITS = {"max_sessions": 8, "max_total_tokens": 512, "max_client_sessions": 2, "max_client_tokens": 128}
PROMPT = "w1 w2 w3 w4"
NEW = 8


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("limits")
    model = tmp / "tiny"
    write_tiny_model(model, "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        server = procs.python("tests/tiny_serving.py", "serve", json.dumps(LIMITS), "--coordinator", url,
                              "--token", TOKEN, "--listen", "127.0.0.1:0", "--key", str(tmp / "s.key"),
                              "--device", "cpu", "--serve", str(model), wait_ready=False)
        # A gateway that lets one request ask for 16 prompts x 60 tokens (960 KV slots): only the
        # server's per-client share stands in the way.
        gateway = procs.python("-m", "peer.cli", "gateway", "--coordinator", url, "--token", TOKEN,
                               "--key", str(tmp / "g.key"), "--port", "0", "--max-prompts", "64",
                               "--max-kv-slots", "100000", "--total-kv-slots", "100000", wait_ready=False)
        server.wait_for_line("READY ", timeout=120)
        gateway.wait_for_line("READY ", timeout=120)
        yield {"url": url, "model": str(model), "server": server.ready, "gateway": gateway.ready["url"] + "/v1"}
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def reference(swarm) -> str:
    from pipeline.generate import generate
    from pipeline.loading import load_model
    from pipeline.tokenizer import Tokenizer

    return generate(load_model(swarm["model"]), Tokenizer.from_file(swarm["model"]), PROMPT, NEW)


@pytest.fixture(scope="module")
def honest(swarm):
    from pipeline.client import InferenceClient

    client = InferenceClient(swarm["url"], TOKEN)
    wait_until(lambda: client.call(client.servers, swarm["model"]), 60, "the server's announcement")
    yield client
    client.close()


class Attacker:
    """An admitted client with its own key that speaks ``serve.step`` directly, skipping every
    check InferenceClient makes (``start`` inside the attacking event loop)."""

    def __init__(self, swarm: dict):
        from pipeline.client import InferenceClient

        self.client = InferenceClient(swarm["url"], TOKEN)
        self.server = swarm["server"]

    async def start(self) -> "Attacker":
        self.host = await self.client.connect()
        self.host.add_route(self.server["peer_id"], self.server["address"])
        return self

    async def stop(self) -> None:
        await self.client.aclose()

    async def open(self, sid: str, capacity: int, rows: int = 1, tokens: int = 1, pos: int = 0) -> dict:
        meta, raw = pack_tensor(torch.ones((rows, tokens), dtype=torch.long))
        header = {**meta, "sid": sid, "start": 0, "end": 6, "pos": pos, "chunks": [tokens], "input": "tokens",
                  "out": "argmax", "wire": "fp32", "capacity": capacity, "pad": [0] * rows}
        h, _ = await self.host.call(self.server["peer_id"], STEP, header, raw, timeout=30)
        return h

    async def close(self, sid: str) -> None:
        await self.host.call(self.server["peer_id"], CLOSE, {"sid": sid}, timeout=30)


def gateway_post(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_one_client_cannot_take_every_kv_slot(swarm, honest, reference):
    """An attacker holding its whole share is refused more; the honest client still answers."""
    async def attack() -> list[str]:
        a = await Attacker(swarm).start()
        try:
            await a.open("a1", capacity=64, rows=2)           # 128 slots: the whole share
            errors = []
            for sid, capacity, rows in (("a2", 1, 1), ("a3", 64, 4)):
                with pytest.raises(RemoteError) as e:
                    await a.open(sid, capacity, rows)
                errors.append(str(e.value))
            await a.close("a1")
            await a.open("a4", capacity=64)                   # freed: room again
            return errors
        finally:
            await a.stop()

    errors = asyncio.run(attack())
    assert all("client quota" in e and "128 slots" in e for e in errors), errors
    assert honest.generate(swarm["model"], PROMPT, NEW) == reference


def test_a_session_cannot_grow_past_its_reservation(swarm, honest, reference):
    """Reserving 1 position and then stepping on would hold KV nobody accounted for."""
    async def attack() -> str:
        a = await Attacker(swarm).start()
        try:
            await a.open("g1", capacity=2, tokens=2)
            with pytest.raises(RemoteError) as e:
                await a.open("g1", capacity=2, tokens=1, pos=2)
            return str(e.value)
        finally:
            await a.stop()

    assert "reserved 2 positions" in asyncio.run(attack())
    assert honest.generate(swarm["model"], PROMPT, NEW) == reference


def test_many_identities_each_get_only_a_share(swarm, honest, reference):
    """Three attacker keys hold 3 x 128 of the 512 slots; an honest client still gets its share."""
    async def attack() -> None:
        attackers = [await Attacker(swarm).start() for _ in range(3)]
        try:
            for i, a in enumerate(attackers):
                await a.open(f"m{i}", capacity=64, rows=2)
                with pytest.raises(RemoteError, match="client quota"):
                    await a.open(f"n{i}", capacity=64, rows=2)
            # While they hold their slots, the honest client generates in a thread.
            text = await asyncio.to_thread(honest.generate, swarm["model"], PROMPT, NEW)
            assert text == reference
        finally:
            await asyncio.gather(*(a.stop() for a in attackers))

    asyncio.run(attack())


def test_a_generous_gateway_request_is_bounded_by_the_server(swarm, honest, reference):
    """16 prompts x 60 new tokens through a gateway whose own quotas allow it: the server refuses
    the gateway's 960-slot session (its per-client share is 128) and the honest client answers."""
    prompts = [f"w{i} w{i + 1}" for i in range(1, 17)]
    status, body = gateway_post(swarm["gateway"], {"model": swarm["model"], "prompt": prompts, "max_tokens": 60,
                                                   "temperature": 0})
    # The client fails over from the refusing server, finds none left and says why.
    assert status == 503 and "client quota" in body["error"]["message"], body
    assert honest.generate(swarm["model"], PROMPT, NEW) == reference
    status, body = gateway_post(swarm["gateway"], {"model": swarm["model"], "prompt": PROMPT, "max_tokens": NEW,
                                                   "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == reference, body


@pytest.mark.fast
def test_serve_limit_flags():
    """`peer join --serve-*` values reach ServeConfig (pipeline/serve_options.py); bad ones fail early."""
    import argparse

    from pipeline.serve_options import add_arguments
    from pipeline.server import ServeConfig, ServeRole

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = vars(parser.parse_args(["--serve-kv-slots", "4096", "--serve-client-kv-slots", "512"]))
    assert ServeRole("m", options).limits == {"max_total_tokens": 4096, "max_client_tokens": 512}
    cfg = ServeConfig(max_sessions=64, max_total_tokens=4096)
    assert (cfg.max_client_sessions, cfg.max_client_tokens) == (16, 1024)
    assert ServeConfig(max_sessions=2).max_client_sessions == 2
    with pytest.raises(ValueError, match="positive"):
        ServeRole("m", {"serve_max_client_tokens": 0})
