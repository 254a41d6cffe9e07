"""Pipelined ring reduce-scatter + all-gather over one flat fp32 vector (docs/architecture.md §Collectives).

The vector is cut into one shard per member (balanced, aligned to the codec block) and each
shard into chunks of at most ``chunk_bytes`` on the wire (see ``RingPlan.make``); on fast
measured links a shard's originator may use 2x or 4x chunks (``GROWS``), which every message of
that shard states and every later hop keeps (elementwise arithmetic on block-aligned ranges, so
the result does not depend on it). Ring position r sends shard r-s at reduce-scatter step s and
receives shard r-s-1, so after n-1 steps it owns shard r+1, fully reduced. Per hop the running partial sum is decoded, accumulated in fp32 with the local values
and re-quantized. In the all-gather the owner quantizes its shard once; every other peer
forwards those bytes verbatim and the owner keeps decode(encode(x)), so every peer decodes the
same bytes and ends bit-identical.

Pipelining: every (phase, step, chunk) message is independent, so a chunk is forwarded as soon
as it is reduced while the socket is still busy with earlier ones. A priority queue sends in
the order the next peer consumes, on one connection so chunks arrive in that order, a small
window of sends keeps it busy, heavy torch work runs in a thread so the event loop keeps
pumping, and all-gather chunks are forwarded before (not after) they are decoded. With
``pace_s`` (an average that overlaps training has time to spare) the sender spaces this peer's
messages so its bytes leave over about that long instead of in one burst at the link's rate.
"""
from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compression import Codec, get_codec
from peer.errors import TransportTimeout

from .buffers import empty_f32
from .deadline import DeadlinePolicy, observe_bandwidth
from .errors import CollectiveAborted, CollectiveError
from .layout import fingerprint

# Largest chunk on the wire. 4 peers, 100 MB fp32 over 100 Mbit/s tbf links, medians of 4:
# 1 MiB chunks 13.86 s, 512 KiB 13.59 s, 256 KiB 13.41 s (gloo 13.67 s in the same run): the
# pipeline drains one chunk per hop at the end, and small chunks leave the link less to wait for.
DEFAULT_CHUNK_BYTES = 256 << 10
MIN_CHUNK_BYTES = 64 << 10      # smaller chunks only when the caller asks (per-message costs add up)
CHUNKS_PER_SHARD = 16           # unless that makes chunks smaller than MIN_CHUNK_BYTES
MIN_SEND_WINDOW = 2             # concurrent sends per neighbour, at least
# Smaller work runs inline: a thread hop (executor wake-up, GIL hand-offs with the busy loop)
# costs more than it saves; the kernel's socket buffers keep the link busy meanwhile. Up to 1 Mi
# values covers every default chunk, grown ones included, but int4's largest (4 peers, loopback,
# 100 MB, 2 cores: int8 total CPU per all-reduce 0.51-0.70 -> 0.42-0.46 s, fp32 within noise).
_INLINE_NUMEL = 1 << 20
_RS, _AG = 0, 1                 # send-priority phases
# On fast links a shard's originator may send chunks GROWS[i] times the plan's: each message costs
# CPU on both ends whatever its size (loopback, 4 peers, 100 MB fp32: 0.51 -> 0.37 CPU s per rank
# with 1 MiB chunks), while the drain at the end grows by one chunk time per hop. A chunk grows
# only while it still moves in GROW_CHUNK_S at the rate the ring measured, so a grown chunk never
# takes longer per hop than a 256 KiB one on the 100 Mbit/s links the plan was tuned on (21 ms),
# and those links keep the plan's chunks. (A CPU-bound ring measures its own pace, not the link:
# loopback under load reads 45-65 MB/s.)
GROWS = (1, 2, 4)
GROW_CHUNK_S = 0.016


def resolve_codec(codec: str | Codec, **options: Any) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if not isinstance(codec, str):
        raise CollectiveError(f"codec must be a codec name or a Codec, got {type(codec).__name__}")
    try:
        return get_codec(codec, **options)
    except (KeyError, ValueError, TypeError) as exc:
        raise CollectiveError(f"unknown codec {codec!r}: {exc}") from exc


def codec_align(codec: Codec) -> int:
    return max(1, int(getattr(codec, "block_size", 0) or 1))


