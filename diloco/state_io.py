"""The global training state (fp32 params and outer momenta) in the content-addressed blob format
of ``peer.blobs``: the same manifest + sha256 chunks serve checkpoints on the coordinator and
state snapshots streamed peer to peer, and every chunk is verified against its name on arrival.

Tensor names: parameters keep the model's names (so ``coordinator checkpoints export`` finds
them); momenta are stored as ``MOMENTUM_PREFIX + name``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from peer.blobs import CHUNK_SIZE, Manifest, ManifestError, TensorEntry, sha256_hex, split_chunks

from .errors import StateError

MOMENTUM_PREFIX = "outer_momentum."
_DTYPE = "F32"  # the global state is fp32 by construction (docs/architecture.md §DiLoCo rules)


def global_tensors(snapshot: dict[str, Any]) -> dict[str, Tensor]:
    """Flat name -> tensor view of a trainer snapshot's global params and momenta."""
    glob = snapshot["global"]
    return {**glob["params"], **{MOMENTUM_PREFIX + n: t for n, t in glob["momenta"].items()}}


def snapshot_from_tensors(tensors: dict[str, Tensor], outer_step: int,
                          kind: str = "DiLoCo") -> dict[str, Any]:
    """Inverse of ``global_tensors`` for a blocking-mode DiLoCo trainer's ``load_snapshot``."""
    params = {n: t for n, t in tensors.items() if not n.startswith(MOMENTUM_PREFIX)}
    momenta = {n[len(MOMENTUM_PREFIX):]: t for n, t in tensors.items()
               if n.startswith(MOMENTUM_PREFIX)}
    return {"kind": kind, "global": {"params": params, "momenta": momenta},
            "outer_step": outer_step, "mode": "blocking", "pending": None}


def build_manifest(run: str, step: int, tensors: dict[str, Tensor], *, config: dict | None = None,
                   meta: dict | None = None,
                   chunk_size: int = CHUNK_SIZE) -> tuple[Manifest, dict[str, memoryview]]:
    """The manifest of ``tensors`` (fp32, any device) and its distinct chunks by sha256."""
    entries: list[TensorEntry] = []
    chunks: dict[str, memoryview] = {}
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise StateError(f"state tensor {name} is {t.dtype}; the global state is fp32")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        buf = memoryview(flat.numpy()).cast("B") if flat.numel() else memoryview(b"")
        pieces = split_chunks(buf, chunk_size)
        for sha, piece in pieces:
            chunks.setdefault(sha, piece)
        entries.append(TensorEntry(name, _DTYPE, tuple(t.shape), tuple(s for s, _ in pieces),
                                   len(buf)))
    return Manifest.build(run, step, entries, config, meta), chunks


def tensors_from_chunks(manifest: Manifest, get_chunk: Callable[[str], bytes]) -> dict[str, Tensor]:
    """Rebuild the tensors of ``manifest``; ``get_chunk(sha)`` supplies bytes, which are checked
    against their sha256 (StateError on a mismatch or a wrong total size)."""
    out: dict[str, Tensor] = {}
    for e in manifest.tensors:
        if e.dtype != _DTYPE:
            raise StateError(f"state tensor {e.name} has dtype {e.dtype}, expected {_DTYPE}")
        buf = bytearray(e.nbytes)
        off = 0
        for sha in e.chunks:
            data = get_chunk(sha)
            if sha256_hex(data) != sha:
                raise StateError(f"chunk {sha[:12]} of {e.name} does not match its hash")
            if off + len(data) > e.nbytes:
                raise StateError(f"tensor {e.name}: chunks exceed its {e.nbytes} bytes")
            buf[off:off + len(data)] = data
            off += len(data)
        if off != e.nbytes:
            raise StateError(f"tensor {e.name}: chunks hold {off} of its {e.nbytes} bytes")
        out[e.name] = torch.from_numpy(np.frombuffer(buf, dtype=np.float32).copy()).reshape(e.shape)
    return out


def pack(manifest: Manifest, chunks: dict[str, memoryview]) -> bytes:
    """One payload for a peer-to-peer snapshot: every tensor's chunks in manifest order."""
    return b"".join(chunks[sha] for e in manifest.tensors for sha in e.chunks)


def unpack(manifest_dict: Any, payload: bytes | bytearray | memoryview,
           chunk_size: int) -> tuple[Manifest, dict[str, Tensor]]:
    """Inverse of ``pack`` (``chunk_size`` as given to ``build_manifest``): validate the
    manifest, then cut the payload into its chunks and verify each."""
    try:
        manifest = Manifest.from_dict(manifest_dict)
    except ManifestError as e:
        raise StateError(f"snapshot manifest is invalid: {e}") from e
    total = sum(e.nbytes for e in manifest.tensors)
    if total != len(payload):
        raise StateError(f"snapshot payload has {len(payload)} bytes, manifest says {total}")
    view = memoryview(payload)
    lookup: dict[str, bytes] = {}
    start = 0
    for e in manifest.tensors:
        for i, sha in enumerate(e.chunks):
            a = start + i * chunk_size
            lookup.setdefault(sha, bytes(view[a:min(start + e.nbytes, a + chunk_size)]))
        start += e.nbytes
    return manifest, tensors_from_chunks(manifest, lookup.__getitem__)
