"""Float cast codecs: fp32 (identity), fp16, bf16.

Encoding is one round-to-nearest-even cast; decoding widens to fp32, which is exact, so
encode(decode(encode(x))) == encode(x) holds for all three (the cast of an already
representable value is the identity).

Non-finite input, and finite input that would overflow the wire format to inf, raises
CodecError: a poisoned update must be caught at the sender, not averaged into everyone. Decoding
likewise rejects payloads holding inf/NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Codec, absmax, all_finite
from .errors import CodecError


@dataclass(frozen=True, kw_only=True)
class CastCodec(Codec):
    """Cast to `wire_dtype`. Error bound: max|x| * unit_roundoff + subnormal_half_ulp, i.e.
    fp32: 0; fp16: max|x| * 2^-11 + 2^-25; bf16: max|x| * 2^-8 + 2^-134."""

    wire_dtype: ClassVar[torch.dtype]
    # Smallest magnitude that the round-to-nearest cast sends to inf.
    overflow: ClassVar[float]
    unit_roundoff: ClassVar[float]
    subnormal_half_ulp: ClassVar[float]

    def wire_bytes(self, numel: int) -> int:
        return numel * self.wire_dtype.itemsize

    def _bound(self, x: torch.Tensor) -> float:
        return absmax(x) * self.unit_roundoff + self.subnormal_half_ulp

    def _check_range(self, x: torch.Tensor) -> None:
        peak = absmax(x)
        if not peak < self.overflow:  # also catches NaN
            raise CodecError(f"{self.name}: input has non-finite or out-of-range values (max |x| = {peak})")

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self._check_range(x)
        # A fresh buffer even for fp32 input: the payload must not alias the caller's tensor.
        out = torch.empty(x.numel(), dtype=self.wire_dtype, device=x.device)
        out.copy_(x)
        return out.view(torch.uint8), {}

    def _encode_shared(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if x.dtype != self.wire_dtype:
            return self._encode(x)
        self._check_range(x)
        return x.view(torch.uint8), {}  # the wire bytes are x's: no copy pass

    def _decode(self, raw: torch.Tensor, numel: int, meta: dict, out: torch.Tensor,
                add: torch.Tensor | None) -> torch.Tensor:
        values = raw.view(self.wire_dtype)
        # Widening is exact, so the sum is the one fp32 add of decode(...).add_(add).
        if add is None:
            out.copy_(values)
        else:
            torch.add(values, add, out=out)
        # Encoders never send inf/NaN, so one here is corruption or a poisoned peer: rejecting it
        # keeps decoded values finite for every codec. One pass over the fp32 result while it is
        # still in cache; only a non-finite sum needs a look at the inputs themselves.
        if all_finite(out):
            return out
        if add is None:
            raise CodecError(f"{self.name}: corrupt payload (non-finite values)")
        if out.data_ptr() != values.data_ptr():
            if not all_finite(values):
                raise CodecError(f"{self.name}: corrupt payload (non-finite values)")
        elif all_finite(add):  # decoded in place: the payload is gone, but the local side is fine
            raise CodecError(f"{self.name}: corrupt payload (non-finite values, or a sum beyond fp32's range)")
        return out  # non-finite local values: the caller's next encode rejects them


@dataclass(frozen=True, kw_only=True)
class Fp32Codec(CastCodec):
    """Identity: 4 bytes per value, lossless."""

    name: ClassVar[str] = "fp32"
    decodes_in_place: ClassVar[bool] = True
    wire_dtype: ClassVar[torch.dtype] = torch.float32
    overflow: ClassVar[float] = float("inf")
    unit_roundoff: ClassVar[float] = 0.0
    subnormal_half_ulp: ClassVar[float] = 0.0


@dataclass(frozen=True, kw_only=True)
class Fp16Codec(CastCodec):
    """IEEE half: 2 bytes per value, 11 significant bits, |x| < 65520."""

    name: ClassVar[str] = "fp16"
    wire_dtype: ClassVar[torch.dtype] = torch.float16
    overflow: ClassVar[float] = 65520.0
    unit_roundoff: ClassVar[float] = 2.0**-11
    subnormal_half_ulp: ClassVar[float] = 2.0**-25


@dataclass(frozen=True, kw_only=True)
class Bf16Codec(CastCodec):
    """bfloat16: 2 bytes per value, 8 significant bits, fp32's exponent range."""

    name: ClassVar[str] = "bf16"
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
    overflow: ClassVar[float] = (2.0 - 2.0**-8) * 2.0**127
    unit_roundoff: ClassVar[float] = 2.0**-8
    subnormal_half_ulp: ClassVar[float] = 2.0**-134
