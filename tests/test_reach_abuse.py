"""Reach machinery against hostile peers and relays (issues 14 and 15): identities are free, so
nothing a peer or relay names may turn us into a dialler of third parties.

- Reversal: an honest relay passes on the IP it sees the requester at, never the address the
  request names; a hostile relay gets us to dial only the address our route table holds for the
  named peer (or, for an unrouted peer, a scope-checked address, bounded per peer and in total).
- Hole punching: offers and answers may only name an IP the peer's connections come from (over
  a relay circuit: the IP the relay saw); offers are answered at most once per 10 s per peer;
  a punch whose peer SYN lands on our listener takes that inbound connection, with the
  handshake role the lower-id rule gives (NatLab, real processes).
- A relay serves only while its host is reachable; relays are tried by measured round trip,
  then by announced load.

Loopback tests use real PeerHosts and TCP on 127.0.0.x; the NatLab test needs root.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from peer import addrscope
from peer import circuit as C
from peer.errors import NoSuchMethod, PeerUnavailable, ProtocolError, RemoteError
from peer.identity import Identity
from peer.punch import PunchAnswer, PunchFailed, PunchOffer
from peer.transport import METHOD_PUNCH
from testing import natprobe
from testing.nat import Host, NatLab, Router
from testing.relaypeer import Peer
from tests.test_relay import close, hosts, needs_netns


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Counter:
    """A plain TCP listener standing in for a third party: counts the connections it gets."""

    def __init__(self) -> None:
        self.hits = 0

    async def start(self, host: str) -> str:
        async def on(reader, writer):
            self.hits += 1
            writer.close()
        self.server = await asyncio.start_server(on, host, 0)
        return f"{host}:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.close()


def fake_id() -> str:
    return Identity.generate().peer_id


# ------------------------------------------------------------------ reversal
def test_an_honest_relay_never_passes_on_the_address_a_requester_names():
    async def main():
        third = Counter()
        victim = await third.start("127.0.0.3")
        r, a, b, c = await hosts(4)
        try:
            b.reachable = False
            await b.reserve(r.peer_id, r.address)
            await a.connect(r.address)
            # a asks b to "dial it back" at a third party's address
            await a.call(r.peer_id, C.METHOD_REVERSE, C.Reverse(b.peer_id, victim).to_header())
            await asyncio.sleep(0.5)
            assert third.hits == 0
            # the relay kept only the port; the honest path still works: c is reached by reversal
            c.add_route(b.peer_id, relays=[(r.peer_id, r.address)], reachable=False)
            with pytest.raises(NoSuchMethod):
                await c.call(b.peer_id, "x", timeout=10)
            assert c.link_path(b.peer_id) == "reversed" and b.link_path(c.peer_id) == "reversed"
        finally:
            third.close()
            await close(r, a, b, c)
    run(main())


def test_a_hostile_relay_gets_us_to_dial_only_our_route_and_boundedly():
    async def main():
        third, routed = Counter(), Counter()
        victim = await third.start("127.0.0.3")
        route = await routed.start("127.0.0.4")
        h, b = await hosts(2)  # h: a relay b reserved at, which then lies
        try:
            b.reachable = False
            await b.reserve(h.peer_id, h.address)

            async def incoming(src: str) -> None:
                await h.call(b.peer_id, C.METHOD_INCOMING, C.Incoming("reverse", src, address=victim).to_header())

            x, y = fake_id(), fake_id()
            b.add_route(x, route, reachable=True)  # x's coordinator-verified address
            await incoming(x)
            with pytest.raises(RemoteError, match="one per 5 s per peer"):
                await incoming(x)
            b.add_route(y, route, reachable=False)
            with pytest.raises(RemoteError, match="not reachable by our routes"):
                await incoming(y)
            b.reverse_unrouted = False
            with pytest.raises(RemoteError, match="no route to peer"):
                await incoming(fake_id())
            await asyncio.sleep(0.5)
            assert (routed.hits, third.hits) == (1, 0)
            # unrouted peers (allowed by default): fresh identities are bounded by the total rate
            b.reverse_unrouted = True
            refused = 0
            for _ in range(10):
                try:
                    await incoming(fake_id())
                except RemoteError as e:
                    assert "/s in all" in str(e)
                    refused += 1
            await asyncio.sleep(0.5)
            assert refused >= 5 and third.hits == 10 - refused <= 5, (refused, third.hits)
        finally:
            third.close()
            routed.close()
            await close(h, b)
    run(main())


def test_reversal_addresses_must_be_as_far_out_as_the_relay():
    assert addrscope.dial_error("10.1.2.3", "100.1.2.3") is not None  # private target, public relay
    assert addrscope.dial_error("127.0.0.1", "10.0.0.1") is not None
    assert addrscope.dial_error("169.254.1.1", "169.254.1.2") is not None  # link-local: never
    assert addrscope.dial_error("::ffff:127.0.0.1", "100.1.2.3") is not None
    assert addrscope.dial_error("host.example", "100.1.2.3") is not None
    assert addrscope.dial_error("10.1.2.3", "10.9.9.9") is None
    assert addrscope.dial_error("100.1.2.3", "127.0.0.1") is None
    assert addrscope.same_ip("::ffff:10.0.0.1", "10.0.0.1") and not addrscope.same_ip("x", "x")


# ------------------------------------------------------------------ punching
def test_punch_offers_and_answers_may_name_only_where_the_peer_is_seen():
    async def main():
        a, b, x = await hosts(3)
        try:
            for h in (a, b, x):
                h.set_observed(("10.1.2.3", int(h.address.rsplit(":", 1)[1])))
            await a.connect(b.address)
            offer = PunchOffer.make(a.peer_id, ("10.9.9.9", 4000), "preserving")
            with pytest.raises(RemoteError, match=r"names 10\.9\.9\.9 for a punch, but its connections come "
                                                  r"from 127\.0\.0\.1: refused"):
                await a.call(b.peer_id, METHOD_PUNCH, {}, offer.encode())
            assert not b._punching

            async def lying(peer_id, header, payload):  # x answers with a third party's address
                answer = PunchAnswer.to(PunchOffer.decode(bytes(payload)), x.peer_id, ("10.9.9.9", 4000),
                                        "preserving")
                return {}, answer.encode()
            x.handle(METHOD_PUNCH, lying)
            await a.connect(x.address)
            with pytest.raises(PunchFailed, match="names 10.9.9.9"):
                await a.punch(x.peer_id)
            assert not a._punching
        finally:
            await close(a, b, x)
    run(main())


@pytest.mark.root
@needs_netns
def test_inbound_punch_takes_the_initiator_role_and_offers_are_rate_limited():
    """pub2 (no NAT, no firewall) starts its side 0.5 s late, so a0's SYN reaches pub2's
    listener first: that inbound connection must become the punch, and since pub2 has the lower
    id it runs the handshake as initiator (an ordinary inbound responder would wait for a HELLO
    that never comes). A second offer within 10 s is refused, so is an offer naming a third party."""
    keys = [Identity.generate() for _ in range(2)]
    low, high = sorted(keys, key=lambda k: k.peer_id)
    with NatLab([Host("a0", "home"), Host("pub0"), Host("pub2")], {"home": Router("preserving")}) as lab:
        observer = lab.popen("pub0", natprobe.argv("serve", lab.address("pub0")), stdout=subprocess.PIPE, text=True)
        port = json.loads(observer.stdout.readline())["port"]
        a = Peer(lab, "a0", "--key", high.private_bytes().hex())
        p = Peer(lab, "pub2", "--key", low.private_bytes().hex(), "--punch-late", "0.5")
        assert a.ok(op="observe", host=lab.address("pub0"), port=port)["mapping"] == "preserving"
        assert p.ok(op="observe", host=lab.address("pub0"), port=port)["mapping"] == "public"
        a.ok(op="connect", address=p.address)
        t0 = time.monotonic()
        got = a.ok(op="punch", peer=p.peer_id)
        assert got["path"] == "punched" and got["initiator"] is False, got
        assert time.monotonic() - t0 < 3.0
        log = "\n".join(p.ok(op="info")["log"])
        assert f"is the punch to {a.peer_id[:12]} (initiator)" in log, log
        again = a.ask(op="punch", peer=p.peer_id)
        assert not again["ok"] and "one per 10 s per peer" in again["error"], again
        third = a.ask(op="offer", peer=p.peer_id, observed=[lab.address("pub0"), port])
        assert not third["ok"] and "refused" in third["error"] and lab.address("pub0") in third["error"], third


# ------------------------------------------------------------------ relays
def test_a_relay_serves_only_while_its_host_is_reachable():
    async def main():
        r, a, b = await hosts(3)
        try:
            a.reachable = b.reachable = False
            for state in (None, False):
                r.reachable = state
                with pytest.raises(RemoteError, match="not relaying"):
                    await b.reserve(r.peer_id, r.address)
            r.reachable = True
            await b.reserve(r.peer_id, r.address)
            a.add_route(b.peer_id, relays=[(r.peer_id, r.address)], reachable=False)
            r.reachable = False  # e.g. the coordinator's probe failed since
            with pytest.raises(PeerUnavailable, match="not relaying"):
                await a.call(b.peer_id, "x", timeout=10)
            r.reachable = True
            with pytest.raises(NoSuchMethod):
                await a.call(b.peer_id, "x", timeout=10)
            assert a.link_path(b.peer_id) == "relayed"
        finally:
            await close(r, a, b)
    run(main())


def test_relays_are_tried_by_measured_round_trip_then_by_load():
    async def main():
        r1, r2, a, b, c = await hosts(5)
        try:
            for h in (a, b, c):
                h.reachable = False
            for r in (r1, r2):
                await b.reserve(r.peer_id, r.address)
            relays = [(r1.peer_id, r1.address, 40), (r2.peer_id, r2.address, 0)]
            a.add_route(b.peer_id, relays=relays, reachable=False)
            with pytest.raises(NoSuchMethod):
                await a.call(b.peer_id, "x", timeout=10)
            assert (r1.relay.stats()["circuits"], r2.relay.stats()["circuits"]) == (0, 1)  # less loaded first
            await c.connect(r1.address)
            await c.ping(r1.peer_id)  # measured beats unmeasured, whatever the load
            c.add_route(b.peer_id, relays=relays, reachable=False)
            with pytest.raises(NoSuchMethod):
                await c.call(b.peer_id, "x", timeout=10)
            assert (r1.relay.stats()["circuits"], r2.relay.stats()["circuits"]) == (1, 1)
        finally:
            await close(r1, r2, a, b, c)
    run(main())


def test_circuit_ready_names_an_ip():
    pid = "ab" * 20
    assert C.CircuitReady.from_header({"peer": pid, "observed": "::ffff:10.0.0.1"}).observed == "10.0.0.1"
    for bad in ({"peer": pid}, {"peer": pid, "observed": "host"}, {"peer": pid, "observed": 5}):
        with pytest.raises(ProtocolError):
            C.CircuitReady.from_header(bad)

