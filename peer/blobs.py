"""Content-addressed blobs: the torch-free chunk and manifest format that checkpoint writers
(diloco/) and the checkpoint store (coordinator/) share.

A state is a set of named tensors. Each tensor's raw little-endian bytes are cut into chunks of
at most ``CHUNK_SIZE`` bytes, each named by its sha256 (64 lowercase hex). A ``Manifest`` lists,
per tensor, its dtype (safetensors names), shape and chunk hashes, plus a ``state_hash`` over all
of that, so a manifest names one exact state and every chunk can be verified against its name.
Why content addressing: transfers resume by asking which hashes the other side lacks, corrupt
copies are caught on read, and tensors that did not change between steps are stored once.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # upper bound an HTTP route should enforce on a chunk body
MANIFEST_FORMAT = "lowband-checkpoint/1"

_SHA_RE = re.compile(r"[0-9a-f]{64}\Z")
_RUN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_MAX_STEP = 10**12 - 1

# safetensors dtype names -> bytes per element (the byte layout is little-endian, as torch uses).
DTYPE_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                  "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class BlobError(Exception):
    """Base of the errors of the blob format (and of coordinator.checkpoints, which reuses it)."""


class InvalidName(BlobError, ValueError):
    """A run name, step, chunk hash or storage key that is not allowed (e.g. path traversal)."""


class ManifestError(BlobError):
    """A manifest that is malformed or inconsistent with its run, step or hash."""


def check_sha(sha: object) -> str:
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise InvalidName(f"not a sha256 hex digest: {sha!r}")
    return sha


def check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
        raise InvalidName(f"step must be an int in [0, {_MAX_STEP}], got {step!r}")
    return step


def check_run(run: object) -> str:
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise InvalidName(f"run name must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}, got {run!r}")
    return run


def sha256_hex(data: bytes | memoryview | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def split_chunks(data: bytes | bytearray | memoryview,
                 chunk_size: int = CHUNK_SIZE) -> list[tuple[str, memoryview]]:
    """``data`` cut into consecutive pieces of at most ``chunk_size`` bytes, each with its sha256
    (views into ``data``, no copies). Empty data has no chunks."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_BYTES}]")
    view = memoryview(data).cast("B")
    return [(sha256_hex(view[off:off + chunk_size]), view[off:off + chunk_size])
            for off in range(0, len(view), chunk_size)]


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name, a key of DTYPE_ITEMSIZE
    shape: tuple[int, ...]
    chunks: tuple[str, ...]  # sha256 of each chunk, in order; their concatenation is the tensor
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    run: str
    step: int
    created: float
    state_hash: str  # hash of every tensor's name, dtype, shape and chunk hashes (see state_hash)
    tensors: tuple[TensorEntry, ...]
    config: dict
    meta: dict

    @classmethod
    def build(cls, run: str, step: int, tensors: Sequence[TensorEntry],
              config: Mapping | None = None, meta: Mapping | None = None) -> Manifest:
        m = cls(check_run(run), check_step(step), time.time(), state_hash(tensors),
                tuple(tensors), dict(config or {}), dict(meta or {}))
        m.to_json()  # fail here, not at upload time, if config/meta are not JSON
        return m

    def chunk_shas(self) -> list[str]:
        """Distinct chunk hashes in first-use order."""
        return list(dict.fromkeys(s for t in self.tensors for s in t.chunks))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT, "run": self.run, "step": self.step, "created": self.created,
            "state_hash": self.state_hash, "config": self.config, "meta": self.meta,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                         "chunks": list(t.chunks), "nbytes": t.nbytes} for t in self.tensors],
        }

    def to_json(self) -> bytes:
        try:
            return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ManifestError(f"config/meta must be JSON-serialisable: {e}") from e

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        try:
            if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
                raise ManifestError(f"not a {MANIFEST_FORMAT} manifest")
            tensors = tuple(_entry_from_dict(t) for t in d["tensors"])
            if not isinstance(d["config"], dict) or not isinstance(d["meta"], dict):
                raise ManifestError("config and meta must be objects")
            m = cls(check_run(d["run"]), check_step(d["step"]), float(d["created"]),
                    check_sha(d["state_hash"]), tensors, d["config"], d["meta"])
        except (KeyError, TypeError, ValueError) as e:  # InvalidName is a ValueError too
            raise ManifestError(f"malformed manifest: {e!r}") from e
        if len({t.name for t in tensors}) != len(tensors):
            raise ManifestError("duplicate tensor names in manifest")
        if state_hash(tensors) != m.state_hash:
            raise ManifestError(f"manifest for step {m.step}: state hash does not match its tensors")
        return m

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest is not JSON: {e}") from e
        return cls.from_dict(d)


def _entry_from_dict(t: dict) -> TensorEntry:
    name, dtype = t["name"], t["dtype"]
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ManifestError(f"bad tensor name {name!r}")
    if dtype not in DTYPE_ITEMSIZE:
        raise ManifestError(f"tensor {name}: unknown dtype {dtype!r}")
    shape = tuple(t["shape"])
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ManifestError(f"tensor {name}: bad shape {shape!r}")
    nbytes = t["nbytes"]
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes != math.prod(shape) * DTYPE_ITEMSIZE[dtype]:
        raise ManifestError(f"tensor {name}: nbytes {nbytes!r} does not match {dtype}{list(shape)}")
    chunks = tuple(check_sha(s) for s in t["chunks"])
    # no chunk exceeds MAX_CHUNK_BYTES, so a larger claim is a lie (and a loader would allocate it)
    if nbytes > len(chunks) * MAX_CHUNK_BYTES:
        raise ManifestError(f"tensor {name}: {len(chunks)} chunks cannot hold {nbytes} bytes")
    return TensorEntry(name, dtype, shape, chunks, nbytes)


def state_hash(tensors: Iterable[TensorEntry]) -> str:
    """Identity of a global state: equal iff every tensor is bit-identical (order-independent)."""
    rows = sorted([t.name, t.dtype, list(t.shape), list(t.chunks)] for t in tensors)
    return sha256_hex(json.dumps(rows, separators=(",", ":")).encode())
