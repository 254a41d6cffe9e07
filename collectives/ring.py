"""Pipelined ring reduce-scatter + all-gather over one flat fp32 vector (DESIGN.md section 3).

The vector is cut into one shard per member (balanced, aligned to the codec block) and each
shard into chunks of at most ``chunk_bytes`` on the wire (see ``RingPlan.make``). Ring
position r sends shard r-s at reduce-scatter step s and receives shard r-s-1, so after n-1
steps it owns shard r+1, fully reduced. Per hop the running partial sum is decoded, accumulated in fp32 with the local values
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
_INLINE_NUMEL = 1 << 17         # smaller work runs inline: a thread hop costs more than it saves
                                # (a 256 KiB fp32 chunk: loopback 100 MB fp32 1.08 -> 0.84 s)
_RS, _AG, _END = 0, 1, 2        # send-priority phases


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

    def chunks(self, shard: int) -> list[tuple[int, int]]:
        a, b = self.bounds[shard]
        return [(s, min(s + self.chunk, b)) for s in range(a, b, self.chunk)]


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
        self.queue.put_nowait(((_END, 0, 0), next(self.seq), None))

    async def _pace(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at = max(self._next_at, now) + nbytes / self.rate_Bps

    async def _send(self, tag: str, header: dict, payload) -> None:
        try:
            await asyncio.wait_for(self.host.send(self.peer, tag, header, payload, lane=0), self.timeout_s)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"send to {self.peer[:8]} stalled for {self.timeout_s:.1f}s") from None

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
                    done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                inflight.add(asyncio.get_running_loop().create_task(self._send(*item)))
            await asyncio.gather(*inflight)
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
        chunk_wire = codec.wire_bytes(plan.chunk)
        window = send_window(host)
        self.stall_s = policy.stall_s(host, self.prev, chunk_wire * window, 4 * plan.chunk * 3)
        self.send_s = policy.stall_s(host, self.next, chunk_wire * window, 4 * plan.chunk * 3)
        # Paced (pace_s > 0): this peer's sends spread over about pace_s seconds, so a neighbour
        # may also be silent for the pacing gap of a window of chunks.
        sent = codec.wire_bytes(flat.numel()) * (self.n - 1) / self.n * (2 if gather else 1)
        self.rate_Bps = sent / pace_s if pace_s > 0 and sent > 0 else None
        if self.rate_Bps:
            self.stall_s += 2 * chunk_wire * window / self.rate_Bps
        self.keys = {"g": fingerprint(members), "l": layout_key}
        self.result = torch.empty_like(flat) if gather else None
        self.shard: torch.Tensor | None = None
        self.heard_prev = False
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes) of messages from prev

    def _tag(self, phase: str, step: int, chunk: int) -> str:
        return f"{self.prefix}{phase}|{step}|{chunk}"

    async def _recv(self, phase: str, step: int, chunk: int, numel: int) -> tuple[dict, bytes]:
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
        meta = hdr.get("m")
        if not isinstance(meta, dict) or meta.get("numel") != numel:
            raise CollectiveError(f"peer {self.prev[:8]} sent a chunk of the wrong size")
        return hdr, payload

    def _reduce(self, meta: dict, payload, a: int, b: int) -> torch.Tensor:
        acc = self.codec.decode(meta, payload, device=self.flat.device)
        return acc.add_(self.flat[a:b])

    def _finish(self, meta: dict, payload, a: int, b: int):
        acc = self._reduce(meta, payload, a, b)
        if self.mean:
            acc.div_(self.n)
        if not self.gather:
            return acc, None, None
        out_meta, out = self.codec.encode(acc)
        return acc, out_meta, out

    def _place(self, meta: dict, payload, a: int, b: int) -> None:
        self.result[a:b] = self.codec.decode(meta, payload, device=self.flat.device)

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
        for c, (a, b) in enumerate(self.plan.chunks(self.rank)):
            meta, payload = await compute(lambda a=a, b=b: self.codec.encode(self.flat[a:b]), b - a)
            sender.put((_RS, 0, c), self._tag("rs", 0, c), {**self.keys, "m": meta}, payload)

    async def _consume(self, sender: Sender) -> None:
        n, r = self.n, self.rank
        parts: list[torch.Tensor] = []
        decodes: asyncio.Queue = asyncio.Queue()
        decoder = asyncio.get_running_loop().create_task(self._decoder(decodes)) if self.gather else None
        try:
            for s in range(n - 1):
                for c, (a, b) in enumerate(self.plan.chunks((r - s - 1) % n)):
                    hdr, payload = await self._recv("rs", s, c, b - a)
                    if s < n - 2:
                        meta, out = await compute(lambda: self.codec.encode(self._reduce(hdr["m"], payload, a, b)),
                                                  b - a)
                        sender.put((_RS, s + 1, c), self._tag("rs", s + 1, c), {**self.keys, "m": meta}, out)
                        continue
                    acc, meta, out = await compute(lambda: self._finish(hdr["m"], payload, a, b), b - a)
                    if decoder is None:
                        parts.append(acc)
                        continue
                    sender.put((_AG, 0, c), self._tag("ag", 0, c), {**self.keys, "m": meta}, out)
                    # The owner keeps exactly what everyone else will decode from these bytes.
                    decodes.put_nowait((meta, out, a, b))
            if decoder is None:
                self.shard = torch.cat(parts) if parts else self.flat.new_empty(0)
                return
            for s in range(n - 1):
                for c, (a, b) in enumerate(self.plan.chunks((r - s) % n)):
                    if decoder.done():
                        decoder.result()  # a failed decode ends the attempt now
                    hdr, payload = await self._recv("ag", s, c, b - a)
                    if s < n - 2:  # forward the owner's bytes verbatim before decoding them ourselves
                        sender.put((_AG, s + 1, c), self._tag("ag", s + 1, c), hdr, payload)
                    decodes.put_nowait((hdr["m"], payload, a, b))
            decodes.put_nowait(None)
            await decoder
        finally:
            if decoder is not None and not decoder.done():
                decoder.cancel()
