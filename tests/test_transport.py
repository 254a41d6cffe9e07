"""PeerHost between real processes over real TCP on 127.0.0.x (child: tests/transport_child.py)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import time

import pytest

from peer.credentials import issue
from peer.errors import AuthError, Forbidden, NoSuchMethod, PeerUnavailable, RemoteError, TransportTimeout
from peer.identity import Identity
from peer.secure import RECORD_HEADER_SIZE
from peer.transport import PeerHost
from peer.wire import FIXED_HEADER_SIZE, parse_fixed_header
from tests.harness import wait_until_async
from tests.transport_child import Impostor, pattern

TOKEN = b"swarm-token-b94de711f24b1b117b1e35ebf8e6f5a3301e96dc"
CHILD = "tests/transport_child.py"


def spawn(procs, *args: str):
    return procs.python(CHILD, *args)


async def child_line(child, needle: str, timeout: float = 20) -> str:
    """Wait for a child's output line without blocking this test's event loop (our host serves on it)."""
    return await asyncio.to_thread(child.wait_for_line, needle, timeout)


@pytest.fixture
async def host():
    h = PeerHost(Identity.generate(), TOKEN, conns_per_peer=2)
    await h.start("127.0.0.1", 0)
    yield h
    await h.close()


async def test_encrypted_rpc(procs, host):
    child = spawn(procs, "--host", "127.0.0.2")
    remote = await host.connect(child.ready["address"], expected_peer_id=child.ready["peer_id"])
    assert remote == child.ready["peer_id"]
    hdr, payload = await host.call(remote, "echo", {"x": [1, 2.5, "y"]}, b"\x00payload\xff")
    assert hdr == {"echo": {"x": [1, 2.5, "y"]}} and payload == b"\x00payload\xff"
    with pytest.raises(RemoteError, match="handler exploded on purpose") as failed:
        await host.call(remote, "fail")
    assert type(failed.value) is RemoteError and failed.value.detail.endswith("handler exploded on purpose")
    with pytest.raises(NoSuchMethod, match="no handler"):  # typed: an error code on the wire, not parsed text
        await host.call(remote, "no-such-method")
    with pytest.raises(TransportTimeout):
        await host.call(remote, "sleep", {"s": 5}, timeout=0.3)
    rtt = await host.ping(remote)
    stats = host.link_stats(remote)
    assert 0 < rtt < 5 and stats.rtt_s is not None and stats.bytes_sent > 0 and stats.bytes_received > 0
    with pytest.raises(AuthError, match="unexpected peer id"):
        await host.connect(child.ready["address"], expected_peer_id="0" * 40)


async def test_large_payloads_stream_intact(procs, host):
    child = spawn(procs)
    remote = await host.connect(child.ready["address"])
    data = os.urandom(50 * 1024 * 1024)
    waiting = asyncio.ensure_future(host.call(remote, "recv_sha", {"tag": "big"}, timeout=120))
    await host.send(remote, "big", {"note": "50MB"}, data)
    hdr, _ = await waiting
    assert hdr == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "header": {"note": "50MB"}}
    assert host.link_stats(remote).bandwidth_Bps > 0
    # the other direction, striped over the child's pool, plus a large RPC payload on one connection
    await host.call(remote, "send_back", {"tag": "back", "seed": 7, "size": 9_000_001}, timeout=60)
    hdr, payload = await host.recv(remote, "back", timeout=60)
    assert hdr == {"seed": 7} and payload == pattern(7, 9_000_001)
    blob = os.urandom(3 * 1024 * 1024 + 5)
    assert (await host.call(remote, "echo", {}, blob, timeout=60))[1] == blob


async def test_wrong_token_rejected_on_both_sides(procs, host):
    child = spawn(procs, "--token", "another-token-of-enough-bytes")
    with pytest.raises(AuthError, match="wrong swarm token"):
        await host.connect(child.ready["address"])
    line = await child_line(child, "rejected")
    assert "wrong swarm token" in line
    assert host.connected_peers() == []


async def test_wrong_token_inbound_rejected_on_both_sides(procs, host, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    child = spawn(procs, "--token", "another-token-of-enough-bytes", "--connect", host.address)
    line = await child_line(child, "CONNECT-FAILED")
    assert "AuthError" in line and "wrong swarm token" in line
    await wait_until_async(lambda: "wrong swarm token" in caplog.text)


async def test_impostor_key_rejected_on_both_sides(procs, host, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    # the child listens with a public key it cannot sign for
    child = spawn(procs, "--impostor")
    with pytest.raises(AuthError, match="bad signature"):
        await host.connect(child.ready["address"])
    assert "bad signature" in await child_line(child, "rejected")
    # the child dials us presenting a key it cannot sign for
    child2 = spawn(procs, "--impostor", "--connect", host.address)
    line = await child_line(child2, "CONNECT-FAILED")
    assert "AuthError" in line and "bad signature" in line
    await wait_until_async(lambda: "bad signature" in caplog.text)
    # an impostor in-process too: the same message whichever side dials
    fake = PeerHost(Impostor(host.identity), TOKEN)
    try:
        with pytest.raises(AuthError, match="rejected the handshake: bad signature"):
            await fake.connect(host.address)
    finally:
        await fake.close()


class Relay:
    """Man in the middle for client->server bytes: parses the two handshake frames the client
    sends (HELLO, AUTH), then AEAD records, and can tamper with or replay one record."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.mode: str | None = None  # "flip" | "replay": applied to the next record, once
        self.frozen = False  # True: forward nothing either way (a silent partition)
        self.sessions = 0
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.3", 0)
        return "127.0.0.3:%d" % self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _on_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        host, port = self.target.rsplit(":", 1)
        sr, sw = await asyncio.open_connection(host, int(port))
        self.sessions += 1
        mine = self.sessions == 1  # only the first connection of the pool is attacked
        back = asyncio.ensure_future(self._copy(sr, cw))
        try:
            for _ in range(2):
                head = await cr.readexactly(FIXED_HEADER_SIZE)
                _, _, hlen, plen = parse_fixed_header(head)
                sw.write(head + await cr.readexactly(hlen + plen))
            while True:
                head = await cr.readexactly(RECORD_HEADER_SIZE)
                (clen,) = struct.unpack_from("!I", head)
                record = bytearray(head + await cr.readexactly(clen))
                while self.frozen:
                    await asyncio.sleep(0.05)
                mode, self.mode = (self.mode, None) if mine else (None, self.mode)
                if mode == "flip":
                    record[-1] ^= 0x01  # last byte of the GCM tag
                sw.write(record)
                if mode == "replay":
                    sw.write(record)
                await sw.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # a relay session ends quietly (asyncio's server callback must not see a cancellation)
        finally:
            sw.close()
            cw.close()
            back.cancel()

    async def _copy(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.05)
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()


