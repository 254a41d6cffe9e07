"""Coordinator: membership API, validation, failure detection, persistence, status page.

API tests run the real aiohttp app on a real 127.0.0.1 socket in-process (fast); process-level
behaviour (kill -9, restart, peers) is in test_join.py; admission and request signing in
test_admission.py. Failure detection runs on a fake clock
(testing/clock.py): time moves only when a test advances it, so nothing here sleeps.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from coordinator.app import CoordinatorConfig, create_app
from coordinator.registry import MembershipRegistry, PeerMeta, Timing
from coordinator.status import STATIC_DIR
from coordinator.store import Store, StoreError
from peer.identity import Identity
from peer.membership import (CoordinatorClient, CoordinatorError,
                             CoordinatorUnavailable, NotRegistered, canonical_json)
from coordinator.validation import ApiError
from testing import ROOT
from testing.clock import FakeClock
from testing.signed import Signer

TOKEN = "test-swarm-token-2d848a32957f6427367eaf6a92dc3d829d528049"
META = {"device": "cpu", "memory": 1 << 30, "roles": ["train"], "throughput": 1e9, "zone": "a"}


class Coord:
    def __init__(self, server: TestServer, store: Store, clock: FakeClock) -> None:
        self.server, self.store, self.clock = server, store, clock
        self.url = str(server.make_url("")).rstrip("/")

    def client(self, identity: Identity | None = None, token: str | None = TOKEN) -> CoordinatorClient:
        return CoordinatorClient(self.url, token, identity or Identity.generate(), timeout=5)

    async def post(self, path: str, data: bytes | str, identity: Identity | None = None) -> tuple[int, dict]:
        """POST ``data`` as is, signed by ``identity`` (admitted with the token first)."""
        async with Signer(self.url, identity) as s:
            if (await s.admit_token(TOKEN)).status != 200:
                raise AssertionError("token admission failed")
            answer = await s.request("POST", path, data if isinstance(data, bytes) else data.encode())
            return answer.status, answer.json


async def start_coord(data_dir, **timing) -> Coord:
    store = Store(data_dir)
    store.open()
    config = CoordinatorConfig(data_dir=data_dir, token=TOKEN, **timing)
    clock = FakeClock()
    server = TestServer(create_app(config, store, clock=clock), host="127.0.0.1")
    await server.start_server()
    return Coord(server, store, clock)


@pytest.fixture
async def coord(tmp_path):
    c = await start_coord(tmp_path, heartbeat_interval=0.1, peer_timeout=0.8)
    yield c
    await c.server.close()
    c.store.close()


async def test_join_heartbeat_leave_lifecycle(coord):
    ident = Identity.generate()
    async with coord.client(ident) as c:
        answer = await c.join("127.0.0.1:9001", META)
        assert answer["state"] == "joining" and answer["peer_id"] == ident.peer_id
        assert answer["heartbeat_interval"] == 0.1 and answer["peer_timeout"] == 0.8
        assert [p["peer_id"] for p in answer["peers"]] == [ident.peer_id]

        hb = await c.heartbeat({"throughput": 2.5e9, "links": {"ab" * 20: {"ping_rtt_s": 0.001}}})
        assert hb["state"] == "active"
        (info,) = await c.peers()
        assert info.state == "active" and info.device == "cpu" and info.memory == 1 << 30
        assert info.roles == ["train"] and info.throughput == 2.5e9 and info.meta == {"zone": "a"}
        assert info.stats["links"]["ab" * 20]["ping_rtt_s"] == 0.001

        await c.leave()
        (info,) = await c.peers()
        assert info.state == "left"
        with pytest.raises(NotRegistered, match="left"):
            await c.heartbeat({})
        again = await c.join("127.0.0.1:9002", META)  # a left peer may come back
        assert again["incarnation"] == 2
        status = await c.status()
    kinds = [e["kind"] for e in status["events"] if e["kind"] in ("join", "active", "leave", "rejoin")]
    assert kinds[:4] == ["rejoin", "leave", "active", "join"]
    assert status["counts"]["joining"] == 1


async def test_three_peers_see_each_other(coord):
    idents = [Identity.generate() for _ in range(3)]
    clients = [coord.client(i) for i in idents]
    for n, c in enumerate(clients):
        await c.join(f"127.0.0.1:{9100 + n}", META)
    answers = [await c.heartbeat({}) for c in clients]
    for a in answers:
        assert {p["peer_id"] for p in a["peers"]} == {i.peer_id for i in idents}
    for c in clients:
        await c.close()


async def test_admission_required_and_checked(coord):
    async with coord.client(token="wrong-" + TOKEN) as c:
        with pytest.raises(CoordinatorError, match="token") as err:
            await c.join("127.0.0.1:9001", META)
        assert (err.value.status, err.value.code) == (403, "bad_token_proof")
    async with coord.client(token=None) as c:
        with pytest.raises(CoordinatorError) as err:
            await c.join("127.0.0.1:9001", META)
        assert (err.value.status, err.value.code) == (403, "not_admitted")
    async with aiohttp.ClientSession() as s:  # the token itself opens nothing
        async with s.post(coord.url + "/api/join", data=b"{}",
                          headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 401 and (await r.json())["error"] == "bearer_not_accepted"


@pytest.mark.parametrize("payload,code", [
    (b"{not json", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b"[1, 2]", "malformed_json"),
    (b'{"timestamp": NaN}', "malformed_json"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "malformed_json"),
    (b"{}", "bad_request"),
    (b'{"address": 5}', "bad_request"),
    (b'{"address": "zz"}', "bad_request"),
])
async def test_malformed_join_bodies_are_400(coord, payload, code):
    status, body = await coord.post("/api/join", payload)
    assert status == 400, body
    assert body["error"] == code and body["message"]


async def test_join_field_validation(coord):
    ident = Identity.generate()
    cases = [
        ({"address": "no-port", "meta": {}}, 400, "address"),
        ({"address": "127.0.0.1:99999", "meta": {}}, 400, "port"),
        ({"address": "127.0.0.1:1", "meta": []}, 400, "meta"),
        ({"address": "127.0.0.1:1", "meta": {"memory": -1}}, 400, "memory"),
        ({"address": "127.0.0.1:1", "meta": {"memory": True}}, 400, "memory"),
        ({"address": "127.0.0.1:1", "meta": {"roles": ["Bad Role"]}}, 400, "roles"),
        ({"address": "127.0.0.1:1", "meta": {"device": 3}}, 400, "device"),
        ({"address": "127.0.0.1:1", "meta": {"x": "y" * 10_000}}, 413, "meta"),
    ]
    for fields, want_status, word in cases:
        status, body = await coord.post("/api/join", canonical_json(fields), ident)
        assert status == want_status and word in body["message"], (fields, body)


async def test_heartbeat_checks(coord):
    ident = Identity.generate()
    async with coord.client(ident) as c:
        with pytest.raises(NotRegistered, match="not registered"):
            await c.heartbeat({})
        await c.join("127.0.0.1:9001", {})
    # an admitted intruder cannot heartbeat for this peer: its key signs under its own id
    async with Signer(coord.url) as intruder:
        await intruder.admit_token(TOKEN)
        headers = intruder.headers("POST", "/api/heartbeat", b"{}")
        headers["X-Lowband-Peer"] = ident.peer_id
        answer = await intruder.send("POST", "/api/heartbeat", b"{}", headers)
        assert answer.status == 403 and answer.code == "bad_signature"
    status, answer = await coord.post("/api/heartbeat", canonical_json({"stats": [1]}), ident)
    assert status == 400 and "stats" in answer["message"]
    big = {"stats": {"blob": "x" * 100_000}}
    status, answer = await coord.post("/api/heartbeat", canonical_json(big), ident)
    assert status == 413
    status, answer = await coord.post("/api/heartbeat", b"x" * 300_000, ident)
    assert status == 413 and answer["error"] == "body_too_large"


async def test_silent_peer_goes_suspect_then_dead_and_may_rejoin(tmp_path):
    """The failure detector's own loop (no explicit sweep): suspect after half the timeout of
    silence, dead after all of it, and a dead peer must join again."""
    c = await start_coord(tmp_path, heartbeat_interval=0.1, peer_timeout=0.8)
    clock = c.clock
    ident = Identity.generate()
    try:
        async with c.client(ident) as client:
            await clock.until_sleeping(1)  # the detector waits for its next sweep
            await clock.advance(1.0)       # past the restart grace period
            await client.join("127.0.0.1:9001", {})
            await client.heartbeat({})
            seen = []
            for _ in range(2):
                await clock.advance(0.5)   # the detector wakes (every 0.08 s) and sweeps
                (info,) = await client.peers()
                seen.append(info.state)
            assert seen == ["suspect", "dead"]
            with pytest.raises(NotRegistered, match="dead") as err:
                await client.heartbeat({})
            assert err.value.status == 410
            await client.join("127.0.0.1:9001", {})
            assert (await client.heartbeat({}))["state"] == "active"
    finally:
        await c.server.close()
        c.store.close()


def _registry(store: Store, clock: FakeClock, timing: Timing = Timing(1.0, 10.0)) -> MembershipRegistry:
    return MembershipRegistry(store, timing, clock=clock)


async def _joined(registry: MembershipRegistry) -> str:
    ident = Identity.generate()
    await registry.join(ident.peer_id, ident.public_bytes, "127.0.0.1:1", PeerMeta(None, None, [], None, {}))
    await registry.heartbeat(ident.peer_id, {})
    return ident.peer_id


async def test_failure_detector_thresholds_on_a_fake_clock(tmp_path):
    """Exact edges: suspect once silent for more than half the timeout, dead after the whole
    timeout; a heartbeat brings a suspect back, not a dead peer."""
    store = Store(tmp_path)
    store.open()
    clock = FakeClock()
    registry = _registry(store, clock)  # timeout 10 s, suspect after 5 s
    await clock.advance(10.01)          # past the restart grace period
    peer = await _joined(registry)
    try:
        await clock.advance(4.99)
        assert await registry.sweep() == []
        await clock.advance(0.02)
        assert await registry.sweep() == [(peer, "suspect")]
        assert await registry.heartbeat(peer, {}) == "active"  # recovered
        await clock.advance(9.99)
        assert await registry.sweep() == [(peer, "suspect")]
        assert await registry.sweep() == []  # a transition is reported once
        await clock.advance(0.02)
        assert await registry.sweep() == [(peer, "dead")]
        (row,) = await registry.peers()
        assert row["state"] == "dead" and row["heartbeat_age_s"] == pytest.approx(10.01)
        with pytest.raises(ApiError) as err:
            await registry.heartbeat(peer, {})
        assert (err.value.status, err.value.code) == (410, "peer_dead")
    finally:
        store.close()


async def test_restart_grace_period(tmp_path):
    """After a restart nobody is declared dead before one timeout has passed."""
    store = Store(tmp_path)
    store.open()
    clock = FakeClock()
    timing = Timing(heartbeat_interval=0.1, peer_timeout=1.0)
    peer = await _joined(_registry(store, clock, timing))
    await clock.advance(1.2)  # silent longer than the timeout while "the coordinator was down"
    restarted = _registry(store, clock, timing)
    assert await restarted.sweep() == [(peer, "suspect")]
    assert (await restarted.peers())[0]["state"] == "suspect"
    assert await restarted.heartbeat(peer, {}) == "active"  # came back within grace
    await clock.advance(0.99)  # silent past the timeout's half, grace not over
    assert await restarted.sweep() == [(peer, "suspect")]
    await clock.advance(0.02)  # grace over and silent 1.01 s
    assert await restarted.sweep() == [(peer, "dead")]
    store.close()


def test_store_survives_reopen_and_rejects_bad_dirs(tmp_path):
    store = Store(tmp_path / "d")
    store.open()
    store.close()
    store = Store(tmp_path / "d")
    store.open()  # idempotent schema
    store.close()

    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="data dir"):
        Store(tmp_path / "file").open()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "coordinator.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="coordinator.sqlite3"):
        Store(corrupt).open()

    newer = tmp_path / "newer"
    store = Store(newer)
    store.open()
    store.conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'events'")
    store.close()
    with pytest.raises(StoreError, match="schema v99"):
        Store(newer).open()


def test_cli_reports_unusable_data_dir(tmp_path):
    bad = tmp_path / "occupied"
    bad.write_text("not a dir")
    out = subprocess.run([sys.executable, "-m", "coordinator", "start", "--port", "0",
                          "--data-dir", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert str(bad) in out.stderr and "Traceback" not in out.stderr


async def test_status_page_and_api(coord):
    ident = Identity.generate()
    async with coord.client(ident) as c:
        await c.join("127.0.0.1:9001", META)
    async with aiohttp.ClientSession() as s:
        async with s.get(coord.url + "/") as r:
            html = await r.text()
            assert r.status == 200 and '<script src="/static/status.js">' in html
            assert "http" not in html.replace("http-equiv", "")  # no CDN
        async with s.get(coord.url + "/static/status.js") as r:
            assert r.status == 200 and "/api/status" in await r.text()
        async with s.get(coord.url + "/api/status") as r:
            status = await r.json()
        async with s.get(coord.url + "/api/peers") as r:  # not public
            assert r.status == 401
        async with s.get(coord.url + "/api/nothing") as r:
            assert r.status == 404 and (await r.json())["error"]
    async with Signer(coord.url, ident) as signer:
        assert (await signer.request("GET", "/api/peers?state=bogus")).status == 400
        peers = (await signer.request("GET", "/api/peers")).json["peers"]
    assert peers[0]["peer_id"] == ident.peer_id
    assert set(status["coordinator"]) >= {"heartbeat_interval", "peer_timeout", "uptime_s"}


async def test_client_reports_unreachable_coordinator():
    async with CoordinatorClient("http://127.0.0.1:9", TOKEN, Identity.generate(), timeout=2) as c:
        with pytest.raises(CoordinatorUnavailable, match="unreachable"):
            await c.status()
    assert issubclass(CoordinatorUnavailable, CoordinatorError)


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_status_page_script_parses():
    out = subprocess.run(["node", "--check", str(STATIC_DIR / "status.js")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
