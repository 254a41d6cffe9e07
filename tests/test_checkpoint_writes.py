"""Checkpoint writes only from the run (issue 14 item 4): who may upload chunks and publish a
manifest, which step and state it may publish, the per-run disk quota, and retention that never
loses the newest trusted checkpoint.

The attack tests run a real coordinator process (open admission: identities are free) and real
identities that sign their requests (peer/reqsign.py); honest peers upload through the peer-side
client (diloco/run_client.py), attackers send hand-made signed requests."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import torch

from coordinator.checkpoint_routes import RetentionPolicy
from coordinator.checkpoints import (MIN_CHUNK_CHARGE, MOMENTUM_PREFIX, CheckpointStore,
                                     LocalBackend, ManifestError, trainer_state_hash)
from diloco.run_client import RunClient
from diloco.state_io import build_manifest
from peer.blobs import Manifest, TensorEntry
from peer.identity import Identity
from peer.membership import CoordinatorError
from peer.reqsign import sign_headers
from tests.harness import Procs, wait_until

RUN = "r"
CONFIG = {"preset": "micro", "inner_steps": 5, "sync_timeout_s": 5.0, "checkpoint_every": 1}
H0 = "0" * 64
QUOTA = 1024 * 1024           # bytes per run
PENDING = QUOTA // 2          # per uploader (the default: half the quota)
GRACE_S = 3.0                 # unreferenced chunks are collected after this
TENSOR = 16 * 1024            # fp32 values per tensor: 64 KiB chunks


# -- a trainer's state, as the train role writes it ----------------------------------------------
def state(value: float, chunk: int = 64 * 1024):
    """(manifest builder, chunks, trainer hash) of a two-parameter trainer state."""
    tensors = {"a": torch.full((TENSOR,), value), "b": torch.full((TENSOR // 2,), value + 0.5),
               MOMENTUM_PREFIX + "a": torch.full((TENSOR,), value / 10),
               MOMENTUM_PREFIX + "b": torch.full((TENSOR // 2,), value / 20)}
    manifest, chunks = build_manifest(RUN, 0, tensors, chunk_size=chunk)
    return tensors, trainer_state_hash(manifest, lambda sha: bytes(chunks[sha]))


def manifest_of(step: int, tensors: dict, claimed: str):
    return build_manifest(RUN, step, tensors, chunk_size=64 * 1024,
                          meta={"global_state_hash": claimed, "outer_step": step})


# -- pure ----------------------------------------------------------------------------------------
def test_trainer_state_hash_is_the_hash_the_trainer_reports(tmp_path):
    """The coordinator's torch-free recomputation equals OuterTrainer.global_state_hash on a real
    DiLoCo trainer after an outer step (non-zero momenta), through a stored checkpoint."""
    from diloco import DiLoCo, DiLoCoConfig, LocalGroup
    from diloco.state_io import MOMENTUM_PREFIX as TRAINER_PREFIX, global_tensors

    assert TRAINER_PREFIX == MOMENTUM_PREFIX
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8))
    batches = iter(lambda: (torch.randint(0, 8, (2, 5)), torch.randint(0, 8, (2, 5))), None)

    class Data:
        position = 0

        def next_batch(self):
            return next(batches)

        def __iter__(self):
            return batches

        def __next__(self):
            return next(batches)

    def loss(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x).reshape(-1, 8), y.reshape(-1))

    trainer = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), Data(), loss,
                     LocalGroup(1).averager(0), DiLoCoConfig(inner_steps=2))
    trainer.run_inner()
    trainer.outer_step()
    expected = trainer.global_state_hash()
    manifest, chunks = build_manifest(RUN, 1, global_tensors(trainer.snapshot()), chunk_size=64)
    store = CheckpointStore(LocalBackend(tmp_path), RUN)
    for sha, data in chunks.items():
        store.put_chunk(data, sha)
    assert trainer_state_hash(manifest, store.get_chunk) == expected
    # Any change to the stored state changes it.
    params = dict(global_tensors(trainer.snapshot()))
    name = next(n for n in params if n.startswith(MOMENTUM_PREFIX))
    params[name] = params[name] + 1
    other, other_chunks = build_manifest(RUN, 1, params, chunk_size=64)
    assert trainer_state_hash(other, lambda s: bytes(other_chunks[s])) != expected


@pytest.mark.fast
def test_trainer_state_hash_refuses_what_no_trainer_writes():
    no_momenta, chunks = build_manifest(RUN, 1, {"a": torch.ones(4)})
    with pytest.raises(ManifestError, match="momenta do not match"):
        trainer_state_hash(no_momenta, lambda s: bytes(chunks[s]))
    sha = hashlib.sha256(bytes(8)).hexdigest()
    halves = Manifest.build(RUN, 1, [TensorEntry(n, "F16", (4,), (sha,), 8)
                                     for n in ("a", MOMENTUM_PREFIX + "a")])
    with pytest.raises(ManifestError, match="not F32"):
        trainer_state_hash(halves, lambda s: bytes(8))
    short = Manifest.build(RUN, 1, [TensorEntry(n, "F32", (4,), (sha,), 16)
                                    for n in ("a", MOMENTUM_PREFIX + "a")])
    with pytest.raises(ManifestError, match="chunks hold 8 of its 16 bytes"):
        trainer_state_hash(short, lambda s: bytes(8))


@pytest.mark.fast
def test_quota_settings_are_checked():
    assert RetentionPolicy(quota_bytes=QUOTA).pending_limit == QUOTA // 2
    assert RetentionPolicy(quota_bytes=None).pending_limit is None
    for bad in ({"quota_bytes": 10}, {"pending_bytes": -1}, {"quota_bytes": 2.5}):
        with pytest.raises(ValueError):
            RetentionPolicy(**bad)


# -- against a real coordinator ------------------------------------------------------------------
class Swarm:
    """A real coordinator and the identities of one test."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.clients: list[RunClient] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def peer(self, *, run: bool = True) -> RunClient:
        """An admitted identity registered as a live peer; a member of the run when ``run``."""
        client = RunClient(self.url, None, Identity.generate(), timeout=30)
        self.clients.append(client)
        await client.join(f"127.0.0.{2 + len(self.clients)}:9000", {"roles": ["train"]})
        if run:
            answer = await client.join_run(RUN, dict(CONFIG), [])
            assert not answer["conflicts"]
        return client

    async def signed(self, who: Identity | None, method: str, path: str,
                     body: bytes = b"") -> tuple[int, dict]:
        """A hand-made request (signed by ``who``; unsigned when None) -> (status, JSON)."""
        headers = {} if who is None else sign_headers(who, method, path, body)
        async with self.session.request(method, self.url + path, data=body,
                                        headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await self.session.close()


@pytest.fixture
async def start_swarm(tmp_path):
    """``start(*flags)``: a real coordinator (open admission, keep-last 1) and its Swarm."""
    procs, made = Procs(), []

    def start(*flags: str) -> Swarm:
        coord = procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                             "--data-dir", str(tmp_path), "--open", "--admit-rate", "100",
                             "--heartbeat-interval", "5", "--peer-timeout", "120",
                             "--keep-last", "1", *flags)
        made.append(Swarm(coord.ready["url"], tmp_path))
        return made[-1]

    try:
        yield start
    finally:
        for s in made:
            await s.close()
        procs.cleanup()


