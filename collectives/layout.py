"""Tensor lists <-> one flat buffer ("bucketing"), plus the small specs that travel in headers.

A collective works on one contiguous fp32 vector so it can cut it into shards and chunks that
ignore tensor boundaries; ``Layout`` remembers each tensor's shape, dtype and device so the
result comes back as new tensors exactly like the inputs. Specs are (dtype name, shape) pairs:
small msgpack-able metadata, never the tensor data itself (docs/architecture.md §Wire layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import CollectiveError

# Floating dtypes a reducing collective accepts; raw transfers (codec=None) take any of _DTYPES.
_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    *_FLOAT_DTYPES, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CollectiveError(f"unsupported tensor dtype {dtype}; supported: {sorted(_DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CollectiveError(f"peer sent unknown dtype {name!r}") from None


@dataclass(frozen=True)
class Layout:
    """Shapes, dtypes and devices of a tensor list, and where each lies in the flat buffer."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def specs(self) -> list[list]:
        """Header-sized description: [[dtype name, [dims...]], ...]."""
        return [[dtype_name(d), list(s)] for d, s in zip(self.dtypes, self.shapes)]

    @classmethod
    def from_specs(cls, specs: object, device: torch.device | str) -> "Layout":
        if not isinstance(specs, list):
            raise CollectiveError("peer sent malformed tensor specs")
        shapes, dtypes = [], []
        for spec in specs:
            if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)
                    and all(isinstance(d, int) and d >= 0 for d in spec[1])):
                raise CollectiveError(f"peer sent malformed tensor spec {spec!r}")
            dtypes.append(dtype_from_name(spec[0]))
            shapes.append(tuple(spec[1]))
        dev = torch.device(device)
        return cls(tuple(shapes), tuple(dtypes), tuple(dev for _ in shapes))

    def key(self) -> int:
        """Stable fingerprint (shapes + dtypes) so peers can detect mismatched inputs."""
        return fingerprint(self.specs())


def fingerprint(obj: object) -> int:
    """48-bit FNV-1a of repr(obj): a small header field that agrees across processes
    (unlike hash(), which is salted per process)."""
    h = 0xCBF29CE484222325
    for b in repr(obj).encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 16


def layout_of(tensors: list[torch.Tensor], *, floating: bool) -> Layout:
    """Layout of ``tensors``; ``floating`` (a codec will quantize them) rejects integer dtypes."""
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise CollectiveError("tensors must be a list of torch.Tensor")
    for t in tensors:
        dtype_name(t.dtype)
        if floating and t.dtype not in _FLOAT_DTYPES:
            raise CollectiveError(f"codecs and reductions need floating tensors, got {t.dtype} "
                                  "(codec=None moves exact raw bytes of any dtype)")
    return Layout(tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors),
                  tuple(t.device for t in tensors))


def flatten(tensors: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """One new fp32 vector holding every tensor (on ``device``, default the first tensor's)."""
    dev = device or (tensors[0].device if tensors else torch.device("cpu"))
    if not tensors:
        return torch.empty(0, dtype=torch.float32, device=dev)
    return torch.cat([t.detach().reshape(-1).to(dev, torch.float32) for t in tensors])


def unflatten(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """New tensors with the layout's shapes/dtypes/devices, cut from a flat vector."""
    out, pos = [], 0
    for shape, dtype, device, n in zip(layout.shapes, layout.dtypes, layout.devices, layout.numels):
        out.append(flat[pos:pos + n].to(device=device, dtype=dtype, copy=True).reshape(shape))
        pos += n
    return out


def to_raw(tensors: list[torch.Tensor]) -> bytes:
    """Exact bytes of every tensor, concatenated (any dtype, for codec-free transfers)."""
    return b"".join(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
                    for t in tensors)


def from_raw(payload: bytes | memoryview, layout: Layout) -> list[torch.Tensor]:
    sizes = [n * torch.empty(0, dtype=d).element_size() for n, d in zip(layout.numels, layout.dtypes)]
    if sum(sizes) != len(payload):
        raise CollectiveError(f"raw payload has {len(payload)} bytes, specs need {sum(sizes)}")
    buf = bytearray(payload)
    out, pos = [], 0
    for size, shape, dtype, device in zip(sizes, layout.shapes, layout.dtypes, layout.devices):
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=size, offset=pos) if size else \
            torch.empty(0, dtype=torch.uint8)
        out.append(raw.clone().view(dtype).reshape(shape).to(device))
        pos += size
    return out
