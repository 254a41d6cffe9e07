"""Real TCP through the userspace link emulator: delay, rate, stalls, closes, the CLI."""
from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time

import pytest

from testing.netem import LinkEmulator, LinkEmulatorSet, LinkSpec, parse_address
from tests.harness import free_port

HOST = "127.0.0.1"


class Server:
    """A loopback TCP server recording what it receives and when; echoes if asked to."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.arrivals: list[tuple[float, bytes]] = []
        self.received: dict[int, bytearray] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = len(self.received)
        buf = self.received[key] = bytearray()
        done = self.done.setdefault(key, asyncio.Event())
        while data := await reader.read(1 << 18):
            self.arrivals.append((time.monotonic(), data))
            buf += data
            if self.echo:
                writer.write(data)
                await writer.drain()
        writer.write(b"BYE")
        await writer.drain()
        writer.close()
        done.set()


async def ping_rtts(address, count: int = 12, size: int = 32) -> list[float]:
    reader, writer = await asyncio.open_connection(*address)
    rtts = []
    try:
        for _ in range(count):
            t0 = time.monotonic()
            writer.write(b"p" * size)
            await reader.readexactly(size)
            rtts.append(time.monotonic() - t0)
    finally:
        writer.close()
    return rtts


def assert_delay(samples: list[float], target: float, what: str, hops: int = 1) -> None:
    """Never early beyond the timer correction (<= 1 ms per hop); best case within 10%: other
    jobs on this shared machine only add scheduling delay, so the minimum is the emulator's own
    accuracy (the benchmark reports medians)."""
    assert min(samples) >= target - 0.001 * hops - 0.0002, f"{what}: {min(samples):.4f} earlier than {target}"
    assert min(samples) <= 1.10 * target, f"{what}: best {min(samples):.4f}, set {target}"
    assert statistics.median(samples) <= 2 * target, f"{what}: median {statistics.median(samples):.4f}"


async def test_one_way_delays_and_rtt():
    up, down = LinkSpec(delay_s=0.030), LinkSpec(delay_s=0.010)
    async with Server(echo=True) as srv, LinkEmulator((HOST, 0), srv.address, up, down) as emu:
        reader, writer = await asyncio.open_connection(*emu.address)
        one_way, rtts = [], []
        for i in range(20):
            t0 = time.monotonic()
            writer.write(i.to_bytes(4, "big"))
            await reader.readexactly(4)
            rtts.append(time.monotonic() - t0)
            one_way.append(srv.arrivals[-1][0] - t0)
        writer.close()
    assert_delay(one_way, 0.030, "one-way delay (up)")
    assert_delay(rtts, 0.040, "RTT", hops=2)


async def test_rate_cap_is_shared_by_parallel_connections():
    rate = 16e6  # 2 MB/s: 3 MB take ~1.5 s
    per_conn = 1_500_000
    async with Server() as srv, LinkEmulator((HOST, 0), srv.address, LinkSpec(0.005, rate_bps=rate)) as emu:
        async def push() -> None:
            reader, writer = await asyncio.open_connection(*emu.address)
            for _ in range(per_conn // 50_000):
                writer.write(os.urandom(50_000))
                await writer.drain()
            writer.write_eof()
            assert await reader.read() == b"BYE"
            writer.close()

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(push(), push()), 30)
        elapsed = time.monotonic() - t0
        assert emu.stats()["up"].bytes_forwarded == 2 * per_conn
    bps = 2 * per_conn * 8 / elapsed
    # Never above the cap; below it only by what a busy shared CPU can cost.
    assert 0.85 * rate <= bps <= 1.03 * rate, f"2 connections together: {bps / 1e6:.2f} Mbit/s, cap {rate / 1e6}"


async def test_stall_pauses_delivery_then_resumes_without_loss():
    payload = os.urandom(8_000_000)  # more than the sender's kernel buffers can absorb
    spec = LinkSpec(0.005, rate_bps=160e6)
    async with Server() as srv, LinkEmulator((HOST, 0), srv.address, spec) as emu:
        reader, writer = await asyncio.open_connection(*emu.address)

        async def send() -> None:
            for off in range(0, len(payload), 100_000):
                writer.write(payload[off:off + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        await asyncio.sleep(0.05)
        emu.stall(0.6, direction="up")
        await asyncio.sleep(0.1)  # pieces already due when the stall began may land just after it
        got_at_start = len(srv.received[0])
        await asyncio.sleep(0.4)
        assert len(srv.received[0]) == got_at_start, "bytes were delivered during the stall"
        assert emu.stats()["up"].stalled
        # Backpressure: the relay stops reading once its queue is full instead of buffering all.
        assert emu.stats()["up"].bytes_queued <= spec.queue_limit() + 256 * 1024
        assert not sender.done()
        await asyncio.wait_for(sender, 20)
        assert await asyncio.wait_for(reader.read(), 20) == b"BYE"
        writer.close()
    assert hashlib.sha256(srv.received[0]).digest() == hashlib.sha256(payload).digest()


async def test_jitter_varies_delay_but_never_reorders():
    spec = LinkSpec(delay_s=0.020, jitter_s=0.008)
    async with Server() as srv, LinkEmulator((HOST, 0), srv.address, spec, seed=7) as emu:
        reader, writer = await asyncio.open_connection(*emu.address)
        sent = []
        for i in range(40):
            sent.append(time.monotonic())
            writer.write(i.to_bytes(4, "big"))
            await asyncio.sleep(0.002)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
    data = bytes(srv.received[0])
    assert [int.from_bytes(data[i:i + 4], "big") for i in range(0, len(data), 4)] == list(range(40))
    # Delay of each message = arrival of the chunk holding its last byte - its send time.
    ends, total = [], 0
    for t, chunk in srv.arrivals:
        total += len(chunk)
        ends.append((total, t))
    delays = [next(t for end, t in ends if end >= 4 * (i + 1)) - sent[i] for i in range(40)]
    assert min(delays) >= 0.020 - 0.008 - 0.001
    assert max(delays) - min(delays) > 0.004, "jitter had no effect"


async def test_half_close_reaches_target_after_delay():
    async with Server(echo=True) as srv, LinkEmulator((HOST, 0), srv.address, LinkSpec(0.02)) as emu:
        reader, writer = await asyncio.open_connection(*emu.address)
        writer.write(b"hello")
        t0 = time.monotonic()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"helloBYE"  # other direction still open
        assert time.monotonic() - t0 >= 0.039
        writer.close()


async def test_unreachable_target_and_reset_close_the_client():
    async with LinkEmulator((HOST, 0), (HOST, free_port())) as emu:
        reader, writer = await asyncio.open_connection(*emu.address)
        writer.write(b"x")
        try:  # the relay refuses like the target would: a reset (or at least an EOF)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
    async with Server(echo=True) as srv, LinkEmulator((HOST, 0), srv.address, LinkSpec(0.001)) as emu:
        reader, writer = await asyncio.open_connection(*emu.address)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert emu.connections == 1
        assert emu.reset_connections() == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()


async def test_emulator_set_mesh_relays_every_pair():
    async with Server(echo=True) as a, Server(echo=True) as b, Server(echo=True) as c:
        async with LinkEmulatorSet(seed=1) as links:
            mesh = await links.mesh({"a": a.address, "b": b.address, "c": c.address}, LinkSpec(0.005))
            assert sorted(mesh) == sorted((x, y) for x in "abc" for y in "abc" if x != y)
            rtts = await asyncio.gather(*(ping_rtts(emu.address, count=3) for emu in mesh.values()))
            assert all(0.0095 <= statistics.median(r) < 0.05 for r in rtts)
            # (a, b) and (b, a) are the two ends of one link: b -> a bytes count on a's down side.
            assert mesh["a", "b"].stats()["down"].bytes_forwarded == 2 * 3 * 32
            assert mesh["b", "a"].stats()["up"].bytes_forwarded == 2 * 3 * 32
            links.stall(0.2)
            t0 = time.monotonic()
            await ping_rtts(mesh["a", "b"].address, count=1)
            assert time.monotonic() - t0 >= 0.19


def test_bad_specs_raise_value_error():
    for kwargs in ({"delay_s": -1}, {"jitter_s": float("nan")}, {"rate_bps": 0}, {"queue_bytes": 0}):
        with pytest.raises(ValueError):
            LinkSpec(**kwargs)
    for text in ("nohost", "h:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_address(text)
    assert parse_address("[::1]:80") == ("::1", 80)


async def test_cli_relays_with_configured_rtt(procs):
    async with Server(echo=True) as srv:
        child = procs.python("-m", "testing.netem", "--listen", f"{HOST}:0",
                             "--target", "%s:%d" % srv.address, "--delay-ms", "15", "--rate-mbit", "50")
        rtts = await ping_rtts(parse_address(child.ready["listen"]), count=20)
    assert child.ready["up"]["rate_bps"] == 50e6
    assert_delay(rtts, 0.030, "CLI relay RTT", hops=2)


def test_cli_rejects_bad_arguments(procs):
    child = procs.python("-m", "testing.netem", "--listen", "nope", "--target", "127.0.0.1:1", wait_ready=False)
    assert child.wait(30) == 2
    child.wait_for_line("host:port")
