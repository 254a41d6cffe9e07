"""Blockwise integer codecs: int8 / int4 absmax (symmetric) and uint8 min-max (asymmetric).

The input is cut into blocks of `block_size` values (the last block may be shorter); each block
gets its own scale, which isolates outliers (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization"). Payload layout: [per-block side info][quantized data].

Scales are rounded *up* onto a grid with at most 17 significant bits (fp32) or onto fp16 times a
per-payload power of two (meta["exp"]), so that (a) no value ever rounds past the top level (no
clamp pass needed) and (b) level * scale is exact in fp32. (b) makes decoding a single exact
multiply and makes the symmetric codecs idempotent: encode(decode(encode(x))) == encode(x) bit
for bit (tested) with round-to-nearest, for all-zero blocks and every block whose stored scale is
a normal number (fp32 scales: absmax >= qmax * 2^-126; fp16 scales: absmax within 2^29 of the
payload's largest). Smaller blocks get a coarser grid: still within error_bound. The min-max codec
adds an offset after the multiply, so it is deterministic but not idempotent; stochastic rounding
is never idempotent.

Encoding works through the input in cache-sized chunks of whole blocks on CPU (one chunk on GPU),
reusing one scratch buffer, so each value crosses main memory about twice instead of once per op.
Non-finite input raises CodecError (a poisoned update must be caught at the sender).
"""
from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from .base import Codec
from .errors import CodecError

_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Elements per encode/decode chunk on CPU: input + scratch stay inside a 2 MiB L2.
_CPU_CHUNK = 1 << 17
# Range of the fp16-scale exponent: 2^exp and every stored fp16 * 2^exp stay normal fp32 numbers.
_EXP_RANGE = (-100, 107)
# fp(x / s) may exceed the exact quotient by 2 ulps (division, plus a reciprocal on some backends).
_QUOTIENT_SLACK = 2.0**-16


def _fp16_exponent(scale: torch.Tensor) -> int:
    """Per-payload power of two for fp16 scales: the largest scale / 2^exp lands in (2^14, 2^15],
    so every block within 2^29 of the largest gets a normal fp16 scale (no fp16 range limit, no
    precision loss for small tensors). Depends only on ceil(log2(max scale)), which rounding the
    scales up cannot change, so it survives a round trip (idempotency)."""
    top = float(scale.max())
    if top == 0.0:
        return 0
    mantissa, exp = math.frexp(top)
    ceil_log2 = exp - 1 if mantissa == 0.5 else exp
    return min(max(ceil_log2 - 15, _EXP_RANGE[0]), _EXP_RANGE[1])