@pytest.mark.parametrize("attack, child_says", [("flip", "failed authentication"),
                                                 ("replay", "out of order or replayed")])
async def test_tampered_or_replayed_record_kills_only_that_connection(procs, host, attack, child_says):
    child, other = spawn(procs), spawn(procs, "--host", "127.0.0.4")
    relay = Relay(child.ready["address"])
    try:
        remote = await host.connect(await relay.start())
        other_id = await host.connect(other.ready["address"])
        attacked = host._conns[remote][0]  # the pool's first dial is the relay's first session
        assert len(host._conns[remote]) == 2
        relay.mode = attack
        results = []
        for i in range(2):  # round robin: one of these pings goes through the attacked connection
            try:
                results.append(await host.ping(remote, timeout=10))
            except PeerUnavailable:
                results.append(None)
        assert child_says in await child_line(child, "dropping connection")
        await wait_until_async(lambda: attacked.closed)
        assert None in results or attack == "replay"
        # the surviving connection to the same peer and the other peer still work; the pool refills
        await wait_until_async(lambda: len(host._conns.get(remote, [])) == 2)
        assert relay.sessions == 3
        for _ in range(3):
            assert (await host.call(remote, "echo", {"i": 1}, b"ok"))[1] == b"ok"
        assert (await host.call(other_id, "echo", {}, b"fine"))[1] == b"fine"
    finally:
        await relay.close()


async def test_pending_calls_and_recv_fail_promptly_when_peer_dies(procs, host):
    child = spawn(procs)
    remote = await host.connect(child.ready["address"])
    lost: list[str] = []
    host.on_peer_lost(lost.append)
    call = asyncio.ensure_future(host.call(remote, "sleep", {"s": 60}, timeout=60))
    recv = asyncio.ensure_future(host.recv(remote, "never", timeout=60))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    child.kill()
    for fut in (call, recv):
        with pytest.raises(PeerUnavailable):
            await asyncio.wait_for(fut, 10)
    assert time.monotonic() - t0 < 5
    assert lost == [remote]
    with pytest.raises(PeerUnavailable):
        await host.recv(remote, "later", timeout=5)
    with pytest.raises(PeerUnavailable):
        await host.call(remote, "echo", timeout=5)  # route known, but nobody listens any more


async def test_lazy_dial_via_route_and_discard_tag(procs, host):
    child = spawn(procs)
    host.add_route(child.ready["peer_id"], child.ready["address"])
    remote = child.ready["peer_id"]
    assert (await host.call(remote, "echo", {}, b"lazy"))[1] == b"lazy"
    await host.call(remote, "send_back", {"tag": "op/1/a", "seed": 1, "size": 10})
    await host.call(remote, "send_back", {"tag": "op/2/a", "seed": 2, "size": 10})
    await wait_until_async(lambda: host.mailbox.buffered() == 2)
    assert host.discard_tag("op/1/") == 1
    with pytest.raises(TransportTimeout):
        await host.recv(remote, "op/1/a", timeout=0.2)
    assert (await host.recv(remote, "op/2/a", timeout=5))[1] == pattern(2, 10)
    with pytest.raises(PeerUnavailable, match="no connection and no route"):
        await host.call("f" * 40, "echo")