@pytest.fixture
async def swarm(start_swarm):
    return start_swarm("--gc-grace", str(GRACE_S), "--checkpoint-quota", str(QUOTA))


async def step(run_peers: dict[RunClient, str], n: int, reports: dict[RunClient, str]) -> list[str]:
    """Every peer arrives at window ``n`` with its base hash, then files its step-``n`` report."""
    answers = await asyncio.gather(*(c.sync(RUN, n, base, deadline_s=30)
                                     for c, base in run_peers.items()))
    for c, h in reports.items():
        await c.report(RUN, n, h, {})
    return answers[0]["participants"]


def chunk_path(data_dir: Path, sha: str) -> Path:
    return data_dir / "checkpoints" / "runs" / RUN / "chunks" / sha[:2] / sha


def run_bytes(data_dir: Path) -> int:
    root = data_dir / "checkpoints" / "runs" / RUN / "chunks"
    return sum(max(p.stat().st_size, MIN_CHUNK_CHARGE) for p in root.rglob("*") if p.is_file())


async def test_only_the_run_writes_its_checkpoints(swarm):
    """Outsiders, non-participants and members with a wrong step, hash or state are refused;
    the honest participant publishes; a joiner loads the honest state."""
    honest_a, honest_b, member = [await swarm.peer() for _ in range(3)]
    outsider = await swarm.peer(run=False)   # admitted (role train), never joined the run
    s1, h1 = state(1.0)
    bad, h_bad = state(-7.0)
    # Step 1 is taken by all three; the member reports another state than the honest two.
    await step({honest_a: H0, honest_b: H0, member: H0}, 1,
               {honest_a: h1, honest_b: h1, member: h_bad})
    m1, c1 = manifest_of(1, s1, h1)

    async def put_chunks(client, chunks) -> list[int]:
        return [(await swarm.signed(client.identity, "PUT", f"/api/runs/{RUN}/chunks/{sha}",
                                    bytes(data)))[0] for sha, data in chunks.items()]

    async def put_manifest(who, m) -> tuple[int, dict]:
        return await swarm.signed(who, "PUT", f"/api/runs/{RUN}/checkpoints/{m.step}",
                                  json.dumps(m.to_dict()).encode())

    # Unsigned (a bearer token is not accepted either) and outsiders: nothing is stored.
    status, body = await swarm.signed(None, "PUT", f"/api/runs/{RUN}/chunks/{next(iter(c1))}",
                                      bytes(next(iter(c1.values()))))
    assert status == 401, body
    assert await put_chunks(outsider, c1) == [403] * len(c1)
    status, body = await put_manifest(outsider.identity, m1)
    assert (status, body["error"]) == (403, "not_a_participant"), body
    status, body = await swarm.signed(outsider.identity, "POST",
                                      f"/api/runs/{RUN}/checkpoints/missing",
                                      json.dumps({"shas": list(c1)}).encode())
    assert (status, body["error"]) == (403, "not_a_participant"), body
    assert not (swarm.data_dir / "checkpoints" / "runs" / RUN / "chunks").exists()

    # The member: an absurd step, a hash the run did not agree on, the agreed hash over its
    # own tensors. Its chunks are accepted (it is a member) but no manifest of its stands.
    mb, cb = manifest_of(1, bad, h_bad)
    assert set(await put_chunks(member, cb)) == {200}
    far, _ = manifest_of(10**9, bad, h_bad)
    status, body = await put_manifest(member.identity, far)
    assert (status, body["error"]) == (409, "step_not_taken"), body
    status, body = await put_manifest(member.identity, mb)
    assert (status, body["error"]) == (409, "not_majority"), body
    lying, _ = manifest_of(1, bad, h1)   # claims the agreed hash over the bad tensors
    status, body = await put_manifest(member.identity, lying)
    assert (status, body["error"]) == (409, "state_mismatch"), body
    status, body = await swarm.signed(honest_a.identity, "GET", f"/api/runs/{RUN}/checkpoints")
    assert body["steps"] == [] and body["latest"] is None

    # Step 2: the member's base hash is outvoted, so it is not a participant of step 2 and
    # cannot publish it even with the honest state.
    s2, h2 = state(2.0)
    participants = await step({honest_a: h1, honest_b: h1, member: h_bad}, 2,
                              {honest_a: h2, honest_b: h2})
    assert member.identity.peer_id not in participants
    m2, c2 = manifest_of(2, s2, h2)
    await put_chunks(honest_a, c2)
    status, body = await put_manifest(member.identity, m2)
    assert (status, body["error"]) == (403, "not_a_participant"), body

    # The honest participants publish through the peer client, as the train role does.
    done = await honest_a.upload_checkpoint(m1, c1)
    assert done["chunks_sent"] == len(c1)
    await honest_b.upload_checkpoint(m2, c2)
    status, body = await swarm.signed(outsider.identity, "GET", f"/api/runs/{RUN}/checkpoints")
    assert body["latest"] == 2 and body["steps"] == [2]  # keep-last 1 pruned step 1

    # A joiner (any admitted identity may read) gets the honest state, verified chunk by chunk.
    joiner = await swarm.peer()
    latest = await joiner.latest_manifest(RUN)
    assert latest.step == 2 and latest.meta["global_state_hash"] == h2
    tensors = await joiner.download_checkpoint(latest)
    assert all(torch.equal(tensors[k], v) for k, v in s2.items())


