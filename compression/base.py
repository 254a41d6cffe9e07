"""The codec interface: tensor -> (small msgpack-able meta, bytes payload) -> float32 tensor.

Every codec does its arithmetic with vectorized torch ops on the input's device and makes one
`.cpu()` copy of the finished payload. Decoding uses elementwise ops only (no reductions), so the
same payload decodes to bit-identical float32 values on every machine (docs/architecture.md §Bit parity).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import CodecError
from .stage import payload_tensor, payload_view, zstd_compress, zstd_decompress

# Upper limit on `numel` accepted from metadata; together with the exact payload-length check this
# keeps a hostile header from making decode allocate more than a small multiple of the payload.
MAX_NUMEL = 1 << 40
_NATIVE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, kw_only=True)
class Codec(ABC):
    """Base of all codecs. `zstd=True` adds a lossless zstd stage after the codec; the payload then
    never exceeds `wire_bytes(numel)` because incompressible payloads are sent raw (meta["zstd"]
    says which)."""

    zstd: bool = False
    zstd_level: int = 3
    name: ClassVar[str]
    # decode(out=) may alias the payload (each value depends on the same-offset wire value only,
    # and the wire holds fp32): a receiver that owns the payload reduces into it, no temporary.
    decodes_in_place: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.zstd, bool):
            raise ValueError(f"{self.name}: zstd must be a bool, got {self.zstd!r}")
        if not isinstance(self.zstd_level, int) or not 1 <= self.zstd_level <= 22:
            raise ValueError(f"{self.name}: zstd_level must be an int in 1..22, got {self.zstd_level!r}")

    # -- interface -------------------------------------------------------------------------
    @abstractmethod
    def wire_bytes(self, numel: int) -> int:
        """Exact payload size in bytes for `numel` values (an upper bound when zstd=True)."""

    def error_bound(self, x: torch.Tensor) -> float:
        """Guaranteed max |decode(encode(x)) - x| for this input (formula in each codec's
        docstring); fp64 input adds max|x| * 2^-24 for its rounding to fp32."""
        x32 = self._check_input(x)
        cast = absmax(x) * 2.0**-24 if x.dtype == torch.float64 else 0.0
        return self._bound(x32) + cast if x32.numel() else 0.0

    @abstractmethod
    def _bound(self, x: torch.Tensor) -> float:
        """error_bound for a validated, non-empty input."""

    def encode(self, x: torch.Tensor, *, share: bool = False) -> tuple[dict[str, Any], memoryview | bytes]:
        """Encode a 1-D float tensor; returns (meta, payload). Raises CodecError for inputs the
        codec cannot represent (non-finite values, out of range).

        ``share``: the payload may be a view of x's own memory when the wire format is x's bytes
        (fp32 on fp32): the caller keeps x unchanged until the payload is consumed. Otherwise
        the payload never aliases x."""
        x = self._check_input(x)
        buf, extra = self._encode_shared(x) if share else self._encode(x)
        raw = payload_view(buf)
        meta = {"codec": self.name, "numel": x.numel(), **self._params(), **extra}
        if not self.zstd:
            return meta, raw
        payload, meta["zstd"] = zstd_compress(raw, self.zstd_level)
        return meta, payload

    def decode(self, meta: dict[str, Any], payload, device: torch.device | str = "cpu", *,
               out: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to a float32 1-D tensor on `device`. Raises CodecError when the meta does not
        match this codec or the payload's length does not match the meta.

        ``out``: write the values into this contiguous fp32 tensor of `numel` values (on `device`)
        and return it, instead of a new tensor (on CodecError its contents are undefined).
        ``add``: return decoded + add (fp32, `numel` values), bit for bit what
        ``decode(...).add_(add)`` gives, in the same cache-hot pass.
        ``out`` may be the payload's own memory (a writable fp32 payload, see
        :attr:`decodes_in_place`): the payload is then overwritten with the result.
        A collective's reduce step and its result buffer use both to avoid temporaries."""
        numel = self._check_meta(meta)
        expected = self.wire_bytes(numel)
        if meta.get("zstd", False):
            payload = zstd_decompress(payload, expected)
        raw = payload_tensor(payload, expected, device)
        for name, t in (("out", out), ("add", add)):
            if t is not None and (t.dtype != torch.float32 or t.shape != (numel,) or t.device != raw.device):
                raise ValueError(f"{self.name}.decode: {name} must be fp32 of shape ({numel},) on {raw.device}")
        if out is None:
            out = torch.empty(numel, device=raw.device)
        elif not out.is_contiguous():
            raise ValueError(f"{self.name}.decode: out must be contiguous")
        return self._decode(raw, numel, meta, out, add)

    # -- for subclasses ----------------------------------------------------------------------
    @abstractmethod
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """x (1-D, contiguous, on its device) -> (uint8 tensor of wire_bytes(numel) on x's device,
        per-payload meta entries)."""

    def _encode_shared(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """_encode, allowed to return a view of x (see encode's ``share``)."""
        return self._encode(x)

    @abstractmethod
    def _decode(self, raw: torch.Tensor, numel: int, meta: dict[str, Any], out: torch.Tensor,
                add: torch.Tensor | None) -> torch.Tensor:
        """uint8 tensor of exactly wire_bytes(numel) on the target device -> float32 values
        (+ `add` when given) written into `out` (contiguous, numel values), which it returns;
        `meta` has passed _check_meta (per-payload entries are the subclass's to check)."""

    def _params(self) -> dict[str, Any]:
        """Codec parameters recorded in meta; decode requires them to equal this codec's."""
        return {}

    # -- validation --------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}.encode expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{self.name}.encode expects a 1-D tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}.encode expects a float tensor, got {x.dtype}")
        if x.dtype not in _NATIVE:  # fp64 (rounded) and fp8 (exact) are handled as fp32
            return x.to(torch.float32)
        return x.contiguous()

    def _check_meta(self, meta: dict[str, Any]) -> int:
        if not isinstance(meta, dict):
            raise CodecError(f"meta must be a dict, got {type(meta).__name__}")
        if meta.get("codec") != self.name:
            raise CodecError(f"meta is for codec {meta.get('codec')!r}, this is {self.name!r}")
        numel = meta.get("numel")
        if type(numel) is not int or not 0 <= numel <= MAX_NUMEL:
            raise CodecError(f"meta numel must be an int in 0..2**40, got {numel!r}")
        for key, want in self._params().items():
            if meta.get(key) != want:
                raise CodecError(f"meta {key}={meta.get(key)!r} does not match codec's {want!r}")
        if not isinstance(meta.get("zstd", False), bool):
            raise CodecError(f"meta zstd must be a bool, got {meta.get('zstd')!r}")
        return numel


def all_finite(x: torch.Tensor) -> bool:
    """No inf/NaN in x, in one read-only pass (aminmax; isfinite().all() writes a mask first)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def absmax(x: torch.Tensor) -> float:
    """max |x| without an abs() copy, in one read-only pass (aminmax); NaN if any NaN."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return float(torch.maximum(hi, lo.neg()))
