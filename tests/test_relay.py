"""Relays and connection reversal (issue 15) between real processes in NatLab namespaces.

Peers behind two different NAT routers (port-preserving and fully-random, both dropping new
inbound connections) reach each other through a public relay that splices their sockets: calls,
mail, a 20 MB message; the relay's bytes hold no plaintext and a byte it alters kills the
end-to-end connection; a relay killed mid-transfer fails the transfer with a clear error and
the next connect goes through another relay; a public peer reaches a NATed one by reversal;
relayed throughput is measured against the relay's tbf-shaped link.

Needs root plus ip/tc/nft (CI runs as root); skipped with the reason elsewhere.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from peer import circuit as C
from peer.credentials import issue
from peer.errors import NoSuchMethod, PeerUnavailable, ProtocolError, RemoteError
from peer.identity import Identity
from peer.limits import HostLimits
from peer.messages import Request
from peer.relay import ByteBucket, dial_circuit
from peer.transport import PeerHost
from testing import natprobe
from testing.nat import Host, NatLab, Router
from testing.netns import LinkShape, unavailable_reason
from testing.relaypeer import Peer, nat_lab, relayed_pair

_REASON = unavailable_reason(need_nat=True)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
TOKEN = b"relay-test-swarm-token-0123456789abcdef"

MARKER = "PLAINTEXT-MARKER-7f3a"


@needs_netns
def test_natted_peers_talk_through_a_relay_that_sees_only_ciphertext(tmp_path):
    capture = tmp_path / "relay.bin"
    with nat_lab(Host("pub0")) as lab:
        relay = Peer(lab, "pub0", "--relay", "--capture", str(capture))
        a, b = relayed_pair(lab, [relay])
        t0 = time.monotonic()
        call = a.ok(op="call", peer=b.peer_id, text=MARKER, size=1000)
        assert call["header"] == {"text": MARKER, "n": 1000} and call["path"] == "relayed"
        back = b.ok(op="call", peer=a.peer_id, text=MARKER, size=10)  # the same circuit, other way
        assert back["path"] == "relayed"
        sent = a.ok(op="send", peer=b.peer_id, tag="big", size=20 << 20, marker=MARKER)
        assert sent["sha_ok"] and sent["n"] == 20 << 20 and sent["path"] == "relayed"
        mail = b.ok(op="send", peer=a.peer_id, tag="m", size=1000, marker=MARKER)
        assert mail["sha_ok"]
        stats = relay.ok(op="info")["relay"]
        assert stats["circuits"] == 1 and stats["bytes"] > 20 << 20, stats
        print(f"relayed call+20 MB in {time.monotonic() - t0:.2f}s; relay stats {stats}")
    data = capture.read_bytes()
    assert len(data) > 20 << 20
    assert MARKER.encode() not in data and MARKER[:8].encode() not in data


@needs_netns
def test_a_byte_changed_by_the_relay_kills_the_end_to_end_connection():
    with nat_lab(Host("pub0")) as lab:
        relay = Peer(lab, "pub0", "--relay", "--tamper", "5000")  # past the handshake, in a record
        a, b = relayed_pair(lab, [relay])
        call = a.ask(op="call", peer=b.peer_id, text="x", size=64 << 10)
        assert not call["ok"] and call["type"] == "PeerUnavailable", call
        log = "\n".join(b.ok(op="info")["log"])
        assert "failed authentication (tampered or forged)" in log, log  # B's ProtocolError


@needs_netns
def test_a_killed_relay_fails_the_transfer_clearly_and_the_next_connect_uses_another():
    with nat_lab(Host("pub0", shape=LinkShape(rate_mbit=40)), Host("pub2", shape=LinkShape(rate_mbit=40))) as lab:
        relays = [Peer(lab, "pub0", "--relay"), Peer(lab, "pub2", "--relay")]
        a, b = relayed_pair(lab, relays)
        assert a.ok(op="call", peer=b.peer_id, text="hi")["path"] == "relayed"
        used = [r for r in relays if r.ok(op="info")["relay"]["circuits"] == 1]
        assert len(used) == 1  # the nearer relay (by measured RTT) carries the circuit
        dead, other = used[0], next(r for r in relays if r is not used[0])
        a.post(op="send", peer=b.peer_id, tag="big", size=20 << 20)  # ~4 s at 40 Mbit/s
        time.sleep(1.0)
        dead.proc.kill()
        t0 = time.monotonic()
        failed = a.answer(10)
        assert not failed["ok"] and failed["type"] == "PeerUnavailable", failed
        assert "lost" in failed["error"] and "relay" in failed["error"], failed
        print(f"transfer failed {time.monotonic() - t0:.2f}s after the kill: {failed['error']}")
        again = a.ok(op="call", peer=b.peer_id, text="again")
        assert again["path"] == "relayed" and again["header"]["text"] == "again"
        assert other.ok(op="info")["relay"]["circuits"] == 1


@needs_netns
def test_public_peer_reaches_natted_peer_by_reversal():
    with nat_lab(Host("pub0"), Host("pub2")) as lab:
        relay = Peer(lab, "pub2", "--relay")
        a = Peer(lab, "pub0")
        b = Peer(lab, "b0", "--unreachable")
        b.ok(op="reserve", relay=relay.peer_id, address=relay.address)
        a.ok(op="route", peer=b.peer_id, address=b.address, reachable=False,
             relays=[[relay.peer_id, relay.address]])
        call = a.ok(op="call", peer=b.peer_id, text="rev")
        assert call["path"] == "reversed" and call["header"]["text"] == "rev"
        assert b.ok(op="info", peer=a.peer_id)["path"] == "reversed"
        assert relay.ok(op="info")["relay"]["circuits"] == 0  # a direct link: nothing relayed


@needs_netns
def test_a_relayed_link_is_upgraded_to_a_punched_one_between_port_preserving_nats():
    with NatLab([Host("a0", "home"), Host("a1", "home2"), Host("pub0"), Host("pub2")],
                {"home": Router("preserving"), "home2": Router("preserving")}) as lab:
        observer = lab.popen("pub2", natprobe.argv("serve", lab.address("pub2")), stdout=subprocess.PIPE, text=True)
        port = json.loads(observer.stdout.readline())["port"]
        relay = Peer(lab, "pub0", "--relay")
        a, b = Peer(lab, "a0", "--unreachable"), Peer(lab, "a1", "--unreachable")
        for me, other in ((a, b), (b, a)):
            assert me.ok(op="observe", host=lab.address("pub2"), port=port)["mapping"] == "preserving"
            me.ok(op="reserve", relay=relay.peer_id, address=relay.address)
            me.ok(op="route", peer=other.peer_id, address=other.address, reachable=False,
                  relays=[[relay.peer_id, relay.address]])
        assert a.ok(op="call", peer=b.peer_id, text="first")["path"] == "relayed"
        deadline = time.monotonic() + 10
        while a.ok(op="info", peer=b.peer_id)["path"] != "punched" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert a.ok(op="info", peer=b.peer_id)["path"] == "punched"
        assert b.ok(op="info", peer=a.peer_id)["path"] == "punched"
        sent = a.ok(op="send", peer=b.peer_id, tag="big", size=8 << 20)
        assert sent["sha_ok"] and sent["path"] == "punched"
        relayed = relay.ok(op="info")["relay"]["total_bytes"]
        assert 0 < relayed < 1 << 20, relayed  # the 8 MB went around the relay


RATE_MBIT = 50


@needs_netns
def test_relay_throughput_reaches_its_link_rate():
    with nat_lab(Host("pub0", shape=LinkShape(rate_mbit=RATE_MBIT))) as lab:
        relay = Peer(lab, "pub0", "--relay")
        a, b = relayed_pair(lab, [relay])
        a.ok(op="call", peer=b.peer_id, text="warm")
        a.ok(op="send", peer=b.peer_id, tag="warm", size=2 << 20)
        size = 24 << 20
        best = None
        for k in range(3):  # best of three: the test machine's CPUs may be shared
            sent = a.ok(op="send", peer=b.peer_id, tag=f"bulk{k}", size=size)
            assert sent["sha_ok"]
            best = sent["seconds"] if best is None else min(best, sent["seconds"])
            if size * 8 / best / 1e6 >= 0.9 * RATE_MBIT:
                break
        sent["seconds"] = best
        mbit = size * 8 / sent["seconds"] / 1e6
        print(f"relayed {size >> 20} MiB in {sent['seconds']:.2f}s = {mbit:.1f} Mbit/s "
              f"({mbit / RATE_MBIT:.2f}x the relay's {RATE_MBIT} Mbit/s tbf)")
        assert mbit >= 0.9 * RATE_MBIT


# ------------------------------------------------------------------ loopback: limits and hostile input
def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def hosts(n: int, **kw) -> list[PeerHost]:
    out = [PeerHost(Identity.generate(), TOKEN, **kw) for _ in range(n)]
    for h in out:
        await h.start()
        h.reachable = True  # as a coordinator's probe would say (a relay serves only then)
    return out


async def close(*hs: PeerHost) -> None:
    for h in hs:
        await h.close()


def test_relay_refuses_circuits_to_unreserved_peers_and_calls_from_strangers():
    async def main():
        r, a, b = await hosts(3)
        try:
            a.reachable = False
            a.add_route(b.peer_id, relays=[(r.peer_id, r.address)], reachable=False)
            with pytest.raises(PeerUnavailable, match="holds no reservation at this relay"):
                await a.call(b.peer_id, "x", timeout=10)
            # a peer B never reserved at cannot make B dial anything
            await a.connect(b.address)
            with pytest.raises(RemoteError, match="we hold no reservation at this peer"):
                note = C.Incoming("reverse", a.peer_id, address="10.0.0.1:9")
                await a.call(b.peer_id, C.METHOD_INCOMING, note.to_header())
            await a.connect(r.address)
            with pytest.raises(RemoteError, match="40-hex peer id"):  # malformed control message
                await a.call(r.peer_id, C.METHOD_REVERSE, {"dst": "nope", "address": "1.2.3.4:5"})
        finally:
            await close(r, a, b)
    run(main())


def test_peer_without_relay_refuses_circuits_and_a_relay_closes_its_circuits():
    async def main():
        r, a, b = await hosts(3)
        n, = await hosts(1, relay=False)
        try:
            for h in (a, b):
                h.reachable = False
            await b.reserve(r.peer_id, r.address)
            a.add_route(b.peer_id, relays=[(n.peer_id, n.address), (r.peer_id, r.address)], reachable=False)
            with pytest.raises(NoSuchMethod):  # b has no 'x'; we got there through r, not n
                await a.call(b.peer_id, "x", timeout=10)
            assert a.link_path(b.peer_id) == "relayed" and r.relay.stats()["circuits"] == 1
            await r.close()
            for _ in range(100):
                if not a.connected(b.peer_id) and not b.connected(a.peer_id):
                    break
                await asyncio.sleep(0.05)
            assert not a.connected(b.peer_id) and not b.connected(a.peer_id)
            with pytest.raises(PeerUnavailable, match="relay"):
                await a.call(b.peer_id, "x", timeout=10)
        finally:
            await close(r, a, b, n)
    run(main())


def test_circuit_counts_and_bandwidth_are_capped():
    async def main():
        r, = await hosts(1, relay_circuit_rate=4e6, limits=HostLimits(max_relay_circuits_per_peer=1))
        a, b, c = await hosts(3)
        try:
            for h in (a, b, c):
                h.reachable = False
            await b.reserve(r.peer_id, r.address)
            for h in (a, c):
                h.add_route(b.peer_id, relays=[(r.peer_id, r.address)], reachable=False)
            await a.send(b.peer_id, "warm", {}, b"w")
            await b.recv(a.peer_id, "warm", timeout=5)
            with pytest.raises(PeerUnavailable, match="circuits at this relay"):  # b's one circuit is taken
                await c.send(b.peer_id, "t", {}, b"x")
            t0 = time.perf_counter()
            await a.send(b.peer_id, "bulk", {}, bytes(8 << 20))
            await b.recv(a.peer_id, "bulk", timeout=10)
            seconds = time.perf_counter() - t0
            assert 8 * 2**20 / 4e6 * 0.85 < seconds < 8 * 2**20 / 4e6 * 1.5, seconds  # ~2.1 s at 4 MB/s
        finally:
            await close(r, a, b, c)
    run(main())


def test_circuit_schemas_refuse_malformed_headers():
    pid = "ab" * 20
    assert C.Incoming.from_header(C.Incoming("circuit", pid, cid="0" * 32).to_header()).cid == "0" * 32
    assert C.Reverse.from_header({"dst": pid, "address": "[::1]:80"}).address == "[::1]:80"
    bad = [(C.CircuitOpen, {"dst": pid, "extra": 1}), (C.CircuitOpen, {"dst": pid.upper()}),
           (C.CircuitAccept, {"cid": "x" * 32}), (C.CircuitReady, []), (C.Reserve, {"a": 1}),
           (C.Reverse, {"dst": pid, "address": "host:0"}), (C.Reverse, {"dst": pid, "address": 5}),
           (C.Incoming, {"kind": "other", "src": pid, "cid": "", "address": ""})]
    for cls, header in bad:
        with pytest.raises(ProtocolError):
            cls.from_header(header)
    bucket = ByteBucket(1000.0, 100.0, now=0.0)
    assert bucket.take(100, 0.0) == 0.0 and bucket.take(500, 0.0) == pytest.approx(0.5)
    assert bucket.take(0, 0.5) == 0.0


def test_relay_refuses_unknown_circuits_and_reports_a_far_end_that_will_not_dial():
    async def main():
        r, a = await hosts(2)
        b, = await hosts(1, limits=HostLimits(max_incoming_dials=0))
        try:
            a.reachable = False
            accept = Request(1, C.METHOD_ACCEPT, C.CircuitAccept("0" * 32).to_header())
            with pytest.raises(RemoteError, match="no such circuit for this peer"):
                await dial_circuit(a, r.peer_id, r.address, accept)
            await b.reserve(r.peer_id, r.address)
            a.add_route(b.peer_id, relays=[(r.peer_id, r.address)], reachable=False)
            t0 = time.perf_counter()
            with pytest.raises(PeerUnavailable, match="did not take the circuit.*dials for relays running"):
                await a.call(b.peer_id, "x", timeout=10)
            assert time.perf_counter() - t0 < 3
            assert r.relay.stats() == {"reservations": 1, "pending": 0, "circuits": 0, "bytes": 0, "total_bytes": 0}
        finally:
            await close(r, a, b)
    run(main())


def test_relayed_link_in_credential_mode_carries_the_far_peers_roles():
    async def main():
        authority = Identity.generate()
        now = time.time()

        def make(roles):
            ident = Identity.generate()
            cred = issue(authority, ident.public_bytes, roles, now=now, lifetime_s=600, serial=1)
            return PeerHost(ident, credential=cred, authority=authority.public_bytes)
        r, a, b = make(["train"]), make(["client"]), make(["serve"])
        for h in (r, a, b):
            await h.start()
        r.reachable = True
        try:
            b.handle("only_clients", lambda *args: echo_roles(b, *args), roles=["client"])
            a.reachable = b.reachable = False
            await b.reserve(r.peer_id, r.address)
            a.add_route(b.peer_id, relays=[(r.peer_id, r.address)], reachable=False)
            h, _ = await a.call(b.peer_id, "only_clients", timeout=10)
            assert h == {"roles": ["client"]} and a.link_path(b.peer_id) == "relayed"
            assert a.roles_of(b.peer_id) == frozenset({"serve"})
        finally:
            await close(r, a, b)
    run(main())


async def echo_roles(host: PeerHost, peer_id: str, header: dict, payload: bytearray) -> tuple[dict, bytes]:
    return {"roles": sorted(host.roles_of(peer_id))}, b""
