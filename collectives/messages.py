"""Tensor-list messages between two peers: specs + codec meta in the header, raw bytes as payload.

A large message goes as two frames on one logical tag: a tiny announcement first (specs and the
payload size), then the payload. The receiver learns the size before the bulk arrives, so its
deadline is derived from that size and the measured link, never guessed. Small messages (the
latency-bound case) travel as one frame.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from compression import Codec, CodecError

from .deadline import DeadlinePolicy
from .errors import CollectiveError
from .layout import Layout, flatten, from_raw, layout_of, to_raw, unflatten
from .ring import compute, resolve_codec

INLINE_BYTES = 64 * 1024


@dataclass
class Packed:
    """An encoded tensor list: ``header`` (specs, codec meta) and its payload bytes."""

    header: dict[str, Any]
    payload: Any

    @property
    def nbytes(self) -> int:
        return memoryview(self.payload).nbytes


async def pack(tensors: list[torch.Tensor], codec: Codec | None) -> Packed:
    """codec=None sends exact raw bytes (any dtype); otherwise one flat fp32 vector, encoded."""
    layout = layout_of(tensors, floating=codec is not None)
    if codec is None:
        return Packed({"s": layout.specs()}, to_raw(tensors))
    meta, payload = await compute(lambda: codec.encode(flatten(tensors)), layout.numel)
    return Packed({"s": layout.specs(), "m": meta}, payload)


def codec_for(header: dict, codec: Codec | None) -> Codec | None:
    """The codec that decodes ``header``: the caller's, else the one named in the meta."""
    meta = header.get("m")
    if meta is None:
        return None
    if codec is not None:
        return codec
    if not isinstance(meta, dict) or not isinstance(meta.get("codec"), str):
        raise CollectiveError("peer sent malformed codec meta")
    return resolve_codec(meta["codec"])


async def unpack(packed: Packed, device: torch.device | str, codec: Codec | None = None) -> list[torch.Tensor]:
    """Decode to new tensors with the sender's shapes and dtypes, on ``device``."""
    layout = Layout.from_specs(packed.header.get("s"), device)
    cod = codec_for(packed.header, codec)
    if cod is None:
        return from_raw(packed.payload, layout)
    meta = packed.header["m"]
    if not isinstance(meta, dict) or meta.get("numel") != layout.numel:
        raise CollectiveError("peer sent codec meta that does not match its tensor specs")
    try:
        flat = await compute(lambda: cod.decode(meta, packed.payload, device=device), layout.numel)
    except CodecError as exc:
        raise CollectiveError(f"undecodable tensors from peer: {exc}") from exc
    return unflatten(flat, layout)


async def send_packed(host, peer: str, tag: str, packed: Packed, timeout: float) -> None:
    """Send within ``timeout`` seconds (raises TimeoutError); tag is the logical message tag."""
    async def go() -> None:
        if packed.nbytes <= INLINE_BYTES:
            await host.send(peer, tag + "|h", {**packed.header, "i": 1}, packed.payload)
            return
        await host.send(peer, tag + "|h", {"s": packed.header["s"], "n": packed.nbytes}, b"")
        await host.send(peer, tag + "|p", {k: v for k, v in packed.header.items() if k != "s"}, packed.payload)
    await asyncio.wait_for(go(), timeout)


async def recv_packed(host, peer: str, tag: str, timeout: float, policy: DeadlinePolicy) -> Packed:
    """Receive one message: the announcement within ``timeout``, then the payload within a
    deadline derived from its announced size and the measured link."""
    hdr, payload = await host.recv(peer, tag + "|h", timeout=max(0.01, timeout))
    if not isinstance(hdr, dict):
        raise CollectiveError(f"peer {peer[:8]} sent a malformed header")
    if hdr.get("i"):
        return Packed({k: v for k, v in hdr.items() if k != "i"}, payload)
    size = hdr.get("n")
    if type(size) is not int or size < 0:
        raise CollectiveError(f"peer {peer[:8]} announced a malformed size {size!r}")
    wait = policy.operation_s(host, [peer], wire_bytes=size, rounds=1, compute_bytes=size)
    body_hdr, payload = await host.recv(peer, tag + "|p", timeout=wait)
    if not isinstance(body_hdr, dict) or memoryview(payload).nbytes != size:
        raise CollectiveError(f"peer {peer[:8]} sent {memoryview(payload).nbytes} bytes, announced {size}")
    return Packed({"s": hdr.get("s"), **body_hdr}, payload)