def _round_scale_up(scale: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(stored, exp): the smallest positive value >= scale on the wire grid is stored * 2^exp.
    fp32 (exp 0): clear the low 7 of 24 significand bits rounding up (17 bits stay, so level *
    scale is exact for |level| <= 128); fp16: scale by 2^-exp (exact), cast, then step one ulp up
    where the cast rounded down. Zero scales (all-zero blocks) become the smallest grid value so
    division never sees 0."""
    if scale_dtype == torch.float32:
        bits = scale.view(torch.int32).add(127).bitwise_and_(~127).clamp_min_(128)
        return bits.view(torch.float32), 0
    exp = _fp16_exponent(scale)
    scaled = scale * 2.0**-exp
    half = scaled.to(torch.float16)
    bits = half.view(torch.int16).add((half.float() < scaled).to(torch.int16)).clamp_min_(1)
    return bits.view(torch.float16), exp


@dataclass(frozen=True, kw_only=True)
class BlockCodec(Codec):
    """Shared block machinery. Options: block_size, scale_dtype ("fp32" | "fp16"),
    stochastic (unbiased stochastic rounding instead of round-to-nearest; doubles the bound).
    Subclasses define the per-block side info and the affine map between values and levels."""

    block_size: int = 1024
    scale_dtype: str = "fp32"
    stochastic: bool = False
    bits: ClassVar[int]
    levels: ClassVar[tuple[int, int]]  # smallest and largest quantization level
    side_arrays: ClassVar[int]  # per-block side values stored (scale, and offset for min-max)
    wire_int: ClassVar[torch.dtype]  # integer type of one stored level (8-bit codecs)
    wire_peak: ClassVar[int]  # largest |level| any stored bits decode to (int8: -128)

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.block_size) is not int or not 2 <= self.block_size <= 1 << 20:
            raise ValueError(f"{self.name} block_size must be an int in 2..2**20, got {self.block_size!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"{self.name} scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"{self.name} stochastic must be a bool, got {self.stochastic!r}")

    # -- subclass hooks ------------------------------------------------------------------------
    @abstractmethod
    def _side(self, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """(per-block side arrays as stored, scale exponent); CodecError for unrepresentable input."""

    @abstractmethod
    def _to_levels(self, x: torch.Tensor, side: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Unrounded levels of x (rows = blocks) into out, given side arrays as fp32 columns."""

    @abstractmethod
    def _from_levels(self, levels: torch.Tensor, side: list[torch.Tensor]) -> torch.Tensor:
        """Values from float levels (rows = blocks), in place, with elementwise ops only."""

    def _store(self, levels: torch.Tensor, data: torch.Tensor, e0: int, e1: int, scratch: torch.Tensor) -> None:
        """Write rounded float levels of elements e0:e1 (a prefix of scratch) into the data bytes."""
        data[e0:e1].view(self.wire_int).copy_(levels)

    def _load(self, data: torch.Tensor, e0: int, e1: int, out: torch.Tensor) -> torch.Tensor:
        """Write the levels of elements e0:e1 as floats into out[e0:e1]; return that view."""
        return out[e0:e1].copy_(data[e0:e1].view(self.wire_int))

    # -- sizes -----------------------------------------------------------------------------
    def _nblocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _side_bytes(self, numel: int) -> int:
        return self._nblocks(numel) * self.side_arrays * _SCALE_DTYPES[self.scale_dtype].itemsize

    def wire_bytes(self, numel: int) -> int:
        return self._side_bytes(numel) + -(-numel * self.bits // 8)

    def _params(self) -> dict:
        return {"block": self.block_size, "scale": self.scale_dtype}

    # -- encode / decode -------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        numel = x.numel()
        out = torch.empty(self.wire_bytes(numel), dtype=torch.uint8, device=x.device)
        if numel == 0:
            return out, self._exp_meta(0)
        side, exp = self._side(x)
        stored = out[: self._side_bytes(numel)].view(side[0].dtype).view(self.side_arrays, -1)
        for row, values in zip(stored, side):
            row.copy_(values)
        columns = [values.unsqueeze(1) for values in self._unpack_side(side, exp)]
        data = out[self._side_bytes(numel) :]
        scratch = self._scratch(numel, x.device)
        for r0, r1, e0, e1 in self._chunks(numel, x.device):
            rows = r1 - r0
            t = self._to_levels(
                x[e0:e1].view(rows, -1), [c[r0:r1] for c in columns], scratch[: e1 - e0].view(rows, -1)
            )
            self._store(self._rounding(t).view(-1), data, e0, e1, scratch)
        return out, self._exp_meta(exp)

    def _decode(self, raw: torch.Tensor, numel: int, meta: dict, out: torch.Tensor,
                add: torch.Tensor | None) -> torch.Tensor:
        side_bytes = self._side_bytes(numel)
        stored = raw[:side_bytes].view(_SCALE_DTYPES[self.scale_dtype]).view(self.side_arrays, -1)
        side = torch.stack(self._unpack_side(list(stored), self._meta_exp(meta)))
        # Row 0 is the scale: encode never writes a zero, negative or non-finite one, nor side info
        # whose largest decodable value overflows fp32, so decoded values are finite whatever the
        # data bytes hold.
        if side.numel() and (not bool(torch.isfinite(self._peak(side)).all()) or bool((side[0] <= 0).any())):
            raise CodecError(f"{self.name}: corrupt payload (scales must be positive, side info finite)")
        columns = [values.unsqueeze(1) for values in side]
        data = raw[side_bytes:]
        for r0, r1, e0, e1 in self._chunks(numel, raw.device):
            levels = self._load(data, e0, e1, out).view(r1 - r0, -1)
            self._from_levels(levels, [c[r0:r1] for c in columns])
            if add is not None:  # while the chunk is in cache; same fp32 add as a later add_
                levels.add_(add[e0:e1].view(r1 - r0, -1))
        return out

    # -- block iteration ---------------------------------------------------------------------
    def _chunks(self, numel: int, device: torch.device) -> Iterator[tuple[int, int, int, int]]:
        """(first block, end block, first element, end element) per chunk of whole blocks; the
        short last block is its own chunk."""
        rows = max(1, _CPU_CHUNK // self.block_size) if device.type == "cpu" else 1 << 62
        nfull = numel // self.block_size
        for r0 in range(0, nfull, rows):
            r1 = min(r0 + rows, nfull)
            yield r0, r1, r0 * self.block_size, r1 * self.block_size
        if nfull * self.block_size < numel:
            yield nfull, nfull + 1, nfull * self.block_size, numel

    def _scratch(self, numel: int, device: torch.device) -> torch.Tensor:
        """fp32 scratch for the largest chunk, plus one slot for int4's pad nibble."""
        largest = min(numel, _CPU_CHUNK + self.block_size) if device.type == "cpu" else numel
        return torch.empty(largest + 1, device=device)

    def _block_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block min and max as fp32 (two read-only passes; faster than aminmax or
        abs().amax(), which copies). NaN propagates into both."""
        full = x.numel() // self.block_size * self.block_size
        parts = [x[:full].view(-1, self.block_size)] if full else []
        if full < x.numel():
            parts.append(x[full:].view(1, -1))
        lo = torch.cat([p.amin(dim=1) for p in parts])
        hi = torch.cat([p.amax(dim=1) for p in parts])
        return lo.float(), hi.float()

    def _unpack_side(self, stored: list[torch.Tensor], exp: int) -> list[torch.Tensor]:
        """Stored side arrays -> fp32 values; the scale row times 2^exp (exact)."""
        values = [row.float() for row in stored]
        if exp:  # only fp16 scales have one, and their .float() is a fresh tensor
            values[0].mul_(2.0**exp)
        return values

    def _exp_meta(self, exp: int) -> dict:
        """Per-payload meta: the fp16-scale exponent (fp32 scales need none)."""
        return {"exp": exp} if self.scale_dtype == "fp16" else {}

    def _meta_exp(self, meta: dict) -> int:
        if self.scale_dtype != "fp16":
            return 0
        exp = meta.get("exp")
        if type(exp) is not int or not _EXP_RANGE[0] <= exp <= _EXP_RANGE[1]:
            raise CodecError(f"{self.name}: meta exp must be an int in {_EXP_RANGE}, got {exp!r}")
        return exp

    def _peak(self, side: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Per block, the largest |value| any data bits can decode to (fp32; inf on overflow)."""
        peak = side[0].float() * self.wire_peak
        return peak + side[1].abs() if self.side_arrays == 2 else peak

    def _check_finite(self, values: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(values).all()):
            raise CodecError(f"{self.name}: {what}")

    def _rounding(self, t: torch.Tensor) -> torch.Tensor:
        """Round in place: nearest-even, or stochastic floor(t + U[0,1)) (unbiased). Nearest never
        leaves the level range (scales are rounded up); t + U can round up to top + 1 in fp32."""
        if self.stochastic:
            return t.add_(torch.rand_like(t)).floor_().clamp_(*self.levels)
        return t.round_()

    def _slack(self) -> float:
        """Rounding part of the bound, in levels: 1/2 for nearest, 1 for stochastic."""
        return 1.0 if self.stochastic else 0.5


@dataclass(frozen=True, kw_only=True)
class AbsmaxCodec(BlockCodec):
    """Symmetric blockwise codec: s_b = absmax_b / qmax rounded up onto the scale grid,
    q = round(x / s_b) in [-qmax, qmax], decode q * s_b (exact).
    Error bound: max_b s_b * (1/2 + 2^-16) (round-to-nearest) or max_b s_b * (1 + 2^-16)
    (stochastic), where s_b is the stored scale; the 2^-16 covers fp32 rounding of x / s_b.
    Range: (qmax + 1) * s_b must stay finite (|x| < ~3.37e38 for int8), else CodecError."""

    side_arrays: ClassVar[int] = 1

    @property
    def qmax(self) -> int:
        return self.levels[1]

    def _side(self, x: torch.Tensor) -> list[torch.Tensor]:
        lo, hi = self._block_minmax(x)
        peak = torch.maximum(hi, lo.neg())
        self._check_finite(peak, "input has non-finite values")
        scales, exp = _round_scale_up(peak / self.qmax, _SCALE_DTYPES[self.scale_dtype])
        self._check_finite(self._peak(self._unpack_side([scales], exp)), "values too large (|x| < ~3.37e38)")
        return [scales], exp

    def _bound(self, x: torch.Tensor) -> float:
        side, exp = self._side(x)
        return float(self._unpack_side(side, exp)[0].max()) * (self._slack() + _QUOTIENT_SLACK)

    def _to_levels(self, x, side, out):
        return torch.div(x, side[0], out=out)

    def _from_levels(self, levels, side):
        return levels.mul_(side[0])


@dataclass(frozen=True, kw_only=True)
class Int8Codec(AbsmaxCodec):
    """int8 absmax, levels -127..127: 1 byte per value + one scale per block."""

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    levels: ClassVar[tuple[int, int]] = (-127, 127)
    wire_int: ClassVar[torch.dtype] = torch.int8
    wire_peak: ClassVar[int] = 128


@dataclass(frozen=True, kw_only=True)
class Int4Codec(AbsmaxCodec):
    """int4 absmax, levels -7..7 stored as nibbles q + 8 (two values per byte, low nibble first):
    half a byte per value + one scale per block. block_size must be even so blocks start on byte
    boundaries; an odd total gets one pad nibble (code 8, i.e. zero)."""

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    levels: ClassVar[tuple[int, int]] = (-7, 7)
    wire_peak: ClassVar[int] = 8
    block_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size % 2:
            raise ValueError(f"int4 block_size must be even, got {self.block_size}")

    def _store(self, levels, data, e0, e1, scratch):
        count = e1 - e0
        if count % 2:  # pad nibble; scratch has one spare slot past any chunk
            levels = scratch[: count + 1]
            levels[count] = 0
        pairs = levels.view(-1, 2)
        # (lo + 8) + 16 * (hi + 8) in float (exact), then one cast to bytes.
        packed = torch.add(pairs[:, 0], pairs[:, 1], alpha=16).add_(136)
        data[e0 // 2 : (e1 + 1) // 2].copy_(packed)

    def _load(self, data, e0, e1, out):
        # e0 is even (blocks are); out ends at e1, so an odd count's pad nibble is skipped.
        packed = data[e0 // 2 : (e1 + 1) // 2]
        half = (e1 - e0) // 2
        dest = out[e0 : e0 + 2 * half].view(-1, 2)
        dest[:, 0].copy_(packed[:half] & 15)
        dest[:, 1].copy_(packed[:half] >> 4)
        if (e1 - e0) % 2:
            out[e1 - 1 : e1].copy_(packed[half:] & 15)
        return out[e0:e1].sub_(8)


@dataclass(frozen=True, kw_only=True)
class Uint8MinMaxCodec(BlockCodec):
    """uint8 min-max: per block offset m_b = min_b and scale s_b = (max_b - m_b) / 255 rounded up,
    q = round((x - m_b) / s_b) in 0..255, decode q * s_b + m_b (two separately rounded fp32 ops,
    so deterministic everywhere, but not idempotent). Side info: all scales, then all offsets.
    Error bound: max_b [ s_b * (1/2 + 2^-12) + (|m_b| + 255 s_b) * 2^-23 ] (round-to-nearest;
    1 instead of 1/2 when stochastic); the second term is fp32 rounding of the decode.
    A block whose range overflows fp32 (max - min > 3.4e38) raises CodecError."""

    name: ClassVar[str] = "uint8"
    bits: ClassVar[int] = 8
    levels: ClassVar[tuple[int, int]] = (0, 255)
    wire_int: ClassVar[torch.dtype] = torch.uint8
    wire_peak: ClassVar[int] = 255
    side_arrays: ClassVar[int] = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_dtype != "fp32":
            raise ValueError(f"uint8 supports scale_dtype='fp32' only, got {self.scale_dtype!r}")

    def _side(self, x: torch.Tensor) -> list[torch.Tensor]:
        lo, hi = self._block_minmax(x)
        self._check_finite(torch.cat((lo, hi)), "input has non-finite values")
        scales, _ = _round_scale_up((hi - lo) / 255, torch.float32)
        self._check_finite(self._peak([scales, lo]), "block range overflows fp32")
        return [scales, lo], 0

    def _bound(self, x: torch.Tensor) -> float:
        (s, m), _ = self._side(x)
        return float((s * (self._slack() + 2.0**-12) + (m.abs() + 255 * s) * 2.0**-23).max())

    def _to_levels(self, x, side, out):
        return torch.sub(x, side[1], out=out).div_(side[0])

    def _from_levels(self, levels, side):
        return levels.mul_(side[0]).add_(side[1])
