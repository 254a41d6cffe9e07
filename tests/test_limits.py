"""Limits everywhere: request rates per peer, concurrent handlers, unread mailbox bytes and inbound
connections of a PeerHost; request rates per peer id / per address, the peer cap, held long-polls,
runs and report retention of the coordinator; a client that disconnects mid-body and malformed HTTP
requests cost the coordinator no 500 and no traceback in its log.

PeerHosts talk over real TCP on 127.0.0.x in-process; the HTTP limits run against a real
`coordinator start` process (run limits against the real app on a real socket, in-process).
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from coordinator.app import CoordinatorConfig, create_app
from coordinator.runs import RunLimits
from coordinator.store import Store
from diloco.run_client import RunClient
from peer.errors import PeerUnavailable, RemoteBusy, RemoteRateLimited
from peer.identity import Identity
from peer.membership import CoordinatorError
from peer.ratelimit import RateLimiter
from peer.transport import HostLimits
from testing.signed import Answer, Signer
from tests.harness import start_coordinator, wait_until_async

TOKEN = "limits-token-d9569f5fd50172bbf680228378fb0bc9e3472169"
H0 = "0" * 64


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = RateLimiter(2.0, 3, max_keys=2, clock=lambda: now[0])
    assert [bucket.acquire("a") for _ in range(3)] == [0.0] * 3
    assert bucket.acquire("a") == pytest.approx(0.5)  # empty: one token in 1/rate s
    assert bucket.acquire("b") == 0.0  # keys are independent
    now[0] = 0.5
    assert bucket.acquire("a") == 0.0
    bucket.acquire("c")  # a third key evicts the least recently used one ("b")
    assert set(bucket._buckets) == {"a", "c"}
    with pytest.raises(ValueError):
        RateLimiter(0, 1)


# ------------------------------------------------------------------------------- PeerHost

async def test_rpc_rate_limit_per_peer(hosts):
    server = await hosts("127.0.0.21", HostLimits(rpc_rate_per_s=2.0, rpc_burst=10))
    client, other = await hosts(), await hosts()
    sid = await client.connect(server.address)
    results = await asyncio.gather(*(client.call(sid, "echo", {"n": i}, b"x") for i in range(30)),
                                   return_exceptions=True)
    ok = [r for r in results if isinstance(r, tuple)]
    limited = [r for r in results if isinstance(r, RemoteRateLimited)]
    assert 10 <= len(ok) <= 13 and len(ok) + len(limited) == 30
    assert all("rate limited" in str(e) and "retry after" in str(e) for e in limited)
    # another peer has its own bucket; the limited one is served again once tokens refill
    assert (await other.call(await other.connect(server.address), "echo", {"k": 1}, b"y"))[0] == {"k": 1}
    await asyncio.sleep(1.0)
    assert (await client.call(sid, "echo", {"again": True}))[0] == {"again": True}


async def test_concurrent_handlers_per_peer_are_capped(hosts):
    server = await hosts("127.0.0.22", HostLimits(max_handlers_per_peer=4))
    gate, running = asyncio.Event(), []

    async def slow(peer_id: str, header: dict, payload: bytearray):
        running.append(peer_id)
        await gate.wait()
        return {"i": header["i"]}, b""

    server.handle("slow", slow)
    client, other = await hosts(), await hosts()
    sid = await client.connect(server.address)
    calls = [asyncio.ensure_future(client.call(sid, "slow", {"i": i}, timeout=30)) for i in range(10)]
    await wait_until_async(lambda: sum(c.done() for c in calls) == 6)  # refused at once, not queued
    assert len(running) == 4
    for c in calls:
        if c.done():
            with pytest.raises(RemoteBusy, match="busy: 4 requests"):
                c.result()
    extra = asyncio.ensure_future(other.call(await other.connect(server.address), "slow", {"i": 99}))
    await wait_until_async(lambda: len(running) == 5)  # the cap is per peer
    gate.set()
    answers = await asyncio.gather(*[c for c in calls if not c.done()], extra)
    assert sorted(a[0]["i"] for a in answers)[-1] == 99 and len(answers) == 5
    assert (await client.call(sid, "slow", {"i": 7}))[0] == {"i": 7}  # slots are given back


async def test_unread_mailbox_bytes_are_capped(hosts, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    server = await hosts("127.0.0.23", HostLimits(max_mailbox_bytes_per_peer=1_000_000))
    client = await hosts()
    sid = await client.connect(server.address)
    block = b"m" * 400_000
    for i in range(6):  # a receiver that keeps reading never hits the cap
        await client.send(sid, f"read-{i}", {}, block)
        assert (await server.recv(client.peer_id, f"read-{i}", timeout=10))[1] == block
    await client.send(sid, "big", {}, b"b" * 1_500_000)  # alone in the mailbox: still delivered
    assert len((await server.recv(client.peer_id, "big", timeout=10))[1]) == 1_500_000
    for tag in ("a", "b", "c"):  # nobody reads: the third would make 1.2 MB unread
        try:
            await client.send(sid, tag, {}, block)
        except PeerUnavailable:
            pass  # the server may already have cut us off
    await wait_until_async(lambda: not server.connected_peers())
    assert "exceed the 1000000-byte mailbox limit" in caplog.text
    assert (await server.recv(client.peer_id, "a", timeout=5))[1] == block  # what was buffered stays
    assert (await server.recv(client.peer_id, "b", timeout=5))[1] == block
    with pytest.raises(PeerUnavailable):
        await server.recv(client.peer_id, "c", timeout=5)
    await wait_until_async(lambda: not client.connected_peers())
    await client.connect(server.address)  # read out, so the peer is welcome again
    await client.send(sid, "d", {}, block)
    assert (await server.recv(client.peer_id, "d", timeout=10))[1] == block


async def test_inbound_connections_are_capped_in_total_and_per_address(hosts, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    server = await hosts("127.0.0.24", HostLimits(max_inbound_connections=5, max_inbound_per_address=3),
                         handshake_timeout=30.0)
    ip, port = server.address.rsplit(":", 1)

    async def dial(src: str):
        return await asyncio.open_connection(ip, int(port), local_addr=(src, 0))

    async def is_open(reader: asyncio.StreamReader) -> bool:
        try:  # an admitted connection waits for our handshake; a refused one is closed at once
            return bool(await asyncio.wait_for(reader.read(1), 0.5))
        except asyncio.TimeoutError:
            return True
        except ConnectionError:
            return False

    raw = [await dial("127.0.0.1") for _ in range(4)]  # never handshake, like a scanner
    assert [await is_open(r) for r, _ in raw] == [True, True, True, False]  # 3 per address
    raw += [await dial("127.0.0.2") for _ in range(3)]
    assert [await is_open(r) for r, _ in raw[4:]] == [True, True, False]  # 5 in total
    assert "refused inbound connection" in caplog.text
    for _, w in raw[:3]:
        w.close()
    client = await hosts()
    await wait_until_async(lambda: server._inbound.open() <= 3)
    sid = await client.connect(server.address)  # freed slots admit a real peer
    assert (await client.call(sid, "echo", {"ok": 1}))[0] == {"ok": 1}
    for _, w in raw[3:]:
        w.close()


# ------------------------------------------------------------------------------- coordinator

def coordinator_child(procs, tmp_path, *flags: str):
    child = start_coordinator(procs, tmp_path / "coord", TOKEN, *flags, heartbeat=1, peer_timeout=30)
    return child, child.ready["url"]


async def member(url: str, *, join: bool = True) -> Signer:
    """A fresh identity admitted with the token (and joined): the caller closes it."""
    s = Signer(url)
    assert (await s.admit_token(TOKEN)).status == 200
    if join:
        assert (await s.join("127.0.0.1:9000", {})).status == 200
    return s


async def beat(s: Signer) -> Answer:
    return await s.request("POST", "/api/heartbeat", {"stats": {}})


async def test_coordinator_rate_limits_by_identity_and_by_address(procs, tmp_path):
    _, url = coordinator_child(procs, tmp_path, "--peer-rate", "2", "--address-rate", "10",
                               "--admit-rate", "100", "--max-peers", "40")
    peers = [await member(url) for _ in range(4)]  # 12 requests of the address's burst of 50
    try:
        # one identity over its own budget (2/s, burst 8) gets 429 with a Retry-After ...
        answers = [await beat(peers[0]) for _ in range(10)]
        limited = [a for a in answers if a.status == 429]
        assert limited and all(a.status in (200, 429) for a in answers)
        body = limited[0].json
        assert body["error"] == "rate_limited" and "this peer" in body["message"]
        assert 0 < body["retry_after"] <= 1.0 and int(limited[0].headers["Retry-After"]) >= 1
        # ... while other identities on the same address still pass
        assert (await beat(peers[1])).status == 200
        await asyncio.sleep(body["retry_after"] + 0.1)
        assert (await beat(peers[0])).status == 200
        # every request, signed or not, also counts against its address (10/s, burst 50): many
        # identities behind one address cannot multiply its budget
        statuses = [(await beat(peers[k % 3 + 1])).status for k in range(45)]
        assert 429 in statuses
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/api/status") as r:
                assert r.status == 429 and "this address" in (await r.json())["message"]
    finally:
        for p in peers:
            await p.close()


async def test_coordinator_caps_live_peers(procs, tmp_path):
    _, url = coordinator_child(procs, tmp_path, "--max-peers", "3")
    peers = [await member(url, join=False) for _ in range(4)]
    try:
        for p in peers[:3]:
            assert (await p.join()).status == 200
        refused = await peers[3].join()
        assert refused.status == 429 and refused.code == "too_many_peers" and "Retry-After" in refused.headers
        assert "limit 3" in refused.json["message"]
        assert (await peers[0].join()).status == 200  # a rejoin is fine
        assert (await peers[1].request("POST", "/api/leave", {})).status == 200
        assert (await peers[3].join()).status == 200
    finally:
        for p in peers:
            await p.close()


async def test_coordinator_survives_disconnects_mid_body_and_malformed_requests(procs, tmp_path):
    child, url = coordinator_child(procs, tmp_path)
    host, port = url.removeprefix("http://").split(":")
    sha = "ab" * 32
    uploader = await member(url)  # a participant of run r: its chunk upload is read, then cut off
    assert (await uploader.request("POST", "/api/runs/r", {"config": {}})).status == 200
    synced = await uploader.request("POST", "/api/runs/r/sync", {"step": 1, "base_hash": H0})
    assert synced.status == 200 and synced.json["participant"], synced.json
    await uploader.close()
    path = f"/api/runs/r/chunks/{sha}"

    def head() -> bytes:  # signed afresh each time: a repeated nonce would be refused as a replay
        signed = "".join(f"{k}: {v}\r\n" for k, v in
                         uploader.headers("PUT", path, b"z" * 1_000_000).items())
        return (f"PUT {path} HTTP/1.1\r\nHost: x\r\n{signed}"
                "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n").encode()
    for _ in range(3):  # the client goes away after 1% of the chunk
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head() + b"z" * 10_000)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"POST /api/join HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                    b"GET /\x00\x01 HTTP/1.1\r\n\r\n"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(garbage)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400"), answer[:100]
        writer.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            metrics = await r.text()
    chunk_lines = [line for line in metrics.splitlines()
                   if line.startswith("lowband_coordinator_requests_total{") and 'method="PUT"' in line]
    assert chunk_lines and all('status="400"' in line for line in chunk_lines), chunk_lines
    assert 'status="500"' not in metrics
    log = "\n".join(child.lines)
    assert "Traceback" not in log and "Error handling request" not in log and "unhandled" not in log


async def test_run_limits_held_syncs_runs_and_report_retention(tmp_path):
    store = Store(tmp_path / "coord")
    store.open()
    config = CoordinatorConfig(data_dir=tmp_path / "coord", token=TOKEN, heartbeat_interval=0.5,
                               peer_timeout=5.0,
                               run_limits=RunLimits(max_held_syncs=1, max_runs=2, max_reports_per_run=5))
    server = TestServer(create_app(config, store), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    clients = [RunClient(url, TOKEN, Identity.generate(), timeout=30) for _ in range(3)]
    try:
        run_config = {"sync_timeout_s": 30.0, "min_peers": 3}
        for c in clients:
            await c.join("127.0.0.1:9000", {"roles": ["train"]})
            await c.join_run("r", run_config, [])
        held = asyncio.ensure_future(clients[0].sync("r", 1, H0, deadline_s=30))
        await asyncio.sleep(0.3)
        async with Signer(url, clients[1].identity) as s:  # the window waits for a third peer
            answer = await s.request("POST", "/api/runs/r/sync", {"step": 1, "base_hash": H0})
        assert answer.status == 429 and answer.code == "too_many_waiters" and "Retry-After" in answer.headers
        assert "limit 1" in answer.json["message"]
        held.cancel()
        await clients[1].join_run("second", {}, [])
        with pytest.raises(CoordinatorError) as full:
            await clients[1].join_run("third", {}, [])
        assert full.value.status == 409 and full.value.code == "too_many_runs"
        await clients[1].join_run("second", {}, [])  # existing runs stay joinable
        for step in range(1, 11):
            await clients[2].report("r", step, H0, {"loss": float(step)})
        async with Signer(url, clients[0].identity) as s:
            reports = (await s.request("GET", "/api/runs/r/reports")).json["reports"]
        assert [r["step"] for r in reports] == [6, 7, 8, 9, 10]
    finally:
        for c in clients:
            await c.close()
        await server.close()
        store.close()
