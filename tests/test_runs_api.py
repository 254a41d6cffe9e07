"""Coordinator run and checkpoint routes: create-or-get, rendezvous windows, hash majority,
reports, checkpoint chunk/manifest transfer, validation and persistence across a restart.

The real aiohttp app runs on a real 127.0.0.1 socket in-process; peers are real identities
speaking through the peer-side client (diloco.run_client.RunClient). The coordinator runs on a
fake clock (testing/clock.py): rendezvous deadlines pass when a test advances it, not by sleeping."""
from __future__ import annotations

import asyncio
import hashlib
import json as _json

import pytest
import torch
from aiohttp.test_utils import TestServer

from coordinator.app import CoordinatorConfig, create_app
from coordinator.checkpoints import trainer_state_hash
from coordinator.store import Store
from diloco.run_client import RunClient
from diloco.state_io import build_manifest
from peer.identity import Identity
from peer.membership import CoordinatorError
from testing.clock import FakeClock
from testing.signed import Signer, encode_body

TOKEN = "runs-api-token-51eea5e4842348fe750276b80dcd4be63e0da44a"
CONFIG = {"preset": "micro", "inner_steps": 5, "sync_timeout_s": 2.0, "checkpoint_every": 2}
H0, H1 = "0" * 64, "1" * 64


class Coord:
    def __init__(self, server: TestServer, store: Store, clock: FakeClock) -> None:
        self.server, self.store, self.clock = server, store, clock
        self.url = str(server.make_url("")).rstrip("/")

    async def stop(self) -> None:
        await self.server.close()
        self.store.close()

    async def peer(self, config: dict = CONFIG, explicit: list[str] = ()) -> tuple[RunClient, dict]:
        client = RunClient(self.url, TOKEN, Identity.generate(), timeout=30)
        await client.join(f"127.0.0.1:{9000 + len(client.identity.peer_id) % 97}", {"roles": ["train"]})
        return client, await client.join_run("r", dict(config), list(explicit))

    async def raw(self, method: str, path: str, data=None, signed: bool = True,
                  json=None, identity: Identity | None = None) -> tuple[int, dict | bytes]:
        """One request with exactly this body, signed by ``identity`` (default: a fresh one),
        admitted with the token (``signed=False``: no signature at all)."""
        body = encode_body(json) if json is not None else (data or b"")
        async with Signer(self.url, identity) as s:
            if not signed:
                answer = await s.send(method, path, body)
            else:
                assert (await s.admit_token(TOKEN)).status == 200
                answer = await s.request(method, path, body)
        try:
            return answer.status, _json.loads(answer.raw)
        except ValueError:
            return answer.status, answer.raw


async def start(data_dir) -> Coord:
    store = Store(data_dir)
    store.open()
    config = CoordinatorConfig(data_dir=data_dir, token=TOKEN, heartbeat_interval=0.5,
                               peer_timeout=5.0)
    clock = FakeClock()
    server = TestServer(create_app(config, store, clock=clock), host="127.0.0.1")
    await server.start_server()
    return Coord(server, store, clock)


@pytest.fixture
async def coord(tmp_path):
    c = await start(tmp_path / "coord")
    yield c
    await c.stop()


async def test_first_creator_wins_and_explicit_conflicts_are_reported(coord):
    a, first = await coord.peer()
    assert first["created"] and first["config"] == CONFIG and first["slot"] == 0
    b, second = await coord.peer({**CONFIG, "inner_steps": 50, "codec": "int4"}, ["codec"])
    assert not second["created"] and second["config"] == CONFIG and "slot" not in second
    assert second["conflicts"] == {"codec": {"stored": None, "requested": "int4"}}
    # Differences in keys it did not set explicitly do not matter: it is admitted.
    third = await b.join_run("r", {**CONFIG, "inner_steps": 50}, [])
    assert not third["conflicts"] and third["slot"] == 1
    members = (await a.run_info("r"))["members"]
    assert [m["peer_id"] for m in members] == [a.identity.peer_id, b.identity.peer_id]
    for c in (a, b):
        await c.close()


