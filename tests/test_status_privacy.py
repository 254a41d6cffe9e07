"""/api/status privacy and paging, and pruning of gone peers (issue 14 item 5).

The real coordinator app (coordinator/app.py:create_app) on a real 127.0.0.1 socket, in-process so
the test can seed runs and checkpoints; the operator is a real admitted identity (invite with role
``operator``, POST /api/admit, signed GET /api/status, peer/reqsign.py). Pruning runs on a fake
clock (testing/clock.py). The page itself is loaded in headless Chromium when it is installed
(as tests/test_status_page.py does) and must render the public view.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from coordinator.app import CoordinatorConfig, create_app
from coordinator.auth import create_invite
from coordinator.membership import REGISTRY
from coordinator.registry import Limits, MembershipRegistry, PeerMeta, Timing
from coordinator.status import PAGE_DEFAULTS
from coordinator.store import Store
from coordinator.validation import ApiError
from peer import reqsign
from peer.admission import ADMIT_PATH, AdmitRequest, invite_proof
from peer.identity import Identity
from testing.clock import FakeClock

TOKEN = "status-privacy-token-0f7c2a9e51b84d3c9a6e2f10b7d4c8e3"
META = PeerMeta(device="cpu", memory=1 << 30, roles=["train"], throughput=1e9,
                extra={"zone": "secret-zone-7"})
RUN_SECRET = "s3://private-bucket-91b2/data?sig=do-not-show"
STATE_HASH = "ab" * 32


class Coord:
    def __init__(self, server: TestServer, store: Store, app) -> None:
        self.server, self.store, self.app = server, store, app
        self.url = str(server.make_url("")).rstrip("/")
        self.registry: MembershipRegistry = app[REGISTRY]
        self.operator: Identity | None = None

    async def get(self, path: str, *, signed: bool = False) -> tuple[int, dict]:
        headers = reqsign.sign_headers(self.operator, "GET", path) if signed else {}
        async with aiohttp.ClientSession() as s:
            async with s.get(self.url + path, headers=headers) as r:
                return r.status, await r.json(content_type=None)

    async def admit(self, role: str = "operator") -> Identity:
        invite_id, secret = await self.store.run(
            lambda conn: create_invite(conn, [role], expires_s=600, uses=1, now=time.time()))
        ident = Identity.generate()
        body = json.dumps(AdmitRequest(invite=invite_id,
                                       proof=invite_proof(secret, ident.public_bytes)).to_json()).encode()
        headers = reqsign.sign_headers(ident, "POST", ADMIT_PATH, body, with_key=True)
        async with aiohttp.ClientSession() as s:
            async with s.post(self.url + ADMIT_PATH, data=body,
                              headers={**headers, "Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["roles"] == [role]
        return ident


@pytest.fixture
async def coord(tmp_path):
    store = Store(tmp_path)
    store.open()
    # No probes: the seeded peers announce documentation addresses (198.51.100.x), never dialled.
    config = CoordinatorConfig(data_dir=tmp_path, token=TOKEN, heartbeat_interval=0.5, peer_timeout=2.0,
                               probe_reachability=False)
    app = create_app(config, store, clock=FakeClock())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    c = Coord(server, store, app)
    c.operator = await c.admit("operator")
    yield c
    await server.close()
    store.close()


def seed_run(conn, run: str, peers: list[str]) -> None:
    """A run with one closed window and agreeing reports (tables of coordinator/runs.py)."""
    now = time.time()
    conn.execute("INSERT INTO runs (name, config, creator, created_at, updated_at, step) "
                 "VALUES (?, ?, ?, ?, ?, 1)",
                 (run, json.dumps({"data": RUN_SECRET, "inner_steps": 5}), peers[0], now, now))
    conn.execute("INSERT INTO run_windows (run, generation, step, opened_at, closed_at, participants) "
                 "VALUES (?, 1, 1, ?, ?, ?)", (run, now, now, json.dumps([[p, 1] for p in peers])))
    for p in peers:
        conn.execute("INSERT INTO run_reports (run, generation, step, peer_id, ts, state_hash, metrics) "
                     "VALUES (?, 1, 1, ?, ?, ?, ?)", (run, p, now, STATE_HASH, json.dumps({"loss": 3.0})))


async def seed(coord: Coord, n_peers: int = 3, n_runs: int = 1) -> list[tuple[Identity, str]]:
    peers = []
    for i in range(n_peers):
        ident = Identity.generate()
        address = f"198.51.100.{i + 1}:{7000 + i}"
        await coord.registry.join(ident.peer_id, ident.public_bytes, address, META,
                                  observed=f"203.0.113.{i + 1}")
        await coord.registry.set_reachability(ident.peer_id, 1, i % 2 == 0, 0.0123,
                                              None if i % 2 == 0 else f"cannot connect to {address}")
        peers.append((ident, address))
    ids = [p[0].peer_id for p in peers]
    for r in range(n_runs):
        await coord.store.run(seed_run, f"run{r:03d}", ids)
    return peers


def secrets_of(peers) -> list[str]:
    out = [RUN_SECRET, STATE_HASH, "secret-zone-7"]
    for i, (_, address) in enumerate(peers):
        out += [address, address.split(":")[0], f"203.0.113.{i + 1}"]
    return out


async def test_public_status_hides_addresses_hashes_and_configs(coord, tmp_path):
    peers = await seed(coord)
    import torch
    from coordinator.checkpoints import CheckpointStore, LocalBackend, save_state
    save_state(CheckpointStore(LocalBackend(tmp_path / "checkpoints"), "run000"), 1,
               {"w": torch.ones(8)})

    server, other = peers[0][0].peer_id, peers[1][0].peer_id
    await coord.registry.heartbeat(server, {
        "serve": {"model": "m", "n_layers": 4, "blocks": [0, 2], "sessions": 1, "tokens_per_s": 5.0},
        "links": {other: {"ping_rtt_s": 0.002, "rtt_s": 0.003, "note": "free text", "path": "relayed"},
                  "not-a-peer-id": {}}})
    await coord.registry.heartbeat(other, {})

    status, public = await coord.get("/api/status")
    assert status == 200 and public["view"] == "public"
    [model] = public["inference"]
    assert model["model"] == "m" and model["gaps"] == [[2, 4]] and model["servers"][0]["peer_id"] == server
    assert public["links"]["rows"][server] == {other: {"rtt_s": 0.003, "ping_rtt_s": 0.002,
                                                       "bandwidth_Bps": None, "path": "relayed"}}
    assert public["peers"][0]["stats"] == {"links": {other: {"rtt_s": 0.003, "ping_rtt_s": 0.002,
                                                             "bandwidth_Bps": None}}}
    assert public["runs"][0]["members_training"] == 0 and public["runs"][0]["state"] == "idle"
    text = json.dumps(public)
    for secret in secrets_of(peers):
        assert secret not in text, f"public status leaks {secret!r}"
    assert all("address" not in p and "observed" not in p and "probe_error" not in p
               for p in public["peers"])
    assert [p["reachable"] for p in public["peers"]] == [True, False, True]
    assert public["reachability"] == {"reachable": 2, "unreachable": 1, "unprobed": 0}
    async with aiohttp.ClientSession() as s:
        async with s.get(coord.url + "/metrics") as r:
            metrics = await r.text()
    assert 'lowband_coordinator_peer_reachability{outcome="unreachable"} 1.0' in metrics
    [run] = public["runs"]
    assert "config" not in run and run["hash_agreement"] == {"step": 1, "agreed": True, "groups": [3]}
    [ckpt] = public["checkpoints"]
    assert "state_hash" not in ckpt and ckpt["step"] == 1
    assert any(e["kind"] == "join" for e in public["events"])
    assert all("address" not in e["detail"] and "observed" not in e["detail"] for e in public["events"])

    status, full = await coord.get("/api/status", signed=True)
    assert status == 200 and full["view"] == "operator"
    text = json.dumps(full)
    for secret in secrets_of(peers):
        assert secret in text, f"operator view lacks {secret!r}"
    rows = {p["peer_id"]: p for p in full["peers"]}
    ident, address = peers[1]
    assert rows[ident.peer_id]["address"] == address and rows[ident.peer_id]["observed"] == "203.0.113.2"
    assert rows[ident.peer_id]["reachable"] is False and address in rows[ident.peer_id]["probe_error"]
    assert full["runs"][0]["hash_agreement"]["hashes"] == {STATE_HASH: sorted(p[0].peer_id for p in peers)}
    assert full["checkpoints"][0]["state_hash"]

    # Signed by an admitted identity without the operator role: the public view.
    coord.operator = await coord.admit("train")
    status, body = await coord.get("/api/status", signed=True)
    assert status == 200 and body["view"] == "public" and RUN_SECRET not in json.dumps(body)


async def test_status_is_paginated(coord):
    peers = await seed(coord, n_peers=25, n_runs=3)
    seen = []
    for offset in range(0, 30, 10):
        status, page = await coord.get(f"/api/status?peers_offset={offset}&peers_limit=10")
        assert status == 200
        assert page["pages"]["peers"] == {"offset": offset, "limit": 10, "total": 25}
        seen += [p["peer_id"] for p in page["peers"]]
        assert set(page["links"]["peers"]) <= {p["peer_id"] for p in page["peers"]}
        assert page["counts"]["joining"] == 25  # counts cover everyone
    assert seen == [p[0].peer_id for p in peers]  # join order, no gaps, no repeats

    _, page = await coord.get("/api/status?events_limit=5&events_offset=5&runs_limit=2&runs_offset=1")
    assert len(page["events"]) == 5 and page["pages"]["events"]["total"] >= 25
    assert [r["run_id"] for r in page["runs"]] == ["run001", "run002"]
    assert page["pages"]["runs"] == {"offset": 1, "limit": 2, "total": 3}
    _, newest = await coord.get("/api/status?events_limit=10")
    assert newest["events"][5:10] == page["events"]  # newest first, pages line up

    _, default = await coord.get("/api/status")
    assert default["pages"]["peers"]["limit"] == PAGE_DEFAULTS["peers"][0]
    for bad in ("peers_limit=100000", "peers_offset=-1", "events_limit=x", "runs_limit=1e3",
                "peers_limit=%C2%B2", "peers_offset=99999999999"):
        status, body = await coord.get(f"/api/status?{bad}")
        assert status == 400 and body["error"] == "bad_request" and "must be an integer" in body["message"]


async def test_gone_peers_are_pruned_and_tables_stay_consistent(tmp_path):
    store = Store(tmp_path)
    store.open()
    from coordinator.runs import RUNS_MIGRATIONS
    store.apply_schema("runs", RUNS_MIGRATIONS)
    clock = FakeClock()
    reg = MembershipRegistry(store, Timing(0.5, 2.0, retention_s=600.0, prune_every_s=1.0),
                             clock=clock, limits=Limits(max_gone_rows=50, max_events=100))
    try:
        idents = [Identity.generate() for _ in range(120)]
        for ident in idents:
            await reg.join(ident.peer_id, ident.public_bytes, "127.0.0.1:9", META, observed="127.0.0.1")
        await store.run(lambda conn: conn.executemany(
            "INSERT INTO run_members (run, peer_id, slot, joined_at) VALUES ('r', ?, 0, 0)",
            [(i.peer_id,) for i in idents]))
        keep = idents[0]
        for ident in idents[1:]:
            await reg.leave(ident.peer_id)
        await reg.sweep()
        # Over the cap of gone rows: the oldest beyond 50 went at once.
        counts = await reg.counts()
        assert counts["left"] == 50 and counts["joining"] == 1
        assert await store.run(lambda conn: conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]) <= 101

        await reg.heartbeat(keep.peer_id, {})  # stays alive through the retention
        clock.now += 601
        await reg.heartbeat(keep.peer_id, {})
        pruned = await reg.sweep()
        assert (await reg.counts()) == {"joining": 0, "active": 1, "suspect": 0, "dead": 0, "left": 0}
        members = await store.run(
            lambda conn: [r[0] for r in conn.execute("SELECT peer_id FROM run_members")])
        assert members == [keep.peer_id]  # memberships of pruned peers went with them
        assert await reg.public_key(idents[5].peer_id) is None  # no stale key cache
        assert pruned == []  # sweep's return value still lists only demotions
        # A pruned peer can join again, as a first incarnation.
        again = await reg.join(idents[5].peer_id, idents[5].public_bytes, "127.0.0.1:9", META)
        assert again["incarnation"] == 1
    finally:
        store.close()


async def test_joins_from_one_address_are_bounded(tmp_path):
    store = Store(tmp_path)
    store.open()
    reg = MembershipRegistry(store, Timing(0.5, 2.0), limits=Limits(max_live_per_address=100))
    try:
        refused = 0
        for i in range(300):
            ident = Identity.generate()
            try:
                await reg.join(ident.peer_id, ident.public_bytes, "127.0.0.1:9", META, observed="192.0.2.1")
            except ApiError as e:
                assert e.status == 429 and e.code == "too_many_from_address"
                refused += 1
        assert refused == 200
        # Another address is not affected.
        other = Identity.generate()
        await reg.join(other.peer_id, other.public_bytes, "127.0.0.1:9", META, observed="192.0.2.2")
        assert (await reg.counts())["joining"] == 101
    finally:
        store.close()


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.mark.slow
async def test_public_page_renders_in_headless_chromium(coord, tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium/chromedriver not installed (tests/test_status_page.py installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    peers = await seed(coord, n_peers=5)
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)

    _, operator_status = await coord.get("/api/status?peers_limit=2&peers_offset=2", signed=True)

    def browse() -> dict:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.get(coord.url + "/?peers_limit=2&peers_offset=2")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                rows = driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr")
                if len(rows) == 2 and driver.find_elements(By.ID, "peer-range"):
                    break
                time.sleep(0.2)
            first = [r.get_attribute("data-peer-id") for r in
                     driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr")]
            out = {"rows": first, "range": driver.find_element(By.ID, "peer-range").text,
                   "view": driver.find_element(By.TAG_NAME, "body").get_attribute("data-view"),
                   "addresses": [td.text for td in driver.find_elements(By.CSS_SELECTOR, "td.address")],
                   "reach": [td.text for td in driver.find_elements(By.CSS_SELECTOR, "td.reach")],
                   "text": driver.find_element(By.TAG_NAME, "body").text}
            driver.find_element(By.ID, "peer-next").click()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if driver.find_element(By.ID, "peer-range").text.startswith("peers 5"):
                    break
                time.sleep(0.2)
            out["next_rows"] = [r.get_attribute("data-peer-id") for r in
                                driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr")]
            out["next_range"] = driver.find_element(By.ID, "peer-range").text
            # The same page code on the operator view (a browser cannot sign requests; operators
            # read it with signed clients): rendered synchronously, before the next poll.
            out["operator"] = driver.execute_script(
                "render(arguments[0]); const cells = (c) => [...document.querySelectorAll("
                "'#peers td.' + c)].map((td) => td.textContent); return {view: "
                "document.body.dataset.view, address: cells('address'), observed: "
                "cells('observed'), reach: cells('reach'), run: document.querySelector('.run')."
                "textContent};", operator_status)
            return out
        finally:
            driver.quit()

    seen = await asyncio.to_thread(browse)
    ids = [p[0].peer_id for p in peers]
    assert seen["view"] == "public" and seen["rows"] == ids[2:4]
    assert seen["range"] == "peers 3\u20134 of 5"
    assert seen["addresses"] == ["hidden", "hidden"]
    assert seen["reach"][0].startswith("yes") and seen["reach"][1] == "no"
    for secret in secrets_of(peers):
        assert secret not in seen["text"]
    assert seen["next_rows"] == ids[4:] and seen["next_range"] == "peers 5\u20135 of 5"
    op = seen["operator"]
    assert op["view"] == "operator" and op["address"] == [p[1] for p in peers[2:4]]
    assert op["observed"] == ["203.0.113.3", "203.0.113.4"]
    assert op["reach"][0].startswith("yes, 12.3 ms") and op["reach"][1].startswith("no: cannot connect to")
    assert STATE_HASH[:8] in op["run"]


async def test_api_peers_pages_and_hides_probe_results_from_non_operators(coord):
    peers = await seed(coord, n_peers=5)
    status, full = await coord.get("/api/peers?offset=1&limit=3", signed=True)  # the operator
    assert status == 200 and (full["total"], full["offset"], full["limit"]) == (5, 1, 3)
    assert [p["peer_id"] for p in full["peers"]] == [p[0].peer_id for p in peers[1:4]]
    assert full["peers"][0]["observed"] == "203.0.113.2" and full["peers"][0]["probe_error"]

    coord.operator = await coord.admit("train")  # any admitted key (open admission: anyone)
    status, body = await coord.get("/api/peers", signed=True)
    assert status == 200 and body["total"] == 5 and len(body["peers"]) == 5
    assert all("observed" not in p and "probe_error" not in p for p in body["peers"])
    assert "203.0.113." not in json.dumps(body)
    for bad in ("limit=100000", "offset=-1", "limit=x"):
        status, body = await coord.get(f"/api/peers?{bad}", signed=True)
        assert status == 400 and "must be an integer" in body["message"]
