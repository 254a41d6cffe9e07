"""The global training state (fp32 params and outer momenta) in the content-addressed blob format
of ``peer.blobs``: the same manifest + sha256 chunks serve checkpoints on the coordinator and
state snapshots streamed peer to peer, and every chunk is verified against its name on arrival.

Tensor names: parameters keep the model's names (so ``coordinator checkpoints export`` finds
them); momenta are stored as ``MOMENTUM_PREFIX + name``.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from peer.blobs import (CHUNK_SIZE, MAX_CHUNK_BYTES, Manifest, ManifestError, TensorEntry,
                        sha256_hex, split_chunks)

from .errors import StateError

MOMENTUM_PREFIX = "outer_momentum."
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest lists ~100 bytes per 4 MiB chunk
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


def parse_snapshot(run: str, header: Any, payload: Any) -> tuple[Manifest, dict[str, Tensor]]:
    """A donor's ``diloco.snapshot`` answer (header ``{manifest_bytes, chunk_size}``, payload =
    manifest JSON + ``pack``) -> (manifest, tensors). The donor is untrusted: every field is
    checked and anything malformed is a StateError, so the caller skips this donor. The tensors
    are verified against the manifest's chunk hashes only; whether they are the run's state is
    for the caller to check against the coordinator's agreed hash."""
    if not isinstance(header, dict):
        raise StateError(f"snapshot header is a {type(header).__name__}, not a map")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise StateError(f"snapshot payload is a {type(payload).__name__}, not bytes")
    view = memoryview(payload).cast("B")
    sizes = {}
    for key, hi in (("manifest_bytes", min(len(view), MAX_MANIFEST_BYTES)),
                    ("chunk_size", MAX_CHUNK_BYTES)):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise StateError(f"snapshot header field {key!r} must be an integer in [1, {hi}], "
                             f"got {value!r:.40}")
        sizes[key] = value
    n = sizes["manifest_bytes"]
    try:
        manifest_dict = json.loads(bytes(view[:n]))
    except ValueError as e:  # UnicodeDecodeError included
        raise StateError(f"snapshot manifest is not JSON: {e}") from None
    manifest, tensors = unpack(manifest_dict, view[n:], sizes["chunk_size"])
    if manifest.run != run:
        raise StateError(f"donor sent state of run {manifest.run}, not {run}")
    return manifest, tensors