@dataclass(frozen=True)
class RingPlan:
    """Shard j = [bounds[j][0], bounds[j][1]) of the flat vector; chunks of ``chunk`` elements."""

    bounds: tuple[tuple[int, int], ...]
    chunk: int

    @classmethod
    def make(cls, numel: int, n: int, codec: Codec, chunk_bytes: int) -> "RingPlan":
        """Chunks of at most ``chunk_bytes`` on the wire and at most 1/CHUNKS_PER_SHARD of a
        shard: the pipeline fills and drains one chunk at a time, and a peer's slack before its
        link idles is about one shard-time (only chunks it already reduced are ready to send),
        so big chunks add a tail and let a short stall of one peer idle the ring. Small ones
        cost per-message work, hence the floor."""
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise CollectiveError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        align = codec_align(codec)
        per = math.ceil(numel / n) if numel else 0
        if per > align:
            per = math.ceil(per / align) * align
        target = min(chunk_bytes, max(MIN_CHUNK_BYTES, codec.wire_bytes(per) // CHUNKS_PER_SHARD))
        ref = 1 << 20
        chunk = max(align, target * ref // max(1, codec.wire_bytes(ref)) // align * align)
        bounds = tuple((min(j * per, numel), min((j + 1) * per, numel)) for j in range(n))
        return cls(bounds, chunk)

    def chunks(self, shard: int, grow: int = 1) -> list[tuple[int, int]]:
        """Element ranges of the shard's chunks, ``grow`` times the plan's chunk each."""
        a, b = self.bounds[shard]
        step = self.chunk * grow
        return [(s, min(s + step, b)) for s in range(a, b, step)]


async def compute(fn: Callable[[], Any], numel: int) -> Any:
    """Run torch work off the event loop when it is big enough to matter."""
    if numel >= _INLINE_NUMEL:
        return await asyncio.to_thread(fn)
    return fn()


def send_window(host) -> int:
    """Messages in flight per neighbour: one per pooled connection of the host (a few sends
    queued keep the one connection a ring uses busy while the next chunk is reduced)."""
    return max(MIN_SEND_WINDOW, int(getattr(host, "conns_per_peer", MIN_SEND_WINDOW)))


class Sender:
    """Sends queued messages to one peer, lowest (phase, step, chunk) first, a few at a time, all
    on one pooled connection: they arrive one after another at the link's full rate, so the next
    peer can forward each as early as possible (striped, a window of them would share the link
    and arrive together, a window-time late)."""

    def __init__(self, host, peer: str, timeout_s: float, rate_Bps: float | None = None) -> None:
        self.host, self.peer, self.timeout_s = host, peer, timeout_s
        self.window = send_window(host)
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self.seq = itertools.count()
        self.rate_Bps = rate_Bps  # paced: start sends no faster than this on average
        self._next_at = 0.0

    def put(self, order: tuple[int, int, int], tag: str, header: dict, payload) -> None:
        self.queue.put_nowait((order, next(self.seq), (tag, header, payload)))

    def close(self) -> None:
        # sorts after every (phase, step, chunk) of any user's phases (the robust all-reduce's
        # gather phase is numbered 2), so no queued chunk is dropped behind it
        self.queue.put_nowait(((math.inf,), next(self.seq), None))

    async def _pace(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at = max(self._next_at, now) + nbytes / self.rate_Bps

    async def _wait(self, inflight: set[asyncio.Task]) -> set[asyncio.Task]:
        """Wait until a send in flight finishes; the ones still pending. Sends on one connection
        finish in order, so none finishing for ``timeout_s`` is a stalled link (one timeout here
        instead of a wait_for task around every message)."""
        done, pending = await asyncio.wait(inflight, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TransportTimeout(f"send to {self.peer[:8]} stalled for {self.timeout_s:.1f}s")
        for task in done:
            task.result()
        return pending

    async def run(self) -> None:
        inflight: set[asyncio.Task] = set()
        try:
            while True:
                _, _, item = await self.queue.get()
                if item is None:
                    break
                if self.rate_Bps:
                    await self._pace(len(item[2]))
                while len(inflight) >= self.window:
                    inflight = await self._wait(inflight)
                tag, header, payload = item
                inflight.add(asyncio.get_running_loop().create_task(
                    self.host.send(self.peer, tag, header, payload, lane=0)))
            while inflight:
                inflight = await self._wait(inflight)
        finally:
            for task in inflight:
                task.cancel()


class RingRun:
    """One attempt of a ring reduce-scatter (+ all-gather) over ``members`` in ring order."""

    def __init__(self, host, members: list[str], prefix: str, codec: Codec, flat: torch.Tensor,
                 plan: RingPlan, *, mean: bool, gather: bool, deadline: float,
                 policy: DeadlinePolicy, layout_key: int, pace_s: float = 0.0) -> None:
        self.host, self.members, self.prefix, self.codec = host, members, prefix, codec
        self.flat, self.plan, self.mean, self.gather = flat, plan, mean, gather
        self.deadline = deadline
        self.n = len(members)
        self.rank = members.index(host.peer_id)
        self.prev = members[(self.rank - 1) % self.n]
        self.next = members[(self.rank + 1) % self.n]
        # Silences allow for the largest chunk a neighbour may choose (GROWS).
        chunk_wire = codec.wire_bytes(plan.chunk) * GROWS[-1]
        window = send_window(host)
        self.stall_s = policy.stall_s(host, self.prev, chunk_wire * window, 4 * plan.chunk * GROWS[-1] * 3)
        self.send_s = policy.stall_s(host, self.next, chunk_wire * window, 4 * plan.chunk * GROWS[-1] * 3)
        self.grow = 1 if pace_s > 0 else self._choose_grow(policy, codec.wire_bytes(plan.chunk))
        # Paced (pace_s > 0): this peer's sends spread over about pace_s seconds, so a neighbour
        # may also be silent for the pacing gap of a window of chunks.
        sent = codec.wire_bytes(flat.numel()) * (self.n - 1) / self.n * (2 if gather else 1)
        self.rate_Bps = sent / pace_s if pace_s > 0 and sent > 0 else None
        if self.rate_Bps:
            self.stall_s += 2 * chunk_wire * window / self.rate_Bps
        self.keys = {"g": fingerprint(members), "l": layout_key}
        self.result = empty_f32(flat.numel(), flat.device) if gather else None
        self.shard: torch.Tensor | None = None
        self.heard_prev = False
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes) of messages from prev

    def _choose_grow(self, policy: DeadlinePolicy, chunk_wire: int) -> int:
        """Chunk multiplier for the shard this peer starts, from the measured rate of the link
        from ``prev`` (the ring's own receive rate: ring links are alike, and nothing measures
        the link to ``next`` on the ring's traffic). Unmeasured links keep the plan's chunks."""
        bw = policy.measured_bandwidth(self.host, self.prev) or 0.0
        return max(g for g in GROWS if g == 1 or g * chunk_wire <= bw * GROW_CHUNK_S)

    def _tag(self, phase: str, step: int, chunk: int) -> str:
        return f"{self.prefix}{phase}|{step}|{chunk}"

    async def _recv_shard(self, phase: str, step: int, shard: int):
        """Receive one shard's chunks from prev in order: yields (chunk, a, b, header, payload).
        The shard's originator chose its chunk size; every message of the shard carries it."""
        if not self.plan.chunks(shard):
            return
        hdr, payload = await self._recv(phase, step, 0)
        grow = hdr.get("k", 1)
        if type(grow) is not int or grow not in GROWS:
            raise CollectiveError(f"peer {self.prev[:8]} sent a chunk multiplier {grow!r} outside {GROWS}")
        for c, (a, b) in enumerate(self.plan.chunks(shard, grow)):
            if c:
                hdr, payload = await self._recv(phase, step, c)
                if hdr.get("k", 1) != grow:
                    raise CollectiveError(f"peer {self.prev[:8]} changed the chunk size within a shard")
            meta = hdr.get("m")
            if not isinstance(meta, dict) or meta.get("numel") != b - a:
                raise CollectiveError(f"peer {self.prev[:8]} sent a chunk of the wrong size")
            yield c, a, b, hdr, payload

    async def _recv(self, phase: str, step: int, chunk: int) -> tuple[dict, bytes]:
        loop = asyncio.get_running_loop()
        timeout = self.deadline - loop.time()
        if self.heard_prev:  # after the first message, silence longer than a few chunk times = stall
            timeout = min(timeout, self.stall_s)
        hdr, payload = await self.host.recv(self.prev, self._tag(phase, step, chunk), timeout=max(0.01, timeout))
        self.heard_prev = True
        self.arrivals.append((loop.time(), len(payload)))
        if not isinstance(hdr, dict) or hdr.get("l") != self.keys["l"]:
            raise CollectiveError(f"peer {self.prev[:8]} joined {self.prefix!r} with different tensors, "
                                  "codec or op (inputs must match on every peer)")
        if hdr.get("g") != self.keys["g"]:
            raise CollectiveAborted(f"peer {self.prev[:8]} has another membership view")
        return hdr, payload

    def _reduce(self, meta: dict, payload, a: int, b: int) -> torch.Tensor:
        return self.codec.decode(meta, payload, device=self.flat.device, add=self.flat[a:b],
                                 out=self._payload_as_result(meta, payload, b - a))

    def _payload_as_result(self, meta: dict, payload, numel: int) -> torch.Tensor | None:
        """A received payload (a bytearray this peer owns) as the fp32 tensor to reduce into,
        where the codec decodes in place: no fresh temporary per chunk and one pass less."""
        if (not self.codec.decodes_in_place or meta.get("zstd") or self.flat.device.type != "cpu"
                or not isinstance(payload, bytearray) or numel == 0 or len(payload) != 4 * numel):
            return None
        return torch.frombuffer(payload, dtype=torch.float32)

    def _finish(self, meta: dict, payload, a: int, b: int):
        acc = self._reduce(meta, payload, a, b)
        if self.mean:
            acc.div_(self.n)
        if not self.gather:
            return acc, None, None
        out_meta, out = self.codec.encode(acc, share=True)  # acc is ours and no longer changes
        return acc, out_meta, out

    def _place(self, meta: dict, payload, a: int, b: int) -> None:
        self.codec.decode(meta, payload, device=self.flat.device, out=self.result[a:b])

    async def _decoder(self, queue: asyncio.Queue) -> None:
        """Decode all-gather chunks into the result in arrival order, off the forwarding path:
        a chunk's bytes go on to the next peer as soon as they arrive, not after the decode of
        the chunk before (on a loaded machine that decode can outlast the ring's slack)."""
        while (item := await queue.get()) is not None:
            meta, payload, a, b = item
            await compute(lambda: self._place(meta, payload, a, b), b - a)

    async def run(self) -> torch.Tensor:
        sender = Sender(self.host, self.next, self.send_s, self.rate_Bps)

        async def feed() -> None:
            try:
                await asyncio.gather(self._produce(sender), self._consume(sender))
            finally:
                sender.close()

        send_task = asyncio.get_running_loop().create_task(sender.run())
        try:
            await asyncio.gather(feed(), send_task)
        finally:
            send_task.cancel()
        self._observe()
        return self.result if self.gather else self.shard

    def _observe(self) -> None:
        """Bytes after the first arrival over the time they took: a lower bound on the link's
        rate (upstream compute can only stretch the gaps), which errs towards longer deadlines.
        Paced runs say nothing about the link."""
        if len(self.arrivals) > 2 and not self.rate_Bps:
            nbytes = sum(b for _, b in self.arrivals[1:])
            observe_bandwidth(self.host, self.prev, nbytes, self.arrivals[-1][0] - self.arrivals[0][0])

    async def _produce(self, sender: Sender) -> None:
        """Reduce-scatter step 0: encode and send this peer's own shard."""
        for c, (a, b) in enumerate(self.plan.chunks(self.rank, self.grow)):
            # inputs do not change while the call runs and each payload is sealed (copied) when sent
            meta, payload = await compute(lambda a=a, b=b: self.codec.encode(self.flat[a:b], share=True), b - a)
            sender.put((_RS, 0, c), self._tag("rs", 0, c), {**self.keys, "m": meta, "k": self.grow}, payload)

    async def _consume(self, sender: Sender) -> None:
        n, r = self.n, self.rank
        parts: list[torch.Tensor] = []
        decodes: asyncio.Queue = asyncio.Queue()
        decoder = asyncio.get_running_loop().create_task(self._decoder(decodes)) if self.gather else None
        try:
            for s in range(n - 1):
                async for c, a, b, hdr, payload in self._recv_shard("rs", s, (r - s - 1) % n):
                    if s < n - 2:
                        meta, out = await compute(
                            lambda: self.codec.encode(self._reduce(hdr["m"], payload, a, b), share=True), b - a)
                        sender.put((_RS, s + 1, c), self._tag("rs", s + 1, c),
                                   {**self.keys, "m": meta, "k": hdr.get("k", 1)}, out)
                        continue
                    acc, meta, out = await compute(lambda: self._finish(hdr["m"], payload, a, b), b - a)
                    if decoder is None:
                        parts.append(acc)
                        continue
                    sender.put((_AG, 0, c), self._tag("ag", 0, c), {**self.keys, "m": meta, "k": hdr.get("k", 1)},
                               out)
                    # The owner keeps exactly what everyone else will decode from these bytes.
                    decodes.put_nowait((meta, out, a, b))
            if decoder is None:
                self.shard = torch.cat(parts) if parts else self.flat.new_empty(0)
                return
            for s in range(n - 1):
                async for c, a, b, hdr, payload in self._recv_shard("ag", s, (r - s) % n):
                    if decoder.done():
                        decoder.result()  # a failed decode ends the attempt now
                    if s < n - 2:  # forward the owner's bytes verbatim before decoding them ourselves
                        sender.put((_AG, s + 1, c), self._tag("ag", s + 1, c), hdr, payload)
                    decodes.put_nowait((hdr["m"], payload, a, b))
            decodes.put_nowait(None)
            await decoder
        finally:
            if decoder is not None and not decoder.done():
                decoder.cancel()
