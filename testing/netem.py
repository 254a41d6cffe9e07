"""Userspace link emulator: a TCP relay that makes a WAN link out of loopback.

The kernel on our test machines has no ``netem``, so tests and benchmarks put this relay between
two peers (docs/architecture.md §Measuring performance). Each direction of the link is modelled like a router port
feeding a long wire:

* serialization at the configured rate: a chunk departs at
  ``max(now, previous departure) + size / rate`` -- the departure clock is shared by every TCP
  connection through the same emulator, so parallel connections split one link's capacity;
* propagation delay after departure, pipelined: many chunks are in flight at once, each with its
  own arrival time (no sleep per chunk in sequence);
* jitter drawn uniformly from ``[-jitter, +jitter]`` per chunk, then raised to the previous
  arrival of the same TCP connection, because a TCP stream never delivers bytes out of order
  (so under continuous traffic the delay drifts towards delay + jitter);
* a bounded queue (default: a one-way bandwidth-delay product in flight plus a router buffer of
  one round-trip's worth of bytes): above it the relay stops reading from the sender, so TCP flow
  control pushes back on the sending application as it would on a real bottleneck;
* stalls: ``stall(seconds)`` stops forwarding; bytes keep queueing (up to the bound) and are
  delivered, intact and in order, when the stall ends.

Connection setup is not delayed (the client's connect completes at once); only data and the
closing of each direction are. ``LinkEmulatorSet`` runs many relays in one event loop, e.g. one
per peer pair of a mesh.

CLI: ``python -m testing.netem --listen 127.0.0.2:9000 --target 127.0.0.1:8000 --delay-ms 25
--rate-mbit 100`` prints ``READY {json}`` and relays until killed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down", "both"]

_KIB = 1024
# Reads are cut into pieces of at most this much serialization time, so the first byte of a
# large read is not held back until the last one has been "transmitted" (store-and-forward error).
_PIECE_SECONDS = 0.002
_MIN_PIECE = 16 * _KIB
_MAX_PIECE = 256 * _KIB
# Kernel receive buffer of the relay's reading sockets on a rate-limited link: bytes parked there
# are invisible to the emulated queue, so keep them to ~10 ms of link time.
_RCVBUF_SECONDS = 0.01
_WRITE_HIGH_WATER = 256 * _KIB
_UNLIMITED_QUEUE = 8 * 1024 * _KIB
_DIAL_TIMEOUT_S = 10.0
# Event-loop timers fire late by up to their clock granularity (uvloop: whole milliseconds, which
# would add ~1 ms per hop). Each link learns the mean lateness and fires that much early, at most
# 1 ms: lateness beyond that is a busy CPU, and correcting for it would deliver early when idle.
_MAX_TIMER_CORRECTION_S = 0.001
_now = time.perf_counter  # fine-grained everywhere, unlike uvloop's cached ms loop.time()

# End-of-stream markers travel through a pipe behind the data, so the close arrives after it.
_EOF, _CLOSE, _ABORT = "eof", "close", "abort"


@dataclass(frozen=True)
class LinkSpec:
    """One direction of an emulated link.

    delay_s: one-way propagation delay (a symmetric link has RTT = 2 * delay_s).
    jitter_s: per-chunk delay variation, uniform in [-jitter_s, +jitter_s], never reordering.
    rate_bps: bottleneck rate in bits per second; None = unlimited.
    queue_bytes: bytes the link may hold (in flight + waiting); None = derived, see queue_limit().
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float | None = None
    queue_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("delay_s", "jitter_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LinkSpec.{name} must be a finite number >= 0, got {value!r}")
        if self.rate_bps is not None and not (
                isinstance(self.rate_bps, (int, float)) and math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ValueError(f"LinkSpec.rate_bps must be > 0 or None, got {self.rate_bps!r}")
        if self.queue_bytes is not None and not (isinstance(self.queue_bytes, int) and self.queue_bytes > 0):
            raise ValueError(f"LinkSpec.queue_bytes must be a positive int or None, got {self.queue_bytes!r}")

    @classmethod
    def from_ms(cls, delay_ms: float = 0.0, jitter_ms: float = 0.0, rate_mbit: float | None = None,
                queue_bytes: int | None = None) -> "LinkSpec":
        return cls(delay_ms / 1e3, jitter_ms / 1e3, None if rate_mbit is None else rate_mbit * 1e6, queue_bytes)

    @property
    def rate_Bps(self) -> float | None:
        return None if self.rate_bps is None else self.rate_bps / 8

    def piece_bytes(self) -> int | None:
        """Largest unit scheduled as one chunk; None = keep reads whole (no serialization)."""
        if self.rate_Bps is None:
            return None
        return int(min(_MAX_PIECE, max(_MIN_PIECE, self.rate_Bps * _PIECE_SECONDS)))

    def queue_limit(self) -> int:
        """Bytes held before the sender is paused: the bytes on the wire (rate x one-way delay)
        plus a router buffer of about one bandwidth x RTT (2 x delay), at least a few pieces."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        if self.rate_Bps is None:
            return _UNLIMITED_QUEUE
        in_flight = self.rate_Bps * (self.delay_s + self.jitter_s)
        buffer = max(self.rate_Bps * 2 * self.delay_s, 4 * (self.piece_bytes() or 0), 64 * _KIB)
        return int(in_flight + buffer)

    def receive_buffer(self) -> int | None:
        if self.rate_Bps is None:
            return None
        return int(min(1024 * _KIB, max(64 * _KIB, self.rate_Bps * _RCVBUF_SECONDS)))


@dataclass
class DirectionStats:
    bytes_forwarded: int = 0
    bytes_queued: int = 0
    stalled: bool = False


class _Link:
    """State shared by all connections in one direction: the departure clock and the queue."""

    def __init__(self, spec: LinkSpec, loop: asyncio.AbstractEventLoop, rng: random.Random) -> None:
        self.spec = spec
        self.loop = loop
        self.rng = rng
        self.rate_Bps = spec.rate_Bps
        self.piece = spec.piece_bytes()
        self.limit = spec.queue_limit()
        self.resume_at = self.limit * 3 // 4  # hysteresis: do not flap read/pause per chunk
        self.next_departure = 0.0
        self.stall_until = 0.0
        self.queued = 0
        self.forwarded = 0
        self.blocked: set[_Pipe] = set()
        self.timer_lateness = 0.0

    def observe_lateness(self, late: float) -> None:
        late = min(_MAX_TIMER_CORRECTION_S, max(0.0, late))
        self.timer_lateness += 0.1 * (late - self.timer_lateness)

    def arrival(self, nbytes: int, now: float) -> float:
        start = max(now, self.next_departure, self.stall_until)
        if self.rate_Bps is not None:
            start += nbytes / self.rate_Bps
            self.next_departure = start
        delay = self.spec.delay_s
        if self.spec.jitter_s:
            delay = max(0.0, delay + self.rng.uniform(-self.spec.jitter_s, self.spec.jitter_s))
        return start + delay

    def stall(self, seconds: float) -> None:
        self.stall_until = max(self.stall_until, _now() + seconds)

    def take(self, pipe: "_Pipe", nbytes: int) -> None:
        self.queued += nbytes
        if self.queued > self.limit and pipe not in self.blocked:
            self.blocked.add(pipe)
            pipe.hold("link")

    def release(self, nbytes: int, delivered: bool) -> None:
        self.queued -= nbytes
        if delivered:
            self.forwarded += nbytes
        if self.blocked and self.queued <= self.resume_at:
            blocked, self.blocked = self.blocked, set()
            for pipe in blocked:
                pipe.unhold("link")

    def stats(self) -> DirectionStats:
        return DirectionStats(self.forwarded, self.queued, _now() < self.stall_until)


class _Pipe:
    """One direction of one relayed TCP connection: a queue of (arrival time, bytes | marker)."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.loop = link.loop
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.queue: deque[tuple[float, memoryview | str]] = deque()
        self.last_arrival = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.fire_at = 0.0
        self.timed_wait = False
        self.eof = False
        self.ended = False
        self.dst_gone = False
        self.holds: set[str] = set()

    # -- source side ---------------------------------------------------------------------------
    def hold(self, reason: str) -> None:
        if not self.holds and self.src is not None and not self.src.is_closing():
            self.src.pause_reading()
        self.holds.add(reason)

    def unhold(self, reason: str) -> None:
        self.holds.discard(reason)
        if not self.holds and self.src is not None and not self.src.is_closing():
            self.src.resume_reading()

    def push(self, data: bytes) -> None:
        if self.dst_gone or self.eof:
            return  # the receiver is closed: like a closed socket, bytes go nowhere
        now = _now()
        view = memoryview(data)
        step = self.link.piece or len(view)
        for offset in range(0, len(view), step):
            piece = view[offset:offset + step]
            self._enqueue(self.link.arrival(len(piece), now), piece)
        self.link.take(self, len(view))
        self.arm()

    def end(self, marker: str) -> None:
        if self.dst_gone or self.ended or (self.eof and marker == _EOF):
            return
        self.eof = True
        self.ended = marker != _EOF
        # A FIN/RST uses no link capacity but cannot overtake the data in front of it.
        now = _now()
        self._enqueue(max(now, self.link.next_departure, self.link.stall_until) + self.link.spec.delay_s, marker)
        self.arm()

    def _enqueue(self, arrival: float, item: memoryview | str) -> None:
        arrival = max(arrival, self.last_arrival)  # TCP keeps byte order: jitter may not reorder
        self.last_arrival = arrival
        self.queue.append((arrival, item))

    # -- destination side ----------------------------------------------------------------------
    def arm(self) -> None:
        if self.timer is None and self.queue and self.dst is not None:
            self.fire_at = max(self.queue[0][0], self.link.stall_until) - self.link.timer_lateness
            wait = self.fire_at - _now()
            # Only real waits teach the lateness; an overdue callback measures a busy loop instead.
            self.timed_wait = wait >= 0.001
            self.timer = self.loop.call_later(max(0.0, wait), self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        dst = self.dst
        if dst is None or self.dst_gone:
            return
        now = _now()
        if self.timed_wait:
            self.link.observe_lateness(now - self.fire_at)
        slack = self.link.timer_lateness
        if now + slack < self.link.stall_until:
            self.arm()
            return
        batch: list[memoryview] = []
        nbytes = 0
        queue = self.queue
        while queue and queue[0][0] <= now + slack:
            item = queue.popleft()[1]
            if isinstance(item, str):
                self._flush(dst, batch, nbytes)
                batch, nbytes = [], 0
                self._finish(dst, item)
                continue
            batch.append(item)
            nbytes += len(item)
        self._flush(dst, batch, nbytes)
        self.arm()

    def _flush(self, dst: asyncio.Transport, batch: list[memoryview], nbytes: int) -> None:
        if batch:
            if not dst.is_closing():
                dst.writelines(batch)
            self.link.release(nbytes, delivered=True)

    def _finish(self, dst: asyncio.Transport, marker: str) -> None:
        if marker == _ABORT:
            dst.abort()
        elif marker == _EOF and dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
        else:
            dst.close()

    def drop(self) -> None:
        """The destination socket is gone: forget queued bytes and stop reading for it."""
        self.dst_gone = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        dropped = sum(len(item) for _, item in self.queue if not isinstance(item, str))
        self.queue.clear()
        self.link.blocked.discard(self)
        self.link.release(dropped, delivered=False)
        # Keep draining the source (bytes are discarded) until its own close reaches it.
        self.holds.clear()
        if self.src is not None and not self.src.is_closing():
            self.src.resume_reading()


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; `out` carries what it reads, `into` feeds it."""

    def __init__(self, conn: "_Connection", out: _Pipe, into: _Pipe, rcvbuf: int | None) -> None:
        self.conn = conn
        self.out = out
        self.into = into
        self.rcvbuf = rcvbuf
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.out.src = transport
        self.into.dst = transport
        self.conn.side_up(self)

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.end(_EOF)
        return True  # half-close: keep sending the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.end(_ABORT if exc is not None else _CLOSE)
        self.into.drop()
        self.conn.side_down(self)

    # The destination's write buffer is full: stop reading from the source (TCP flow control).
    def pause_writing(self) -> None:
        self.into.hold("dst")

    def resume_writing(self) -> None:
        self.into.unhold("dst")


class _Connection:
    def __init__(self, emu: "LinkEmulator") -> None:
        self.emu = emu
        self.up = _Pipe(emu._up)
        self.down = _Pipe(emu._down)
        self.client = _Side(self, self.up, self.down, emu.up.receive_buffer())
        self.server = _Side(self, self.down, self.up, emu.down.receive_buffer())
        self.open_sides = 0

    def side_up(self, side: _Side) -> None:
        self.open_sides += 1
        if side is self.client:
            self.up.hold("dial")  # nothing to forward to until the target answers
            self.emu._connections.add(self)
            self.emu._spawn(self._dial())
        else:
            self.up.arm()

    def side_down(self, side: _Side) -> None:
        self.open_sides -= 1
        if self.open_sides <= 0:
            self.emu._connections.discard(self)

    async def _dial(self) -> None:
        host, port = self.emu.target
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(lambda: self.server, host, port),
                _DIAL_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            if self.client.transport is not None:
                self.client.transport.abort()  # the target is unreachable: refuse like it would
            return
        self.up.unhold("dial")

    def abort(self) -> None:
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.abort()


Address = tuple[str, int]


def parse_address(text: str) -> Address:
    """'host:port' -> (host, port); raises ValueError on anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address must look like host:port, got {text!r}")
    return host.strip("[]"), int(port)


class LinkEmulator:
    """A TCP relay from ``listen`` to ``target`` shaping each direction (up = client -> target).

    >>> emu = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", 8000), up=LinkSpec(0.025, rate_bps=100e6))
    >>> await emu.start(); emu.endpoint      # '127.0.0.1:PORT' -- dial this instead of the target

    ``reverse_of=other`` makes this relay the other end of `other`'s link: it shares other's two
    directions (its up is other's down), so whichever side dials, the pair has one link's capacity.
    """

    def __init__(self, listen: Address, target: Address, up: LinkSpec | None = None,
                 down: LinkSpec | None = None, *, seed: int | None = None,
                 reverse_of: "LinkEmulator | None" = None) -> None:
        self.listen = listen
        self.target = target
        if reverse_of is not None:
            if up is not None or down is not None:
                raise ValueError("a reverse_of relay takes its link specs from the relay it mirrors")
            up, down = reverse_of.down, reverse_of.up
        self.up = up or LinkSpec()
        self.down = down if down is not None else self.up
        self._reverse_of = reverse_of
        self._rng = random.Random(seed)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._up: _Link
        self._down: _Link

    async def start(self) -> "LinkEmulator":
        if self._server is not None:
            raise RuntimeError("LinkEmulator already started")
        loop = asyncio.get_running_loop()
        if self._reverse_of is None:
            self._up = _Link(self.up, loop, self._rng)
            self._down = _Link(self.down, loop, self._rng)
        else:
            if self._reverse_of._server is None:
                raise RuntimeError("start the relay named in reverse_of first")
            self._up, self._down = self._reverse_of._down, self._reverse_of._up
        self._server = await loop.create_server(lambda: _Connection(self).client, *self.listen)
        return self

    @property
    def address(self) -> Address:
        if self._server is None:
            raise RuntimeError("LinkEmulator not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def endpoint(self) -> str:
        host, port = self.address
        return f"{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self._connections)

    def stall(self, seconds: float, direction: Direction = "both") -> None:
        """Stop forwarding for `seconds`; queued bytes are kept and delivered afterwards."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"stall seconds must be a finite number >= 0, got {seconds!r}")
        for link in self._links(direction):
            link.stall(seconds)

    def reset_connections(self) -> int:
        """Abort every relayed connection (both ends see a reset), e.g. to emulate a link failure.
        New connections are still accepted. Returns how many were cut."""
        conns = list(self._connections)
        for conn in conns:
            conn.abort()
        return len(conns)

    def stats(self) -> dict[str, DirectionStats]:
        return {"up": self._up.stats(), "down": self._down.stats()}

    def _links(self, direction: Direction) -> Iterable[_Link]:
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")
        if self._server is None:
            raise RuntimeError("LinkEmulator not started")
        return [self._up, self._down] if direction == "both" else [self._up if direction == "up" else self._down]

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._connections):
            conn.abort()
        await asyncio.wait_for(server.wait_closed(), 10)

    async def __aenter__(self) -> "LinkEmulator":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


class LinkEmulatorSet:
    """Many relays in one event loop, closed together (e.g. one per ordered peer pair)."""

    def __init__(self, listen_host: str = "127.0.0.1", *, seed: int | None = None) -> None:
        self.listen_host = listen_host
        self._rng = random.Random(seed)
        self.emulators: list[LinkEmulator] = []

    async def add(self, target: Address, up: LinkSpec | None = None, down: LinkSpec | None = None,
                  listen: Address | None = None, reverse_of: LinkEmulator | None = None) -> LinkEmulator:
        emu = LinkEmulator(listen or (self.listen_host, 0), target, up, down, seed=self._rng.getrandbits(64),
                           reverse_of=reverse_of)
        await emu.start()
        self.emulators.append(emu)
        return emu

    async def mesh(self, targets: Mapping[Hashable, Address], up: LinkSpec,
                   down: LinkSpec | None = None) -> dict[tuple[Hashable, Hashable], LinkEmulator]:
        """A relay for every ordered pair (a, b), a != b: a dials ``result[a, b].endpoint`` to
        reach b. Relays (a, b) and (b, a) share one emulated link, so a pair has one link's
        capacity whichever peer dials. For a before b in `targets`, `up` shapes a -> b and `down`
        b -> a (default: same as up)."""
        relays: dict[tuple[Hashable, Hashable], LinkEmulator] = {}
        names = list(targets)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                relays[a, b] = await self.add(targets[b], up, down)
                relays[b, a] = await self.add(targets[a], reverse_of=relays[a, b])
        return relays

    def stall(self, seconds: float, direction: Direction = "both") -> None:
        for emu in self.emulators:
            emu.stall(seconds, direction)

    async def close(self) -> None:
        emulators, self.emulators = self.emulators, []
        await asyncio.gather(*(emu.close() for emu in emulators))

    async def __aenter__(self) -> "LinkEmulatorSet":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _cli_specs(args: argparse.Namespace) -> tuple[LinkSpec, LinkSpec]:
    up = LinkSpec.from_ms(args.delay_ms, args.jitter_ms, args.rate_mbit, args.queue_bytes)
    down = LinkSpec.from_ms(
        args.delay_ms if args.down_delay_ms is None else args.down_delay_ms,
        args.jitter_ms,
        args.rate_mbit if args.down_rate_mbit is None else args.down_rate_mbit,
        args.queue_bytes)
    return up, down


async def _serve(args: argparse.Namespace) -> None:
    up, down = _cli_specs(args)
    emu = LinkEmulator(parse_address(args.listen), parse_address(args.target), up, down, seed=args.seed)
    await emu.start()
    print("READY " + json.dumps({"listen": emu.endpoint, "target": args.target, "pid": os.getpid(),
                                 "up": up.__dict__, "down": down.__dict__}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emu.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testing.netem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to accept on (port 0 = any)")
    parser.add_argument("--target", required=True, help="host:port to relay to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--rate-mbit", type=float, default=None, help="rate cap per direction (default none)")
    parser.add_argument("--down-delay-ms", type=float, default=None, help="target->client delay if different")
    parser.add_argument("--down-rate-mbit", type=float, default=None, help="target->client rate if different")
    parser.add_argument("--queue-bytes", type=int, default=None, help="link queue bound (default ~BDP)")
    parser.add_argument("--seed", type=int, default=None, help="jitter random seed")
    args = parser.parse_args(argv)
    try:
        _cli_specs(args)
        parse_address(args.listen), parse_address(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        import uvloop  # optional speed-up; the relay is plain asyncio
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(_serve(args))
        else:
            asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
