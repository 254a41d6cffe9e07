"""Mesh resource limits that hold against many (free) identities, attacked over real TCP.

Attackers are :class:`testing.rawpeer.RawPeer` connections: the real handshake, then frames the
test chooses, written without ever reading the replies. Where memory and task counts matter the
victim is a child process (tests/transport_child.py, whose ``stats`` RPC reports its RSS and
asyncio tasks); the cap tests run the victim PeerHost in-process and read its counters. Each
test also shows an honest peer still gets its calls answered during the attack.
"""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from peer.errors import LowbandError, ProtocolError
from peer.identity import Identity
from peer.limits import InboundGate
from peer.mailbox import Mailbox
from peer.messages import Mail, Reassembler
from peer.transport import HostLimits, PeerHost
from tests.harness import wait_until_async
from testing.netem import LinkEmulator, LinkSpec
from testing.rawpeer import RawPeer

TOKEN = b"swarm-token-b94de711f24b1b117b1e35ebf8e6f5a3301e96dc"  # tests/transport_child.py's default
CHILD = "tests/transport_child.py"


@pytest.fixture
async def raws():
    """Raw attacker connections, aborted at teardown."""
    made: list[RawPeer] = []
    yield made
    for r in made:
        r.close()


async def victim_child(procs, ip: str) -> tuple[PeerHost, str, str]:
    """A child PeerHost on ``ip`` and an honest in-process peer connected to it."""
    child = procs.python(CHILD, "--host", ip)
    honest = PeerHost(Identity.generate(), TOKEN, conns_per_peer=1)
    await honest.connect(child.ready["address"])
    return honest, child.ready["address"], child.ready["peer_id"]


async def timed_call(host: PeerHost, peer_id: str, method: str, timeout: float = 5.0) -> tuple[dict, float]:
    t0 = time.perf_counter()
    header, _ = await host.call(peer_id, method, {}, timeout=timeout)
    return header, time.perf_counter() - t0


async def test_ping_flood_from_many_identities_is_dropped_and_costs_nothing(procs, raws):
    # before the fix each PING was answered by a task writing an echo of its header: 10 s of
    # this flood from one connection (60 kB ids) drove the victim to 3.7 GB RSS and 30k tasks
    honest, address, victim = await victim_child(procs, "127.0.0.61")
    try:
        before, _ = await timed_call(honest, victim, "stats")
        raws += [await RawPeer.connect(address, token=TOKEN, local_ip=f"127.0.1.{i}") for i in range(8)]
        hostile = await RawPeer.connect(address, token=TOKEN, local_ip="127.0.1.100")
        raws.append(hostile)
        hostile.ping(b"x" * 60000)  # a PING id is an integer: anything else is a protocol error
        worst = 0.0
        for burst in range(20):  # every fresh identity pings far above the rate and never reads
            for r in raws[:8]:
                for k in range(50):
                    r.ping(burst * 50 + k)
            _, took = await timed_call(honest, victim, "echo")
            worst = max(worst, took)
            await asyncio.sleep(0.01)
        closed = list(await asyncio.gather(*(r.closed_by_peer(3) for r in raws)))
        after, _ = await timed_call(honest, victim, "stats")
    finally:
        await honest.close()
    assert closed == [True] * 9, closed  # flooders and the malformed PING are cut off
    assert worst < 2.0, f"honest call took {worst:.2f}s during the flood"
    assert after["tasks"] <= before["tasks"] + 2 and after["rss_mb"] < before["rss_mb"] + 40, (before, after)
    assert after["live"] == 1  # only the honest connection is left


async def test_requests_without_reading_stop_the_reading_and_stay_bounded(procs, raws):
    # before the fix: 8 s of 1 MiB echo requests never read drove the victim to 2.6 GB RSS and
    # 1300 tasks (each reply written into an unbounded buffer by its own task)
    honest, address, victim = await victim_child(procs, "127.0.0.62")
    try:
        before, _ = await timed_call(honest, victim, "stats")
        attacker = await RawPeer.connect(address, token=TOKEN, local_ip="127.0.1.101")
        raws.append(attacker)
        blob = b"r" * ((1 << 20) - 4096)
        sent, worst, deadline = 0, 0.0, time.monotonic() + 4.0
        while time.monotonic() < deadline:
            while attacker.unsent() < (48 << 20):
                sent += 1
                attacker.request(sent, "echo", {}, blob)
            _, took = await timed_call(honest, victim, "echo")
            worst = max(worst, took)
            await asyncio.sleep(0.2)
        after, _ = await timed_call(honest, victim, "stats")
    finally:
        await honest.close()
    # the victim stopped reading: most of what the attacker wrote sits in the attacker's own buffer
    assert attacker.unsent() > (40 << 20), attacker.unsent()
    assert sent * len(blob) - attacker.unsent() < (120 << 20)  # taken in: a few buffers' worth
    assert worst < 2.0, f"honest call took {worst:.2f}s during the attack"
    # at most one task per admitted request (a reply waiting for the attacker to read)
    bound = before["tasks"] + HostLimits().max_handlers_per_peer
    assert after["tasks"] <= bound and after["rss_mb"] < before["rss_mb"] + 100, (before, after)


