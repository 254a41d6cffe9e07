"""Prometheus /metrics on the coordinator and on peers, parsed with prometheus_client's own
parser; /api/status sections (runs, inference coverage, links, checkpoints) and their robustness;
JSON logs selected with --log-format json."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import CoordinatorConfig, create_app
from coordinator.store import Store
from peer import metrics as peer_metrics
from testing.api import operator_api
from tests import swarm_feed
from tests.harness import Procs

TOKEN = "metrics-test-token-4265cc21ec9d306ea15893e1e8d64ac35b7a7803"


def parse(text: str) -> dict[str, list]:
    """family name -> samples; fails the test if the exposition is not valid."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    for s in families[family]:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample or family} {labels} in {families.get(family)}")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=20) as r:
        return r.read().decode()


@pytest.fixture
async def coord(tmp_path):
    store = Store(tmp_path)
    store.open()
    config = CoordinatorConfig(data_dir=tmp_path, token=TOKEN, heartbeat_interval=0.5, peer_timeout=30)
    server = TestServer(create_app(config, store), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()
    store.close()


async def operator_status(coord: str, data_dir) -> dict:
    """/api/status as an operator sees it (hashes, addresses), asked from a thread: the
    coordinator under test runs on this event loop."""
    op = await asyncio.to_thread(operator_api, coord, data_dir)
    return await asyncio.to_thread(op.get, "/status")


async def fetch(url: str) -> str:
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith(("text/plain", "application/json"))
            return await r.text()


async def test_status_sections_and_coordinator_metrics(coord, tmp_path):
    servers = await swarm_feed.start_servers(coord, TOKEN, 0.5)
    trainers = await swarm_feed.train(coord, TOKEN, steps=4, interval=0.5)
    try:
        status = await operator_status(coord, tmp_path)
        assert status["section_errors"] == {}
        assert status["counts"]["active"] == 4

        [run] = status["runs"]
        assert run["run_id"] == swarm_feed.RUN and run["outer_step"] == 4
        assert [h["step"] for h in run["history"]] == [1, 2, 3, 4]
        assert run["history"][-1]["loss"] == pytest.approx(swarm_feed.loss_at(4) + 0.025)
        assert run["tokens"] == 4 * 2 * 4096 and run["bytes_on_wire"] == 4 * 2 * 250_000
        assert run["utilization"] == pytest.approx(0.85)
        assert sorted(run["participants"]) == sorted(p.peer_id for p in trainers)
        assert run["hash_agreement"] == {"step": 4, "agreed": True, "hashes": {
            swarm_feed.state_hash(4): sorted(p.peer_id for p in trainers)}}
        assert run["state"] == "training" and run["members_training"] == 2

        [model] = status["inference"]
        assert model["model"] == swarm_feed.MODEL and model["n_blocks"] == swarm_feed.N_LAYERS
        assert model["gaps"] == [[24, 30]] and not model["complete"]
        assert model["coverage"][:24] == [1] * 24 and model["sessions"] == 3
        assert model["tokens_per_s"] == pytest.approx(37.5)

        [ckpt] = status["checkpoints"]
        assert ckpt["run"] == swarm_feed.RUN and ckpt["step"] == 4 and ckpt["size_bytes"] == 2 * 4096 * 4  # a parameter and its momentum

        families = parse(await fetch(coord + "/metrics"))
        assert value(families, "lowband_coordinator_peers", state="active") == 4
        assert value(families, "lowband_coordinator_peers", state="dead") == 0
        assert value(families, "lowband_coordinator_request_seconds",
                     "lowband_coordinator_request_seconds_count", route="/api/heartbeat") >= 4
        assert value(families, "lowband_coordinator_requests", route="/api/heartbeat",
                     status="200") >= 4
        assert value(families, "lowband_run_outer_step", run=swarm_feed.RUN) == 4
        assert value(families, "lowband_run_loss", run=swarm_feed.RUN) == pytest.approx(
            swarm_feed.loss_at(4) + 0.025)
        assert value(families, "lowband_run_state_hash_agreed", run=swarm_feed.RUN) == 1
        assert value(families, "lowband_inference_uncovered_blocks", model=swarm_feed.MODEL) == 6
        assert value(families, "lowband_inference_sessions", model=swarm_feed.MODEL) == 3
        assert value(families, "lowband_coordinator_checkpoints") == 1
    finally:
        for p in servers + trainers:
            await p.stop()


async def test_status_survives_a_broken_section(coord, tmp_path):
    servers = await swarm_feed.start_servers(coord, TOKEN, 0.5)
    try:
        # A manifest that is not JSON: the checkpoint section fails, everything else still works.
        bad = tmp_path / "checkpoints" / "runs" / "broken" / "manifests" / f"{7:012d}.json"
        bad.parent.mkdir(parents=True)
        bad.write_text("{not json")
        status = await operator_status(coord, tmp_path)
        assert status["checkpoints"] == [] and "checkpoints" in status["section_errors"]
        assert status["counts"]["active"] == 2 and len(status["inference"]) == 1
        families = parse(await fetch(coord + "/metrics"))
        assert value(families, "lowband_coordinator_peers", state="active") == 2
    finally:
        for p in servers:
            await p.stop()


def test_peer_metrics_recording_helpers():
    before = parse(peer_metrics.exposition().decode())

    def counter(name: str, **labels) -> float:
        try:
            return value(parse(peer_metrics.exposition().decode()), name, **labels)
        except (AssertionError, KeyError):
            return 0.0

    sent0 = counter("lowband_peer_collective_bytes", op="all_reduce", direction="sent")
    peer_metrics.record_collective_bytes("all_reduce", sent=1000, received=500)
    with peer_metrics.time_collective("all_reduce"):
        pass
    with pytest.raises(TimeoutError):
        with peer_metrics.time_collective("all_reduce"):
            raise TimeoutError
    peer_metrics.record_outer_step(7, loss=3.25)
    peer_metrics.set_inference("m", tokens_per_s=12.0, sessions=3)
    after = parse(peer_metrics.exposition().decode())
    assert value(after, "lowband_peer_collective_bytes", op="all_reduce", direction="sent") == sent0 + 1000
    assert value(after, "lowband_peer_collective_seconds", "lowband_peer_collective_seconds_count",
                 op="all_reduce", outcome="TimeoutError") >= 1
    assert value(after, "lowband_peer_collective_seconds", "lowband_peer_collective_seconds_count",
                 op="all_reduce", outcome="ok") >= 1
    assert value(after, "lowband_peer_outer_step") == 7 and value(after, "lowband_peer_loss") == 3.25
    assert value(after, "lowband_peer_inference_sessions", model="m") == 3
    assert set(before) <= set(after)


def test_real_processes_serve_metrics_and_json_logs(procs: Procs, tmp_path):
    coord = procs.python("-m", "coordinator", "start", "--port", "0", "--data-dir", str(tmp_path / "c"),
                         "--token", TOKEN, "--heartbeat-interval", "0.5", "--peer-timeout", "3",
                         "--log-format", "json")
    url = coord.ready["url"]
    peers = [procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                          "--listen", "127.0.0.1:0", "--key", str(tmp_path / f"p{i}.key"),
                          "--device", "cpu", "--ping-interval", "0.5", "--metrics-port", "0",
                          "--log-format", "json")
             for i in range(2)]
    deadline = time.monotonic() + 30
    while True:
        families = parse(get(url + "/metrics"))
        peer_families = [parse(get(p.ready["metrics_url"])) for p in peers]
        ok = (value(families, "lowband_coordinator_peers", state="active") == 2 and all(
            value(f, "lowband_peer_heartbeats", "lowband_peer_heartbeats_total", result="ok") >= 2
            and value(f, "lowband_peer_mesh_peers") == 1 for f in peer_families))
        if ok:
            break
        assert time.monotonic() < deadline, f"metrics never showed 2 meshed peers: {peer_families}"
        time.sleep(0.3)
    assert value(families, "lowband_coordinator_request_seconds",
                 "lowband_coordinator_request_seconds_count", route="/api/heartbeat") >= 2
    for f in peer_families:
        assert value(f, "lowband_peer_heartbeat_seconds", "lowband_peer_heartbeat_seconds_count") >= 2
        assert "lowband_peer_collective_bytes" in f and "lowband_peer_outer_steps" in f
    # --log-format json: every log line (stderr, merged into the captured output) is one object.
    logs = [json.loads(line) for c in [coord, *peers] for line in c.lines if line.startswith("{")]
    assert any(e["logger"].startswith("lowband.peer") and e["level"] == "info" for e in logs)
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in logs)


