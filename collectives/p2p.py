"""Point-to-point and small-group collectives: send/recv, broadcast, all-gather, star all-reduce.

Bit parity as in the ring (docs/architecture.md §Bit parity): whoever produces a value quantizes it once, the
bytes are forwarded verbatim, and the producer keeps decode(encode(x)) itself, so every peer
returns identical tensors. ``codec=None`` (the default here) moves exact raw bytes of any dtype.
"""
from __future__ import annotations

import asyncio
from typing import Any

import torch

from compression import Codec

from .allreduce import Reduced
from .deadline import DeadlinePolicy
from .errors import CollectiveError
from .fault import attempt_prefix, run_resilient, validate_tag
from .group import Group
from .layout import flatten, layout_of, unflatten
from .messages import Packed, pack, recv_packed, send_packed, unpack
from .ring import resolve_codec

_DEFAULT_POLICY = DeadlinePolicy()


def _codec(codec: str | Codec | None, options: dict[str, Any]) -> Codec | None:
    return None if codec is None else resolve_codec(codec, **options)


async def send_tensors(host, peer: str, tensors: list[torch.Tensor], *, tag: str,
                       codec: str | Codec | None = None, timeout: float | None = None,
                       policy: DeadlinePolicy = _DEFAULT_POLICY, **codec_options: Any) -> None:
    """Send a tensor list to one peer (pair with ``recv_tensors`` on the same tag).
    Default deadline: derived from the payload size and the measured link."""
    packed = await pack(tensors, _codec(codec, codec_options))
    if timeout is None:
        timeout = policy.operation_s(host, [peer], wire_bytes=packed.nbytes, rounds=1)
    await send_packed(host, peer, attempt_prefix("p2p", validate_tag(tag), 0), packed, timeout)


async def recv_tensors(host, peer: str, *, tag: str, device: torch.device | str = "cpu",
                       codec: Codec | None = None, timeout: float | None = None,
                       policy: DeadlinePolicy = _DEFAULT_POLICY) -> list[torch.Tensor]:
    """Receive a tensor list sent by ``send_tensors``; new tensors with the sender's shapes and
    dtypes on ``device``. ``timeout`` bounds the wait for the sender to start (default: the
    policy's floor plus round trips); the bulk then gets a deadline derived from its size.
    Pass ``codec`` only for a codec built with non-default options."""
    if timeout is None:
        timeout = policy.operation_s(host, [peer], wire_bytes=0, rounds=1)
    packed = await recv_packed(host, peer, attempt_prefix("p2p", validate_tag(tag), 0), timeout, policy)
    return await unpack(packed, device, codec)


async def broadcast(group: Group, tensors: list[torch.Tensor] | None, *, root: str, tag: str,
                    codec: str | Codec | None = None, device: torch.device | str | None = None,
                    timeout: float | None = None, **codec_options: Any) -> list[torch.Tensor]:
    """``root`` sends its tensors to every member (non-roots pass ``tensors=None``). All return
    identical tensors: decode(encode(root's tensors)). Results land on ``device`` (default: the
    root's input device on the root, cpu elsewhere). A dead non-root is dropped and the rest retried; a dead root is an error."""
    me = group.self_id
    cod = _codec(codec, codec_options)
    if root not in group.members:
        raise CollectiveError(f"broadcast root {root[:8]} is not a group member")
    if me == root and tensors is None:
        raise CollectiveError("the broadcast root must pass its tensors")
    packed = await pack(tensors, cod) if me == root else None
    out_device = device if device is not None else (tensors[0].device if tensors else "cpu")

    def deadline_s(members: list[str]) -> float:
        size = packed.nbytes if packed is not None else 0
        return group.policy.operation_s(group.host, [m for m in members if m != me],
                                        wire_bytes=size * (len(members) - 1), rounds=2)

    async def body(members: list[str], prefix: str, deadline: float) -> list[torch.Tensor]:
        if root not in members:
            raise CollectiveError(f"broadcast {tag!r}: root {root[:8]} is gone")
        remaining = deadline - asyncio.get_running_loop().time()
        if me != root:
            got = await recv_packed(group.host, root, prefix + "b", remaining, group.policy)
            return await unpack(got, out_device, cod)
        await asyncio.gather(*(send_packed(group.host, m, prefix + "b", packed, remaining)
                               for m in members if m != me))
        return await unpack(packed, out_device, cod)

    return await run_resilient(group, "bc", tag, body, deadline_s, timeout)