async def test_quota_bounds_a_member_and_junk_is_collected(swarm):
    """A member floods chunks: it stops at its pending share, the run never exceeds its quota,
    honest checkpoints still fit, and junk is collected once older than the grace period."""
    honest, member = await swarm.peer(), await swarm.peer()
    s1, h1 = state(1.0)
    await step({honest: H0, member: H0}, 1, {honest: h1, member: h1})
    junk_chunk = 64 * 1024
    statuses, codes = [], []
    for i in range(2 * QUOTA // junk_chunk):
        data = os.urandom(junk_chunk)
        status, body = await swarm.signed(member.identity, "PUT",
                                          f"/api/runs/{RUN}/chunks/{hashlib.sha256(data).hexdigest()}",
                                          data)
        statuses.append(status)
        codes.append(body.get("error"))
        assert run_bytes(swarm.data_dir) <= QUOTA
    assert statuses.count(200) == PENDING // junk_chunk, statuses
    assert set(codes[PENDING // junk_chunk:]) == {"pending_quota"}, codes
    # The honest checkpoint (~200 KiB) still fits beside the member's junk.
    m1, c1 = manifest_of(1, s1, h1)
    await honest.upload_checkpoint(m1, c1)
    # After the grace period the junk is anyone's to collect: the member's pending share is
    # free again, but a second flood finds the run's quota; hitting it collects the old junk.
    await asyncio.sleep(GRACE_S + 0.5)
    more = 0
    for i in range(2 * QUOTA // junk_chunk):
        data = os.urandom(junk_chunk)
        status, body = await swarm.signed(member.identity, "PUT",
                                          f"/api/runs/{RUN}/chunks/{hashlib.sha256(data).hexdigest()}",
                                          data)
        more += status == 200
        assert status in (200, 507), body
        assert run_bytes(swarm.data_dir) <= QUOTA
    assert more == PENDING // junk_chunk
    stored = {p.name for p in (swarm.data_dir / "checkpoints" / "runs" / RUN / "chunks").rglob("*")
              if p.is_file()}
    assert set(c1) <= stored  # the published checkpoint's chunks are never collected
    assert len(stored - set(c1)) <= PENDING // junk_chunk  # the first flood is gone
    latest = await honest.latest_manifest(RUN)
    assert latest.step == 1 and latest.meta["global_state_hash"] == h1


async def test_retention_keeps_the_newest_trusted_checkpoint(swarm):
    """A manifest at an absurd step already in the store (written before these checks existed,
    or around them) never becomes ``latest``, and retention keeps the newest trusted checkpoint
    even when an older step is committed after it."""
    a, b = await swarm.peer(), await swarm.peer()
    states = {n: state(float(n)) for n in (1, 2, 3)}
    bases = {a: H0, b: H0}
    for n in (1, 2, 3):
        h = states[n][1]
        await step(bases, n, {a: h, b: h})
        bases = {a: h, b: h}
    planted_tensors, planted_hash = state(99.0)
    store = CheckpointStore(LocalBackend(swarm.data_dir / "checkpoints"), RUN)
    planted, planted_chunks = manifest_of(10**9, planted_tensors, planted_hash)
    for sha, data in planted_chunks.items():
        store.put_chunk(data, sha)
    store.put_manifest(10**9, planted)

    m3, c3 = manifest_of(3, *states[3])
    await a.upload_checkpoint(m3, c3)
    m2, c2 = manifest_of(2, *states[2])   # a late upload of an older step
    await b.upload_checkpoint(m2, c2)
    _, listing = await swarm.signed(a.identity, "GET", f"/api/runs/{RUN}/checkpoints")
    assert 3 in listing["steps"], listing   # keep-last 1 would have kept only 10**9 (and 2)
    assert listing["latest"] == 3
    latest = await a.latest_manifest(RUN)
    assert latest.step == 3 and latest.meta["global_state_hash"] == states[3][1]
    # Republishing is idempotent; a different state under a published step is a conflict.
    await a.upload_checkpoint(m3, c3)
    with pytest.raises(CoordinatorError) as e:
        await a.upload_checkpoint(*manifest_of(3, states[1][0], states[3][1]))
    assert e.value.status == 409



async def test_prune_spares_old_chunks_an_upload_was_told_to_skip(start_swarm):
    """A chunk only a pruned checkpoint references, older than the grace period, is deleted,
    unless an upload in flight was just told it may skip it (dedup) -- then its commit works."""
    swarm = start_swarm()  # the default grace period (an hour)
    a, b = await swarm.peer(), await swarm.peer()

    def trainer_state(**values: float) -> tuple[dict, str]:
        tensors = {}
        for name, v in values.items():
            tensors[name] = torch.full((8,), v)
            tensors[MOMENTUM_PREFIX + name] = torch.full((8,), v / 10)
        m, chunks = build_manifest(RUN, 0, tensors)
        return tensors, trainer_state_hash(m, lambda sha: bytes(chunks[sha]))

    states = {1: trainer_state(x=1.0, w=2.0), 2: trainer_state(z=4.0), 3: trainer_state(x=1.0, y=3.0)}
    bases = {a: H0, b: H0}
    for n, (_, h) in states.items():
        await step(bases, n, {a: h, b: h})
        bases = {a: h, b: h}
    m1, c1 = manifest_of(1, *states[1])
    await a.upload_checkpoint(m1, c1)
    aged = time.time() - 2 * 3600  # older than the default grace period
    for sha in c1:
        os.utime(chunk_path(swarm.data_dir, sha), (aged, aged))
    m3, c3 = manifest_of(3, *states[3])   # reuses x and its momentum
    reused = set(c3) & set(c1)
    assert len(reused) == 2
    status, body = await swarm.signed(a.identity, "POST", f"/api/runs/{RUN}/checkpoints/missing",
                                      json.dumps({"shas": list(c3)}).encode())
    assert status == 200 and set(body["missing"]) == set(c3) - reused
    await b.upload_checkpoint(*manifest_of(2, *states[2]))  # meanwhile: step 1 is pruned
    local = CheckpointStore(LocalBackend(swarm.data_dir / "checkpoints"), RUN)
    assert local.list() == [2]
    assert not any(local.has_chunk(sha) for sha in set(c1) - reused)  # old, unreferenced: gone
    assert all(local.has_chunk(sha) for sha in reused)  # old, unreferenced, but claimed
    for sha in set(c3) - reused:
        status, _ = await swarm.signed(a.identity, "PUT", f"/api/runs/{RUN}/chunks/{sha}",
                                       bytes(c3[sha]))
        assert status == 200
    status, body = await swarm.signed(a.identity, "PUT", f"/api/runs/{RUN}/checkpoints/3",
                                      json.dumps(m3.to_dict()).encode())
    assert status == 200, body
    assert local.list() == [3]


async def test_offline_steps_need_a_majority_of_the_group_that_went_offline(swarm):
    """Steps taken while the coordinator was down have no window, only queued reports: their
    voters are the last window's participants, and one of them alone cannot name a state."""
    a, b, member = [await swarm.peer() for _ in range(3)]
    s1, h1 = state(1.0)
    await step({a: H0, b: H0, member: H0}, 1, {a: h1, b: h1, member: h1})
    s2, h2 = state(2.0)
    bad, h_bad = state(-1.0)
    for c, h in ((a, h2), (b, h2), (member, h_bad)):
        await c.report(RUN, 2, h, {"offline": 1})
    await member.report(RUN, 3, h_bad, {"offline": 1})  # only the member reports step 3

    async def publish(who, m) -> tuple[int, dict]:
        for sha, data in m[1].items():
            await swarm.signed(who.identity, "PUT", f"/api/runs/{RUN}/chunks/{sha}", bytes(data))
        return await swarm.signed(who.identity, "PUT", f"/api/runs/{RUN}/checkpoints/{m[0].step}",
                                  json.dumps(m[0].to_dict()).encode())

    status, body = await publish(member, manifest_of(2, bad, h_bad))
    assert (status, body["error"]) == (409, "not_majority"), body
    status, body = await publish(member, manifest_of(3, bad, h_bad))
    assert (status, body["error"]) == (409, "step_not_agreed"), body
    status, body = await publish(a, manifest_of(2, s2, h2))
    assert status == 200, body
    _, listing = await swarm.signed(member.identity, "GET", f"/api/runs/{RUN}/checkpoints")
    assert listing["steps"] == [2] and listing["latest"] == 2

# -- real training peers -------------------------------------------------------------------------
PEER_CMD = [sys.executable, "-m", "peer.cli"]
TRAIN_FLAGS = ["--preset", "micro", "--inner-steps", "3", "--seq-len", "32", "--batch-size", "4",
               "--sync-timeout", "60", "--checkpoint-every", "2", "--min-peers", "2"]


def signed_get(url: str, who: Identity, path: str) -> dict:
    req = urllib.request.Request(url + path, headers=sign_headers(who, "GET", path))
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def signed_put(url: str, who: Identity, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body, method="PUT",
                                 headers=sign_headers(who, "PUT", path, body))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def trainers(procs: Procs, url: str, keys: list[Path], data: Path, *flags: str) -> list:
    children = [procs.spawn([*PEER_CMD, "join", "--coordinator", url, "--listen", "127.0.0.1:0",
                             "--key", str(key), "--device", "cpu", "--ping-interval", "0.5",
                             "--train", "mesh", "--data", str(data), *flags], wait_ready=False)
                for key in keys]
    for child in children:
        wait_until(lambda: child.ready or child.proc.poll() is not None, 180, "READY")
        assert child.ready, "\n".join(child.lines[-40:])
    return children


@pytest.mark.slow
def test_real_peers_checkpoint_and_a_joiner_loads_the_agreed_state(tmp_path):
    """Two real train peers checkpoint through the new checks (their real model state hashes to
    the agreed hash on the coordinator); an admitted outsider cannot replace the checkpoint; a
    fresh peer, with no live donor, starts from it."""
    procs = Procs()
    try:
        coord = procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                             "--data-dir", str(tmp_path / "coord"), "--open", "--admit-rate", "100",
                             "--heartbeat-interval", "0.5", "--peer-timeout", "3",
                             "--keep-last", "1")
        url = coord.ready["url"]
        rng = random.Random(7)
        words = "the of and to in peer mesh train model outer inner step ring hash state".split()
        data = tmp_path / "corpus.txt"
        data.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "."
                                  for _ in range(1500)) + "\n")
        peers = trainers(procs, url, [tmp_path / f"p{i}.key" for i in range(2)], data, *TRAIN_FLAGS)
        outsider = Identity.generate()

        async def admit() -> None:
            async with RunClient(url, None, outsider) as client:
                await client.admit()

        asyncio.run(admit())
        wait_until(lambda: (signed_get(url, outsider, "/api/runs/mesh/checkpoints")["latest"] or 0) >= 2,
                   240, "a checkpoint at step 2")
        manifest = signed_get(url, outsider, "/api/runs/mesh/checkpoints/latest")
        step, agreed = manifest["step"], manifest["meta"]["global_state_hash"]
        reports = signed_get(url, outsider, f"/api/runs/mesh/reports?since={step}")["reports"]
        assert {r["state_hash"] for r in reports if r["step"] == step} == {agreed}
        published = f"checkpoint {step} (state {agreed[:12]}) published by"
        assert any(published in line for line in coord.lines), coord.lines[-20:]
        # The outsider republishes the step with other meta, and an absurd step: refused.
        forged = {**manifest, "meta": {**manifest["meta"], "global_state_hash": "f" * 64}}
        for m in (forged, {**manifest, "step": 10**9}):
            status, body = signed_put(url, outsider, f"/api/runs/mesh/checkpoints/{m['step']}",
                                      json.dumps(m).encode())
            assert (status, body["error"]) == (403, "not_a_participant"), body
        for p in peers:
            p.kill()
        for p in peers:
            p.wait(timeout=20)
        saved = signed_get(url, outsider, "/api/runs/mesh/checkpoints/latest")
        wait_until(lambda: not signed_get(url, outsider, "/api/runs/mesh")["donors"], 30,
                   "the killed peers to be declared dead (no donor left)")
        fresh = trainers(procs, url, [tmp_path / "q.key"], data, *TRAIN_FLAGS[:-4])
        line = fresh[0].wait_for_line("train mesh: state from checkpoint", timeout=120)
        assert f"step {saved['step']} hash {saved['meta']['global_state_hash']}" in line, line
    finally:
        procs.cleanup()