async def test_rendezvous_agrees_on_sorted_participants_and_late_peer_resyncs(coord):
    (a, _), (b, _), (c, _) = [await coord.peer() for _ in range(3)]
    # First window waits for every live member of the run (all three), closes when all arrive.
    answers = await asyncio.gather(*(p.sync("r", 1, H0, deadline_s=20) for p in (a, b, c)))
    ids = sorted(p.identity.peer_id for p in (a, b, c))
    for ans in answers:
        assert ans["participants"] == ids and ans["participant"] and not ans["resync"]
        assert ans["tag"] == "r.g1.s1"
    # Exactly the first participant is asked to checkpoint at steps divisible by 2.
    two = await asyncio.gather(a.sync("r", 2, H1, deadline_s=20), b.sync("r", 2, H1, deadline_s=20),
                               c.sync("r", 2, H0, deadline_s=20))
    majority = sorted([a.identity.peer_id, b.identity.peer_id])
    assert two[0]["participants"] == majority and two[2]["resync"] and not two[2]["participant"]
    assert {d["peer_id"] for d in two[2]["donors"]} == set(majority)
    assert sum(t["checkpoint"] for t in two) == 1 and two[0]["majority_hash"] == H1
    late = await c.sync("r", 2, H1, deadline_s=20)
    assert late["late"] and late["resync"] and late["participants"] == majority
    # Reports: the agree flag follows the majority of that step's reports.
    assert (await a.report("r", 2, H1, {"loss": 3.5, "tokens": 100}))["agree"] is True
    await b.report("r", 2, H1, {"loss": 3.0})
    assert (await c.report("r", 2, H0, {}))["agree"] is False
    summary = await a.run_info("r")
    assert summary["step"] == 2 and summary["steps"][0]["hashes"] == {H1: 2, H0: 1}
    for p in (a, b, c):
        await p.close()


async def test_window_closes_after_timeout_without_a_silent_member(coord):
    (a, _), (b, _) = [await coord.peer() for _ in range(2)]
    answers = await asyncio.gather(a.sync("r", 1, H0, deadline_s=20),
                                   b.sync("r", 1, H0, deadline_s=20))
    assert len(answers[0]["participants"]) == 2
    alone = asyncio.ensure_future(a.sync("r", 2, H0, deadline_s=20))  # b never comes
    await coord.clock.until_sleeping(2)  # the failure detector and this window's watcher
    await coord.clock.advance(1.9)       # sync_timeout_s is 2: the watcher looked, still open
    assert (await a.run_info("r"))["step"] == 1 and not alone.done()
    await coord.clock.advance(0.2)
    assert (await asyncio.wait_for(alone, 10))["participants"] == [a.identity.peer_id]
    # A peer that stopped training is not waited for at all: the window closes with the clock
    # standing still.
    c, _ = await coord.peer()
    await c.leave_run("r")
    closed = await asyncio.wait_for(a.sync("r", 3, H0, deadline_s=20), 10)
    assert closed["participants"] == [a.identity.peer_id]
    summary = await a.run_info("r")
    assert [m["training"] for m in summary["members"]] == [True, True, False]
    for p in (a, b, c):
        await p.close()


async def test_bad_requests_get_clear_4xx(coord):
    a, _ = await coord.peer()
    with pytest.raises(CoordinatorError, match="400.*step"):
        await a.sync("r", 0, H0, deadline_s=5)
    with pytest.raises(CoordinatorError, match="400.*base_hash"):
        await a.sync("r", 1, "xyz", deadline_s=5)
    with pytest.raises(CoordinatorError, match="400.*metrics.bogus"):
        await a.report("r", 1, H0, {"bogus": 1})
    with pytest.raises(CoordinatorError, match="400.*finite"):
        await a.report("r", 1, H0, {"loss": -1})
    with pytest.raises(CoordinatorError, match="404.*unknown_run|404.*does not exist"):
        await a.sync("nope", 1, H0, deadline_s=5)
    with pytest.raises(CoordinatorError, match="400.*sync_timeout_s"):
        await a.join_run("other", {"sync_timeout_s": "soon"}, [])
    status, body = await coord.raw("GET", "/api/runs/r", signed=False)
    assert status == 401
    status, body = await coord.raw("GET", "/api/runs/..%2Fetc")
    assert status in (400, 404)
    status, body = await coord.raw("GET", "/api/runs/r/reports?since=-1")
    assert status == 400 and "since" in body["message"]
    outsider = RunClient(coord.url, TOKEN, Identity.generate(), timeout=5)
    await outsider.join("127.0.0.1:9999", {})
    with pytest.raises(CoordinatorError, match="403.*member"):
        await outsider.sync("r", 1, H0, deadline_s=5)
    for c in (a, outsider):
        await c.close()