async def all_gather(group: Group, tensors: list[torch.Tensor], *, tag: str,
                     codec: str | Codec | None = None, timeout: float | None = None,
                     **codec_options: Any) -> dict[str, list[torch.Tensor]]:
    """Every member contributes a tensor list (lists may differ between peers); every member
    gets all of them, keyed by peer id, identical everywhere. Ring: each contribution is encoded
    once by its owner and forwarded verbatim n-1 times."""
    me = group.self_id
    cod = _codec(codec, codec_options)
    own = await pack(tensors, cod)
    device = tensors[0].device if tensors else torch.device("cpu")

    def deadline_s(members: list[str]) -> float:
        n = len(members)
        return group.policy.operation_s(group.host, [m for m in members if m != me],
                                        wire_bytes=own.nbytes * (n - 1), rounds=n, compute_bytes=own.nbytes * n)

    async def body(members: list[str], prefix: str, deadline: float) -> dict[str, list[torch.Tensor]]:
        n, r = len(members), members.index(me)
        prev, nxt = members[(r - 1) % n], members[(r + 1) % n]
        items: dict[str, Packed] = {me: own}
        loop = asyncio.get_running_loop()
        for s in range(n - 1):
            send = send_packed(group.host, nxt, f"{prefix}g|{s}", items[members[(r - s) % n]],
                               deadline - loop.time())
            recv = recv_packed(group.host, prev, f"{prefix}g|{s}", deadline - loop.time(), group.policy)
            _, got = await asyncio.gather(send, recv)
            items[members[(r - s - 1) % n]] = got
        return {m: await unpack(items[m], device, cod) for m in members}

    return await run_resilient(group, "ag", tag, body, deadline_s, timeout)


async def star_all_reduce(group: Group, tensors: list[torch.Tensor], *, tag: str,
                          codec: str | Codec | None = None, op: str = "sum", root: str | None = None,
                          timeout: float | None = None, **codec_options: Any) -> Reduced:
    """All-reduce for small, latency-bound tensors (tensor-split inference, TPI-LLM): two one-way
    hops instead of the ring's 2(n-1). Members send to the root (default: first member alive),
    which decodes, sums in fp32 in member order, quantizes the result once and sends it back.
    ``codec=None`` sends raw fp32 values (exact)."""
    if op not in ("mean", "sum"):
        raise CollectiveError(f"op must be 'mean' or 'sum', got {op!r}")
    me = group.self_id
    layout = layout_of(tensors, floating=True)
    cod = _codec(codec, codec_options)
    flat = flatten(tensors)
    mine = await pack([flat], cod)
    attempts = 0

    def deadline_s(members: list[str]) -> float:
        return group.policy.operation_s(group.host, [m for m in members if m != me],
                                        wire_bytes=mine.nbytes * len(members), rounds=2,
                                        compute_bytes=flat.numel() * 4 * len(members))

    async def body(members: list[str], prefix: str, deadline: float) -> tuple[torch.Tensor, list[str]]:
        nonlocal attempts
        attempts += 1
        loop = asyncio.get_running_loop()
        hub = root if root in members else members[0]
        if len(members) == 1:
            return flat, members
        if me != hub:
            await send_packed(group.host, hub, prefix + "up", mine, deadline - loop.time())
            got = await recv_packed(group.host, hub, prefix + "down", deadline - loop.time(), group.policy)
            return (await unpack(got, flat.device, cod))[0], members
        ups = await asyncio.gather(*(recv_packed(group.host, m, prefix + "up", deadline - loop.time(), group.policy)
                                     for m in members if m != me))
        parts = dict(zip([m for m in members if m != me], ups))
        total = torch.zeros_like(flat)
        for m in members:  # fixed order: the sum does not depend on arrival order
            part = flat if m == me else (await unpack(parts[m], flat.device, cod))[0]
            if part.shape != flat.shape:
                raise CollectiveError(f"peer {m[:8]} sent {part.numel()} values, expected {flat.numel()}")
            total += part
        if op == "mean":
            total /= len(members)
        out = await pack([total], cod)
        await asyncio.gather(*(send_packed(group.host, m, prefix + "down", out, deadline - loop.time())
                               for m in members if m != me))
        return (await unpack(out, flat.device, cod))[0], members

    reduced, members = await run_resilient(group, "star", tag, body, deadline_s, timeout)
    result = Reduced([t.detach().clone() for t in tensors] if len(members) == 1 else unflatten(reduced, layout))
    result.members, result.attempts = members, attempts
    return result