async def test_heartbeat_answers_carry_the_peer_list_only_when_it_changed(coord):
    """The scale path (bench/coordinator.py): a peer sends the id of the list it holds."""
    from peer.identity import Identity
    from peer.membership import CoordinatorClient

    a, b = (CoordinatorClient(coord, TOKEN, Identity.generate(), timeout=10) for _ in range(2))
    try:
        joined = await a.join("127.0.0.1:7001", {})
        await b.join("127.0.0.1:7002", {})
        await b.heartbeat({})
        answer = await a.heartbeat({}, joined["view"])       # b joined since: a new list
        ids = {p["peer_id"] for p in answer["peers"]}
        assert ids == {a.identity.peer_id, b.identity.peer_id} and answer["view"] != joined["view"]
        view = answer["view"]
        for _ in range(3):  # a's own first heartbeat changed the list (joining -> active) once more
            again = await a.heartbeat({}, view)
            view = again["view"]
        for _ in range(3):
            again = await a.heartbeat({}, view)              # nothing changed: no list
            assert "peers" not in again and again["view"] == view and again["state"] == "active"
        assert "peers" in await a.heartbeat({})              # clients that send no id get it all
        await b.leave()
        deadline = time.monotonic() + 10
        while True:  # heartbeats may see the old list for one round while the new one is built
            answer = await a.heartbeat({}, view)
            if "peers" in answer:
                break
            assert time.monotonic() < deadline
        assert [p["peer_id"] for p in answer["peers"]] == [a.identity.peer_id]
    finally:
        await a.close()
        await b.close()