async def test_checkpoint_upload_is_verified_resumable_and_downloadable(coord):
    a, _ = await coord.peer()
    tensors = {"w": torch.arange(3000, dtype=torch.float32), "outer_momentum.w": torch.zeros(3000)}
    _, chunks = build_manifest("r", 4, tensors, chunk_size=4096)
    state = trainer_state_hash(_, lambda sha: bytes(chunks[sha]))  # what a trainer reports
    manifest, chunks = build_manifest("r", 4, tensors, meta={"global_state_hash": state},
                                      chunk_size=4096)
    first = next(iter(chunks))
    base = H0
    for step in range(1, 5):  # uploads come from a participant of a completed, agreed step
        await a.sync("r", step, base, deadline_s=20)
        base = state if step == 4 else H0
        await a.report("r", step, base, {})
    me = a.identity
    # A body that does not hash to its name is refused; so is a manifest with chunks missing.
    status, body = await coord.raw("PUT", f"/api/runs/r/chunks/{first}", data=b"junk", identity=me)
    assert status == 400 and body["error"] == "hash_mismatch"
    status, body = await coord.raw("PUT", "/api/runs/r/checkpoints/4", json=manifest.to_dict(),
                                   identity=me)
    assert status == 409 and body["error"] == "missing_chunks"
    status, _ = await coord.raw("PUT", f"/api/runs/r/chunks/{first}", data=bytes(chunks[first]),
                                identity=me)
    assert status == 200
    done = await a.upload_checkpoint(manifest, chunks)  # resumes: the first chunk is there
    assert done["chunks_skipped"] == 1 and done["chunks_sent"] == len(chunks) - 1
    again = await a.upload_checkpoint(manifest, chunks)
    assert again["chunks_sent"] == 0
    latest = await a.latest_manifest("r")
    assert latest is not None and latest.step == 4 and latest.meta["global_state_hash"] == state
    back = await a.download_checkpoint(latest)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    status, body = await coord.raw("GET", "/api/runs/r/checkpoints")
    assert body["steps"] == [4] and body["latest"] == 4
    status, body = await coord.raw("GET", f"/api/runs/r/chunks/{'a' * 64}")
    assert status == 404
    status, body = await coord.raw("PUT", f"/api/runs/r/chunks/{hashlib.sha256(b'x').hexdigest()}",
                                   data=b"x" * (9 * 1024 * 1024), identity=me)
    assert status == 413
    status, body = await coord.raw("PUT", "/api/runs/r/checkpoints/abc", json={}, identity=me)
    assert status == 400
    await a.close()


async def test_run_state_survives_a_restart(tmp_path):
    c = await start(tmp_path / "coord")
    a, _ = await c.peer()
    await a.sync("r", 1, H0, deadline_s=20)
    await a.report("r", 1, H1, {"loss": 2.0, "data_position": 7})
    peer_id = a.identity.peer_id
    await a.close()
    await c.stop()
    c = await start(tmp_path / "coord")
    status, summary = await c.raw("GET", "/api/runs/r")
    assert status == 200 and summary["step"] == 1 and summary["config"] == CONFIG
    assert summary["data_positions"]["0"] == 7 and summary["members"][0]["peer_id"] == peer_id
    status, reports = await c.raw("GET", "/api/runs/r/reports")
    assert reports["reports"][0]["state_hash"] == H1
    await c.stop()
