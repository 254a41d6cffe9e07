"""Reachability (issue 15 item 1): the coordinator's dial-back probe of a joiner's announced
address (coordinator/reachability.py), against real peer processes (tests/reach_child.py: a
PeerHost under a key the test chose) and real sockets on 127.0.0.x.

What must hold: a peer listening where it says is marked reachable with an RTT and its observed
address (token and credential meshes); a peer announcing another peer's address, a non-lowband
service or a closed port is marked unreachable and nobody's handshake completes; a silent
listener costs at most the probe timeout; probes of one target are paced and capped, and a joiner
from a public address cannot aim them at private ones, so joins cannot aim the coordinator at a
third party; a probe outcome for an older incarnation is dropped. End to end (real coordinator
and `peer join` processes): the honest peers never dial a liar's third-party address, and in
network namespaces with real NAT (testing/nat.py) NATed peers are observed at their router and
marked unreachable.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from coordinator.reachability import (Pacer, ProbeLimits, Prober, credential_handshakes,
                                      private_target, probe, setup_reachability, token_handshakes)
from coordinator.registry import MembershipRegistry, PeerMeta, Timing
from coordinator.store import Store
from peer.identity import Identity
from testing.netns import unavailable_reason
from tests.harness import Procs

TOKEN = "reachability-token-6d1f0c3b9a8e47d2b5c1f0e9a8d7c6b5"
META = PeerMeta(device="cpu", memory=None, roles=["train"], throughput=None, extra={})


def start_peer(procs: Procs, host: str = "127.0.0.1",
               authority: Identity | None = None) -> tuple[Identity, dict, object]:
    identity = Identity.generate()
    env = {"LOWBAND_TEST_KEY": identity.private_bytes().hex()}
    if authority is not None:
        env["LOWBAND_TEST_AUTHORITY"] = authority.private_bytes().hex()
    child = procs.python("tests/reach_child.py", "--token", TOKEN, "--host", host, env=env,
                         ready_timeout=30)
    assert child.ready["peer_id"] == identity.peer_id
    return identity, child.ready, child


@pytest.fixture
async def registry(tmp_path):
    store = Store(tmp_path)
    store.open()
    reg = MembershipRegistry(store, Timing(0.5, 2.0))
    yield reg
    if reg.prober is not None:
        await reg.prober.close()
    store.close()


def attach(reg: MembershipRegistry, limits: ProbeLimits | None = None) -> Prober:
    """What create_app does (token mesh here); the fixture closes the prober."""
    prober = setup_reachability(web.Application(), reg, token_handshakes(TOKEN.encode()), limits)
    assert reg.prober is prober and setup_reachability(web.Application(), reg, None) is prober
    return prober


async def row(reg: MembershipRegistry, peer_id: str) -> dict:
    return next(p for p in await reg.peers() if p["peer_id"] == peer_id)


async def view_row(reg: MembershipRegistry, peer_id: str) -> dict:
    _, view = await reg.live_view()
    return next(p for p in json.loads(view) if p["peer_id"] == peer_id)


async def test_listening_peer_is_reachable_with_rtt_and_observed_address(procs, registry):
    identity, ready, child = start_peer(procs)
    prober = attach(registry)
    await registry.join(identity.peer_id, identity.public_bytes, ready["address"], META,
                        observed="127.0.0.1")
    assert (await view_row(registry, identity.peer_id))["reachable"] is None  # probe pending
    await asyncio.wait_for(prober.wait_idle(), 10)
    p = await row(registry, identity.peer_id)
    assert p["reachable"] is True and p["probe_error"] is None, p
    assert 0 < p["probe_rtt_s"] < 1 and p["observed"] == "127.0.0.1"
    assert await view_row(registry, identity.peer_id) == {
        "peer_id": identity.peer_id, "address": ready["address"], "state": "joining",
        "reachable": True, "observed": "127.0.0.1", "relay": False, "relay_load": 0, "relays": []}
    # The probe authenticated and hung up: the peer saw the coordinator's key come and go.
    child.wait_for_line("INBOUND", timeout=10)


async def test_announcing_someone_elses_address_is_unreachable(procs, registry):
    victim, ready, child = start_peer(procs)
    prober = attach(registry)
    liar = Identity.generate()
    await registry.join(liar.peer_id, liar.public_bytes, ready["address"], META, observed="127.0.0.1")
    await asyncio.wait_for(prober.wait_idle(), 10)
    p = await row(registry, liar.peer_id)
    assert p["reachable"] is False and "unexpected peer id" in p["probe_error"], p
    assert (await view_row(registry, liar.peer_id))["reachable"] is False
    # The probe stopped at the victim's HELLO: no handshake with the victim completed.
    await asyncio.sleep(0.3)
    assert not any(line.startswith("INBOUND") for line in child.lines), child.lines


async def test_closed_port_non_lowband_service_and_silent_listener(registry):
    prober = attach(registry, ProbeLimits(timeout_s=0.5))
    closed = socket.socket()
    closed.bind(("127.0.0.3", 0))
    closed_addr = "127.0.0.3:%d" % closed.getsockname()[1]
    closed.close()

    async def http_like(reader, writer):  # answers anything with an HTTP error page
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + b"x" * 20000)
        await writer.drain()

    async def silent(reader, writer):  # accepts and never says a word
        await asyncio.sleep(30)

    web_server = await asyncio.start_server(http_like, "127.0.0.4", 0)
    tarpit = await asyncio.start_server(silent, "127.0.0.5", 0)
    try:
        peers = {}
        for name, address in [("closed", closed_addr),
                              ("http", "127.0.0.4:%d" % web_server.sockets[0].getsockname()[1]),
                              ("silent", "127.0.0.5:%d" % tarpit.sockets[0].getsockname()[1])]:
            ident = Identity.generate()
            peers[name] = ident.peer_id
            await registry.join(ident.peer_id, ident.public_bytes, address, META)
        started = time.monotonic()
        await asyncio.wait_for(prober.wait_idle(), 10)
        assert time.monotonic() - started < 2.0  # all three in parallel, each within 0.5 s
        rows = {name: await row(registry, pid) for name, pid in peers.items()}
        assert all(r["reachable"] is False for r in rows.values()), rows
        assert "cannot connect" in rows["closed"]["probe_error"]
        http_error = rows["http"]["probe_error"]
        assert "ProtocolError" in http_error or "not a lowband peer" in http_error
        assert "no handshake within 0.5s" in rows["silent"]["probe_error"]
    finally:
        web_server.close()
        tarpit.close()


async def test_probes_per_announced_host_are_rate_limited(registry):
    accepted = []

    async def count(reader, writer):
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    target = await asyncio.start_server(count, "127.0.0.6", 0)
    port = target.sockets[0].getsockname()[1]
    prober = attach(registry, ProbeLimits(per_host_rate_per_s=0.001, per_host_burst=3))
    try:
        # 20 fresh identities all announce the same third-party host (various ports).
        ids = []
        for i in range(20):
            ident = Identity.generate()
            ids.append(ident.peer_id)
            await registry.join(ident.peer_id, ident.public_bytes, f"127.0.0.6:{port}",
                                META)
        await asyncio.wait_for(prober.wait_idle(), 10)
        assert len(accepted) == 3, accepted  # the host saw the burst, no more
        rows = [await row(registry, pid) for pid in ids]
        assert all(r["reachable"] is False for r in rows)
        refused = [r for r in rows if "probed too often" in (r["probe_error"] or "")]
        assert len(refused) == 17
    finally:
        target.close()


async def test_probes_beyond_the_burst_are_paced_not_dropped(registry):
    """Many peers behind one address joining at once are all probed, spaced at the host rate."""
    accepted = []

    async def count(reader, writer):
        accepted.append(time.monotonic())
        writer.close()

    target = await asyncio.start_server(count, "127.0.0.11", 0)
    prober = attach(registry, ProbeLimits(per_host_rate_per_s=20.0, per_host_burst=2, max_wait_s=5))
    try:
        for _ in range(6):
            ident = Identity.generate()
            await registry.join(ident.peer_id, ident.public_bytes,
                                "127.0.0.11:%d" % target.sockets[0].getsockname()[1], META)
        await asyncio.wait_for(prober.wait_idle(), 10)
        assert len(accepted) == 6
        assert accepted[-1] - accepted[0] >= 0.15  # 4 paced probes at 20/s after a burst of 2
    finally:
        target.close()


@pytest.mark.fast
def test_pacer_books_a_burst_then_the_rate():
    pacer = Pacer(rate=2.0, burst=3, max_wait=1.0)
    assert [pacer.reserve("h", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.reserve("h", 100.0) == pytest.approx(0.5)
    assert pacer.reserve("h", 100.0) == pytest.approx(1.0)
    assert pacer.reserve("h", 100.0) is None  # would wait 1.5 s > max_wait: nothing booked
    assert pacer.reserve("other", 100.0) == 0.0  # keys are independent
    assert pacer.reserve("h", 101.0) == pytest.approx(0.5)  # one slot freed per 0.5 s


async def test_joiner_from_a_public_address_cannot_aim_probes_at_private_ones(registry):
    """Only the string "8.8.8.8" is used (as the observed source): no traffic leaves loopback."""
    accepted = []

    async def count(reader, writer):
        accepted.append(1)
        writer.close()

    internal = await asyncio.start_server(count, "127.0.0.10", 0)
    prober = attach(registry)
    try:
        ident = Identity.generate()
        address = "127.0.0.10:%d" % internal.sockets[0].getsockname()[1]
        await registry.join(ident.peer_id, ident.public_bytes, address, META, observed="8.8.8.8")
        await asyncio.wait_for(prober.wait_idle(), 10)
        p = await row(registry, ident.peer_id)
        assert p["reachable"] is False and "non-public address" in p["probe_error"], p
        assert accepted == []
    finally:
        internal.close()
    assert private_target(ipaddress.ip_address("10.1.2.3"), "2001:4860:4860::8888")
    assert private_target(ipaddress.ip_address("127.0.0.1"), "127.0.0.1") is None  # local swarm
    assert private_target(ipaddress.ip_address("8.8.4.4"), "8.8.8.8") is None
    assert private_target(ipaddress.ip_address("10.0.0.1"), None) is None  # source unknown


async def test_outcome_for_an_older_incarnation_is_dropped(procs, registry):
    identity, ready, _ = start_peer(procs)
    await registry.join(identity.peer_id, identity.public_bytes, ready["address"], META)
    again = await registry.join(identity.peer_id, identity.public_bytes, ready["address"], META)
    assert again["incarnation"] == 2
    assert not await registry.set_reachability(identity.peer_id, 1, True, 0.001, None)
    assert (await row(registry, identity.peer_id))["reachable"] is None
    assert await registry.set_reachability(identity.peer_id, 2, True, 0.001, None)
    assert (await row(registry, identity.peer_id))["reachable"] is True


async def test_probe_function_checks_the_key_not_just_the_port(procs):
    """probe() itself: the right key passes, the wrong expected id and the wrong token fail."""
    identity, ready, _ = start_peer(procs, "127.0.0.7")
    ok = await probe(ready["address"], token_handshakes(TOKEN.encode())(identity.peer_id), timeout_s=5)
    assert ok.reachable and ok.rtt_s is not None
    other = await probe(ready["address"], token_handshakes(TOKEN.encode())("0" * 40), timeout_s=5)
    assert not other.reachable and "unexpected peer id" in other.error
    wrong = await probe(ready["address"], token_handshakes(b"another-token-" + b"x" * 32)(identity.peer_id),
                        timeout_s=5)
    assert not wrong.reachable and "AuthError" in wrong.error
    bad = await probe("no-port", token_handshakes(TOKEN.encode())(identity.peer_id), timeout_s=5)
    assert not bad.reachable and "HOST:PORT" in bad.error


async def test_credential_mode_probe(procs):
    """Credential mesh (no token): the coordinator's self-issued operator credential passes a
    peer's handshake; another authority's does not."""
    authority = Identity.generate()
    identity, ready, child = start_peer(procs, "127.0.0.8", authority=authority)
    ok = await probe(ready["address"], credential_handshakes(authority)(identity.peer_id), timeout_s=5)
    assert ok.reachable, ok
    child.wait_for_line("INBOUND", timeout=10)
    stranger = await probe(ready["address"], credential_handshakes(Identity.generate())(identity.peer_id),
                           timeout_s=5)
    assert not stranger.reachable and "AuthError" in stranger.error, stranger


@pytest.mark.slow
async def test_swarm_never_dials_an_address_the_coordinator_did_not_verify(procs, tmp_path):
    """Real coordinator and `peer join` processes: two honest peers, and one announcing a third
    party's address (a plain TCP service on 127.0.0.9). The coordinator probes that address once
    and marks the liar unreachable; the honest peers mesh with each other and never dial it."""
    from tests.harness import start_coordinator

    accepted: list = []

    async def count(reader, writer):
        accepted.append(time.monotonic())
        writer.close()

    third_party = await asyncio.start_server(count, "127.0.0.9", 0)
    victim = "127.0.0.9:%d" % third_party.sockets[0].getsockname()[1]
    try:
        token = TOKEN + "-e2e-3f9a1c"
        coord = start_coordinator(procs, tmp_path / "coord", token, heartbeat=0.5, peer_timeout=5)
        url = coord.ready["url"]

        def peer(name: str, *extra: str):
            return procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", token,
                                "--listen", "127.0.0.1:0", "--key", str(tmp_path / f"{name}.key"),
                                "--device", "cpu", "--ping-interval", "0.5", *extra, ready_timeout=90)

        honest = [peer("a"), peer("b")]
        liar = peer("liar", "--announce", victim)
        ids = {c.ready["peer_id"] for c in honest}

        async def status() -> dict:
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/api/status") as r:
                    return await r.json()

        async def settled() -> bool:
            rows = {p["peer_id"]: p for p in (await status())["peers"]}
            return (all(rows.get(i, {}).get("reachable") is True for i in ids)
                    and rows.get(liar.ready["peer_id"], {}).get("reachable") is False
                    and all(set(rows[i].get("stats", {}).get("links", {})) >= ids - {i} for i in ids))

        deadline = time.monotonic() + 60
        while not await settled():
            assert time.monotonic() < deadline, f"not settled: {(await status())['peers']}"
            await asyncio.sleep(0.3)
        await asyncio.sleep(3)  # several heartbeats and ping rounds with the liar in the view
        # Only the probe reached it (the liar itself may dial the honest peers: it is a peer).
        assert len(accepted) == 1, f"the third party was dialled {len(accepted)} times"
    finally:
        third_party.close()


_NETNS_REASON = unavailable_reason(need_nat=True)


@pytest.mark.slow
@pytest.mark.skipif(_NETNS_REASON is not None, reason=_NETNS_REASON or "")
def test_peers_behind_nat_are_unreachable_and_observed_at_their_router(procs, tmp_path):
    """Network namespaces with real NAT (testing/nat.py): the coordinator on a public host sees
    a NATed peer come from its router's WAN address and cannot dial the LAN address it announced
    (marked unreachable), while a public peer is verified. All traffic stays in the lab."""
    import sqlite3
    import sys

    from testing.nat import Host, NatLab, Router

    token = TOKEN + "-nat-8e2d"
    hosts = [Host("coord"), Host("pub"), Host("a", "home"), Host("b", "cgn")]
    with NatLab(hosts, {"home": Router("preserving"), "cgn": Router("random")}) as lab:
        data = tmp_path / "coord"
        coord = procs.spawn(lab.exec_args("coord", [
            sys.executable, "-m", "coordinator", "start", "--host", lab.address("coord"), "--port", "0",
            "--data-dir", str(data), "--token", token, "--tls", "off", "--insecure",
            "--heartbeat-interval", "0.5", "--peer-timeout", "5"]), ready_timeout=60)
        url = coord.ready["url"]
        peers = {name: procs.spawn(lab.exec_args(name, [
            sys.executable, "-m", "peer.cli", "join", "--coordinator", url, "--token", token,
            "--insecure", "--listen", "0.0.0.0:0", "--key", str(tmp_path / f"{name}.key"),
            "--device", "cpu"]), ready_timeout=90) for name in ("pub", "a", "b")}
        ids = {name: child.ready["peer_id"] for name, child in peers.items()}

        def rows() -> dict:
            with sqlite3.connect(f"file:{data / 'coordinator.sqlite3'}?mode=ro", uri=True) as db:
                db.row_factory = sqlite3.Row
                return {r["peer_id"]: dict(r) for r in db.execute(
                    "SELECT peer_id, address, observed, reachable, probe_error FROM peers")}

        deadline = time.monotonic() + 30
        while not all(rows().get(i, {}).get("reachable") is not None for i in ids.values()):
            assert time.monotonic() < deadline, f"probes did not finish: {rows()}"
            time.sleep(0.3)
        found = rows()
        pub, a, b = found[ids["pub"]], found[ids["a"]], found[ids["b"]]
        assert pub["reachable"] == 1 and pub["observed"] == lab.public_address("pub"), pub
        for row, name in ((a, "a"), (b, "b")):
            assert row["observed"] == lab.public_address(name) != lab.address(name), row
            # a NATed peer announces the address the coordinator observed it at (its router's)
            assert row["address"].startswith(lab.public_address(name) + ":"), row
            assert row["reachable"] == 0 and row["probe_error"], row