def test_checkpoints_cli_lists_and_exports(tmp_path):
    """`coordinator checkpoints list|export` over a data dir holding one published checkpoint."""
    import subprocess
    import sys

    import torch

    from coordinator.checkpoints import CheckpointStore, LocalBackend, save_state
    from tests.harness import ROOT

    from pipeline.model import Llama, LlamaConfig

    config = {"vocab_size": 16, "dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "hidden_dim": 16}
    store = CheckpointStore(LocalBackend(tmp_path / "data" / "checkpoints"), "cli-run")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**config))  # export needs a whole model (tests/test_export.py: the rest)
    save_state(store, 5, {n: p.detach().clone() for n, p in model.named_parameters()}, config=config)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "coordinator", "checkpoints", *args,
                               "--data-dir", str(tmp_path / "data")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "cli-run" in listed.stdout and " 5 " in listed.stdout
    exported = cli("export", "latest", str(tmp_path / "hf"))   # the only run: --run optional
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 8
    missing = cli("export", "9", str(tmp_path / "x"), "--run", "cli-run")
    assert missing.returncode == 1 and "no checkpoint at step 9" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_role_stats_reported_to_the_daemon_feed_peer_metrics():
    from peer.daemon import DaemonConfig, PeerDaemon

    daemon = PeerDaemon(DaemonConfig(coordinator="http://127.0.0.1:9"))
    steps0 = value(parse(peer_metrics.exposition().decode()), "lowband_peer_outer_steps",
                   "lowband_peer_outer_steps_total")
    daemon.report("train", {"run": "r", "step": 41, "tokens_per_s": 900.0, "loss": 2.5})
    daemon.report("serve", {"model": "bridge-model", "blocks": [0, 4], "sessions": 2,
                            "tokens_per_s": None})
    f = parse(peer_metrics.exposition().decode())
    assert value(f, "lowband_peer_outer_steps", "lowband_peer_outer_steps_total") == steps0 + 1
    assert value(f, "lowband_peer_outer_step") == 41 and value(f, "lowband_peer_loss") == 2.5
    assert value(f, "lowband_peer_inference_sessions", model="bridge-model") == 2
    assert value(f, "lowband_peer_inference_tokens_per_second", model="bridge-model") == 0