async def test_receiver_limits_drop_the_offending_connection(host, caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    small = PeerHost(Identity.generate(), TOKEN, conns_per_peer=1, max_message_bytes=100_000)
    await small.start("127.0.0.5", 0)
    try:
        remote = await host.connect(small.address)
        await host.send(remote, "ok", {}, b"x" * 99_000)
        assert (await small.recv(host.peer_id, "ok", timeout=10))[1] == b"x" * 99_000
        try:
            await host.send(remote, "too-big", {}, b"y" * 3_000_000)
        except PeerUnavailable:
            pass  # the receiver may already have cut the connection while we were still writing
        await wait_until_async(lambda: "exceeds limit 100000" in caplog.text)
        await wait_until_async(lambda: not small.connected_peers())
        with pytest.raises(PeerUnavailable):
            await small.recv(host.peer_id, "too-big", timeout=5)
        pending = asyncio.ensure_future(host.recv("a" * 40, "never", timeout=30))
        await asyncio.sleep(0.05)
    finally:
        await small.close()
    await host.close()  # closing fails pending receives at once
    with pytest.raises(PeerUnavailable, match="host closed"):
        await asyncio.wait_for(pending, 5)


async def test_silent_partition_is_detected_by_keepalive(procs):
    child = spawn(procs)
    relay = Relay(child.ready["address"])
    quick = PeerHost(Identity.generate(), TOKEN, conns_per_peer=1, keepalive_s=0.2, dead_after_s=1.5)
    try:
        remote = await quick.connect(await relay.start())
        pending = asyncio.ensure_future(quick.recv(remote, "never"))  # no timeout: only keepalive ends it
        await asyncio.sleep(1.0)  # idle but alive: pings keep the connection up
        assert not pending.done() and quick.connected_peers() == [remote]
        relay.frozen = True
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="nothing received"):
            await asyncio.wait_for(pending, 10)
        assert time.monotonic() - t0 < 5
    finally:
        await quick.close()
        relay.frozen = False
        await relay.close()


async def test_credential_roles_are_enforced_and_revoked_peers_cut_off(caplog):
    caplog.set_level(logging.WARNING, logger="lowband.transport")
    authority = Identity.generate()
    made: list[PeerHost] = []

    def member(*roles: str) -> PeerHost:
        me = Identity.generate()
        cred = issue(authority, me.public_bytes, roles, now=time.time(), lifetime_s=3600, serial=len(made) + 1)
        made.append(PeerHost(me, credential=cred, authority=authority.public_bytes, conns_per_peer=2))
        return made[-1]

    async def echo(peer_id: str, header: dict, payload: bytearray):
        return header, payload

    server, trainer, client = member("serve"), member("train"), member("client")
    try:
        await server.start("127.0.0.5", 0)
        server.handle("train.step", echo, roles={"train", "operator"})
        server.handle("open", echo)
        sid = await trainer.connect(server.address)
        assert await client.connect(server.address) == sid
        assert server.roles_of(trainer.peer_id) == {"train"} and trainer.roles_of(sid) == {"serve"}
        assert server.roles_of("0" * 40) == frozenset()  # not connected: no roles
        assert (await trainer.call(sid, "train.step", {"x": 1}))[0] == {"x": 1}
        with pytest.raises(Forbidden, match=r"'train.step' needs one of the roles \['operator', 'train'\]"):
            await client.call(sid, "train.step")  # a typed error code on the wire
        assert (await client.call(sid, "open", {"y": 2}))[0] == {"y": 2}
        # a host with the swarm token but no credential is not let in
        outsider = PeerHost(Identity.generate(), TOKEN)
        made.append(outsider)
        with pytest.raises(AuthError):
            await outsider.connect(server.address)

        server.revoke([client.peer_id])
        await wait_until_async(lambda: not client.connected_peers() and client.peer_id not in server.connected_peers())
        assert "identity was revoked" in caplog.text
        with pytest.raises(AuthError, match="revoked"):
            await client.connect(server.address)
        with pytest.raises(AuthError, match="revoked"):  # nor does the server dial it
            await server.connect(client.address or await client.start("127.0.0.6", 0))
        assert (await trainer.call(sid, "open", {"z": 3}))[0] == {"z": 3}  # others are unaffected
    finally:
        for h in made:
            await h.close()


def test_host_needs_a_token_or_an_authority():
    with pytest.raises(ValueError, match="token or a coordinator authority"):
        PeerHost(Identity.generate())
    with pytest.raises(ValueError, match="at least 16 bytes"):
        PeerHost(Identity.generate(), b"short")