async def test_host_wide_mailbox_cap_holds_against_many_identities(hosts, raws, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    limits = HostLimits(max_mailbox_bytes_per_peer=1_000_000, max_mailbox_bytes_total=2_500_000)
    victim = await hosts("127.0.0.63", limits)
    honest = await hosts()
    vid = await honest.connect(victim.address)
    junk = b"j" * 600_000  # within every per-peer limit; 5 of them exceed the host-wide one
    ids = [Identity.generate() for _ in range(6)]
    for i, me in enumerate(ids):
        r = await RawPeer.connect(victim.address, me, TOKEN, local_ip=f"127.0.2.{i + 1}")
        raws.append(r)
        r.message(1, Mail("junk", {}), junk)
        await r.drain()
        await wait_until_async(lambda: victim.mailbox.total >= min(4, i + 1) * len(junk) or
                               "host-wide" in caplog.text, timeout=10)
    closed = list(await asyncio.gather(*(r.closed_by_peer(3) for r in raws)))
    assert closed == [False] * 4 + [True] * 2, closed  # a sender holding as much as anyone is refused
    assert victim.mailbox.total == 4 * len(junk) <= limits.max_mailbox_bytes_total
    assert "would exceed the host-wide 2500000-byte mailbox limit" in caplog.text
    # honest mail that arrives before its receiver asks is not refused: the biggest holder goes
    await honest.send(vid, "early", {}, b"e" * 300_000)
    assert await raws[0].closed_by_peer(3) and victim.mailbox.take(ids[0].peer_id, "junk") is None
    assert "holds the most unread bytes" in caplog.text
    raws[1].close()  # a departed peer's junk is the first to go when room is needed
    await wait_until_async(lambda: ids[1].peer_id not in victim.connected_peers())
    await honest.send(vid, "early2", {}, b"f" * 500_000)
    await wait_until_async(lambda: "of departed peer" in caplog.text)
    assert victim.mailbox.take(ids[1].peer_id, "junk") is None
    assert victim.mailbox.total == 2 * len(junk) + 800_000 <= limits.max_mailbox_bytes_total
    assert len((await victim.recv(honest.peer_id, "early", timeout=5))[1]) == 300_000
    assert len((await victim.recv(honest.peer_id, "early2", timeout=5))[1]) == 500_000
    # honest traffic goes on: calls, and mail to a receiver that waits for it (never buffered)
    assert (await honest.call(vid, "echo", {"ok": 1}))[0] == {"ok": 1}
    waiting = asyncio.ensure_future(victim.recv(honest.peer_id, "work", timeout=10))
    await asyncio.sleep(0.05)
    await honest.send(vid, "work", {}, b"w" * 700_000)
    assert len((await waiting)[1]) == 700_000
    assert victim.discard_tag("junk") == 2 and victim.mailbox.total == 0


async def test_host_wide_partial_message_cap_holds_against_many_identities(hosts, raws, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    chunk = 256 * 1024
    limits = HostLimits(max_partial_bytes_total=9 * chunk)
    victim = await hosts("127.0.0.64", limits, chunk_size=chunk)
    honest = await hosts(chunk_size=chunk)
    vid = await honest.connect(victim.address)
    big = bytes(10 * chunk)  # declared size; each attacker sends only its first 3 chunks, never the rest
    for i in range(5):
        me = Identity.generate()
        r = await RawPeer.connect(victim.address, me, TOKEN, local_ip=f"127.0.3.{i + 1}")
        raws.append(r)
        r.message(1, Mail("never-done", {}), big, chunk_size=chunk, chunks=slice(0, 3))
        await r.drain()
        await wait_until_async(lambda: victim.reassembler.pending(me.peer_id) == 1 and
                               victim.reassembler.buffered == min(3, i + 1) * 3 * chunk, timeout=10)
    # at the cap, a newcomer holding less evicts the biggest holder: parked bytes do not stay parked
    closed = list(await asyncio.gather(*(r.closed_by_peer(3) for r in raws)))
    assert closed == [True, True, False, False, False], closed
    assert victim.reassembler.buffered == 9 * chunk <= limits.max_partial_bytes_total
    assert "this peer holds the most" in caplog.text
    raws[2].message(1, Mail("never-done", {}), big, chunk_size=chunk, chunks=slice(3, 4))
    assert await raws[2].closed_by_peer(3)  # the sender that would hold the most is refused itself
    assert f"host-wide limit of {9 * chunk} bytes in partial messages reached" in caplog.text
    await wait_until_async(lambda: victim.reassembler.buffered == 6 * chunk)  # what it held is freed
    assert (await honest.call(vid, "echo", {"ok": 1}))[0] == {"ok": 1}
    await honest.send(vid, "honest-big", {}, bytes(2 * chunk + 1))
    assert len((await victim.recv(honest.peer_id, "honest-big", timeout=10))[1]) == 2 * chunk + 1


async def is_open(reader: asyncio.StreamReader) -> bool:
    try:  # an admitted connection waits for our handshake; a refused one is closed at once
        return bool(await asyncio.wait_for(reader.read(1), 0.5))
    except asyncio.TimeoutError:
        return True
    except ConnectionError:
        return False


async def dial(address: str, src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ip, port = address.rsplit(":", 1)
    return await asyncio.open_connection(ip, int(port), local_addr=(src, 0))


async def test_handshake_flood_cannot_take_the_slots_reserved_for_authenticated_peers(hosts, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    limits = HostLimits(max_inbound_connections=12, max_handshaking=4, handshake_rate_per_s=1000,
                        handshake_burst=1000)
    victim = await hosts("127.0.0.65", limits, handshake_timeout=3.0)
    a = await hosts(conns_per_peer=4)
    vid = await a.connect(victim.address)
    flood = [await dial(victim.address, f"127.0.4.{i + 1}") for i in range(10)]  # never handshake
    assert list(await asyncio.gather(*(is_open(r) for r, _ in flood))) == [True] * 4 + [False] * 6
    assert "reserved for authenticated peers" in caplog.text
    assert (await a.call(vid, "echo", {"ok": 1}))[0] == {"ok": 1}  # admitted peers are not affected
    b = await hosts(conns_per_peer=4)
    with pytest.raises(LowbandError):  # no handshake slot while the flood holds them all
        await b.connect(victim.address)
    await wait_until_async(lambda: victim._inbound.handshaking == 0, timeout=5)  # the deadline frees them
    assert await b.connect(victim.address) == vid
    assert victim._inbound.open() == 8  # authenticated ones use the reserved slots
    assert (await b.call(vid, "echo", {"ok": 2}))[0] == {"ok": 2}
    for _, w in flood:
        w.close()


async def test_new_connections_are_rate_limited_per_address(hosts, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    victim = await hosts("127.0.0.66", HostLimits(handshake_rate_per_s=0.5, handshake_burst=3))
    flood = [await dial(victim.address, "127.0.5.1") for _ in range(5)]
    assert list(await asyncio.gather(*(is_open(r) for r, _ in flood))) == [True] * 3 + [False] * 2
    assert "new connections/s from this address" in caplog.text
    honest = await hosts("127.0.5.2")  # another address has its own bucket
    vid = await honest.connect(victim.address)
    assert (await honest.call(vid, "echo", {"ok": 1}))[0] == {"ok": 1}
    for _, w in flood:
        w.close()


async def test_honest_two_way_bulk_and_crossing_large_replies_on_one_slow_connection(hosts):
    """The reply rule (stop reading while a reply waits) must not deadlock honest peers: both
    sides stream mail at each other and serve each other large replies on ONE connection over an
    emulated link (400 Mbit/s, 20 ms RTT), with a small write buffer so both buffers are over
    their mark most of the time. (Pausing the reading whenever the write buffer is full
    deadlocks here: both sides stop.)"""
    kw = dict(conns_per_peer=1, write_buffer_bytes=128 * 1024, chunk_size=256 * 1024)
    a, b = await hosts("127.0.0.67", **kw), await hosts("127.0.0.68", **kw)
    big = bytes(24 << 20)  # more than the kernel and relay buffers hold, so they cannot hide a deadlock

    async def blob(peer_id: str, header: dict, payload: bytearray):
        return {}, big

    a.handle("blob", blob)
    b.handle("blob", blob)
    ip, port = b.address.rsplit(":", 1)
    async with LinkEmulator(("127.0.0.69", 0), (ip, int(port)), LinkSpec(0.01, rate_bps=400e6)) as emu:
        bid = await a.connect(emu.endpoint)

        async def stream(src: PeerHost, dst: str, name: str) -> None:
            await asyncio.gather(*(src.send(dst, f"{name}-{i}", {}, bytes(8 << 20)) for i in range(3)))

        async def drain(dst: PeerHost, src: str, name: str) -> int:
            return sum([len((await dst.recv(src, f"{name}-{i}", timeout=30))[1]) for i in range(3)])

        results = await asyncio.wait_for(asyncio.gather(
            stream(a, bid, "ab"), stream(b, a.peer_id, "ba"),
            drain(b, a.peer_id, "ab"), drain(a, bid, "ba"),
            a.call(bid, "blob", timeout=30), b.call(a.peer_id, "blob", timeout=30),
            a.call(bid, "echo", {"q": 1}, bytes(1 << 20), timeout=30)), 30)
    assert results[2] == results[3] == 24 << 20
    assert len(results[4][1]) == len(results[5][1]) == len(big)
    assert results[6][0] == {"q": 1} and len(results[6][1]) == 1 << 20


# ------------------------------------------------------------------------------- the rules, sans-IO

def test_mailbox_makes_room_from_departed_peers_then_the_biggest_holder():
    evicted: list[str] = []
    box = Mailbox(100, 250, connected=lambda p: p != "gone", evict=lambda p, reason: evicted.append(p))

    def mail(n: int) -> tuple[dict, bytearray]:
        return {}, bytearray(n)

    assert box.deliver("x", "t", mail(100)) is None and box.deliver("gone", "t", mail(100)) is None
    assert box.deliver("y", "t", mail(100)) is None  # 300 > 250: the departed peer's mail goes first
    assert box.total == 200 and box.take("gone", "t") is None and evicted == []
    assert box.deliver("z", "t", mail(80)) is None  # then the biggest holder (x), cut off
    assert evicted == ["x"] and box.total == 180 and box.take("x", "t") is None
    assert "100-byte mailbox limit" in box.deliver("y", "u", mail(100))  # per-peer limit first
    assert "host-wide 250-byte" in box.deliver("w", "t", mail(100))  # w would hold as much as y: refused
    assert evicted == ["x"] and box.total == 180


def test_reassembler_host_cap_evicts_a_bigger_holder_or_refuses_the_sender():
    evicted: list[str] = []
    asm = Reassembler(1 << 20, 1 << 20, 8, max_buffered_bytes=300, evict=lambda p, reason: evicted.append(p))

    def chunk(peer: str, off: int) -> None:
        header = {"i": 1, "o": off, "n": 1000, "z": 100, **({"k": "m", "t": "t", "h": {}} if off == 0 else {})}
        assert asm.add_chunk(peer, 1, header, bytearray(100)) is None

    for peer, off in [("a", 0), ("a", 100), ("b", 0)]:
        chunk(peer, off)
    chunk("c", 0)  # 400 > 300: a holds 200 > c's 100, so a goes
    assert evicted == ["a"] and asm.buffered == 200 and asm.pending("a") == 0
    chunk("b", 100)
    with pytest.raises(ProtocolError, match="host-wide limit of 300 bytes"):
        chunk("b", 200)  # b would hold the most: its own chunk is refused
    assert evicted == ["a"] and asm.buffered == 300


def test_inbound_gate_counts_handshaking_connections_apart():
    gate = InboundGate(HostLimits(max_inbound_connections=4, max_handshaking=2, handshake_rate_per_s=1e6,
                                  handshake_burst=10**6))
    assert gate.admit("1.1.1.1", "a") and gate.admit("1.1.1.2", "b")
    assert not gate.admit("1.1.1.3", "c")  # two in their handshake: the rest is reserved
    gate.authenticated()
    gate.authenticated()
    assert gate.admit("1.1.1.3", "c") and gate.admit("1.1.1.4", "d")
    assert not gate.admit("1.1.1.5", "e") and gate.open() == 4  # the total cap
    gate.release("1.1.1.3", handshaking=True)
    gate.release("1.1.1.1", handshaking=False)
    assert gate.handshaking == 1 and gate.open() == 2
