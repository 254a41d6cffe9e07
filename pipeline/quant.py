"""Weights kept quantized in memory and dequantized per matmul (``--serve ... --serve-weights``).

Formats (``pipeline.serve_options.WEIGHT_FORMATS``):
- ``fp32``: every weight dequantized once at load (the reference; the default);
- ``bf16``: linear and embedding weights stored in bf16, widened per matmul (tolerance: bf16
  rounding of each weight, relative error <= 2**-9);
- ``q8`` / ``q4``: linear and embedding weights stored as integer codes with a scale (and for
  some types an offset) per group of 16 or 32 weights: w = codes * scale + offset.

GGUF tensors that come quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) are kept as they
come under q8 and q4 alike: their block values are unpacked once at load into that form, and
every product and sum of the formula is exact in fp32 or rounds once exactly as ``gguf``'s
dequantizer rounds (codes x scale is exact: a half-precision scale, or a product of two, times
a code of at most 8 bits, fits fp32's 24-bit mantissa), so a dequantized weight is bit-identical
to ``gguf.quants.dequantize`` and the model computes what the dequantized-fp32 model computes.
Requantizing them to the other width would only add error to weights already quantized once;
the file's mix of types is what its maker chose. Float weights (F32/F16/BF16 tensors, Hugging
Face folders) and GGUF types without an unpacker here are quantized at load with ``gguf``'s own
quantizer: q8 -> Q8_0, q4 -> Q4_1 (tolerance: per-group absmax / 254 resp. (max - min) / 30).

Memory: 4-bit codes are packed two per byte (byte j of a row holds columns j and j + in/2, so
unpacking is two contiguous ops); wider codes take a byte; scales and offsets are fp32 (one or
two per group). Q4_1 costs 6 bits a weight, Q8_0 9 bits.

Compute: ``QuantLinear.forward`` dequantizes tiles of at most ``TILE`` weights (output rows) into
a per-thread scratch buffer and multiplies each at once, so the fp32 copy of a matrix never
exists beyond one tile and the scratch is reused by every layer: memory stays quantized, and
the work per matmul is the unpack plus one ``F.linear``, on CPU and CUDA alike. The embedding
(``QuantEmbedding``) dequantizes only the rows it looks up; a tied head uses ``attend``.
The modules are swapped into an ``pipeline.model.Llama`` at load (``quantize_model``): the model
keeps its one forward path.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.serve_options import WEIGHT_FORMATS

log = logging.getLogger("lowband.pipeline.quant")

TILE = 1 << 21  # weights dequantized at once (8 MiB of fp32): bounds the scratch, stays in cache


def check_weights(weights: str) -> str:
    """``weights`` if it names a format, else ValueError saying which exist."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    return weights


@dataclass
class GGUFBlocks:
    """One GGUF tensor as stored: ``raw`` uint8 [rows, bytes per row] of ``qtype`` blocks
    (rows already in our layout), describing a float matrix [rows, cols]."""
    qtype: str
    raw: np.ndarray
    cols: int


Source = Union[Tensor, GGUFBlocks]  # what a loader hands over for one weight


@dataclass
class Codes:
    """w[r, c] = codes[r, c] * scale[r, c // group] (+ offset[r, c // group]), as numpy."""
    codes: np.ndarray               # int8 or uint8 [rows, cols] (unpacked)
    scale: np.ndarray               # float32 [rows, cols // group]
    offset: np.ndarray | None       # float32 [rows, cols // group] or None
    group: int


# ------------------------------------------------------------------------ GGUF block unpackers

def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: byte j holds code j (low nibble) and code j + 16."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18]), d, -8 * d, 32  # d * (q - 8) == d * q + (-8 d), both exact


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4]), 32


def _q5(b, offset: bool):
    d, start = _f16(b[:, 0:2]), 4 if offset else 2
    qh = np.ascontiguousarray(b[:, start:start + 4]).view(np.uint32)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    q = _nibbles(b[:, start + 4:start + 20]) | (high << 4)
    if offset:
        return q, d, _f16(b[:, 2:4]), 32
    return q.astype(np.int8) - np.int8(16), d, None, 32


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8), _f16(b[:, 0:2]), None, 32


def _q4_k(b):
    from gguf.quants import Q4_K

    n = b.shape[0]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    scale = _f16(b[:, 0:2]) * sc.astype(np.float32)
    offset = -(_f16(b[:, 2:4]) * m.astype(np.float32))  # d*q - dm == d*q + (-dm)
    qs = b[:, 16:144].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(n, 256), scale, offset, 32


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scale = _f16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    ql = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)
    qh = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)
    return ((ql | (qh << 4)).astype(np.int8) - np.int8(32)).reshape(n, 256), scale, None, 16


# qtype -> (weights per block, bytes per block, unpacker(blocks [n, bytes]) -> codes, scale, offset, group)
UNPACKERS: dict[str, tuple[int, int, Callable]] = {
    "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1), "Q5_0": (32, 22, lambda b: _q5(b, False)),
    "Q5_1": (32, 24, lambda b: _q5(b, True)), "Q8_0": (32, 34, _q8_0), "Q4_K": (256, 144, _q4_k),
    "Q6_K": (256, 210, _q6_k),
}


def unpack_gguf(blocks: GGUFBlocks) -> Codes:
    """The codes/scale/offset of a GGUF tensor of a type in ``UNPACKERS``."""
    per, size, fn = UNPACKERS[blocks.qtype]
    rows, width = blocks.raw.shape
    if blocks.cols % per or width != blocks.cols // per * size:
        raise ValueError(f"{blocks.qtype} tensor of {width} bytes a row cannot hold {blocks.cols} columns")
    codes, scale, offset, group = fn(blocks.raw.reshape(rows * (blocks.cols // per), size))
    shape = (rows, blocks.cols // group)
    return Codes(codes.reshape(rows, blocks.cols), scale.reshape(shape).astype(np.float32),
                 None if offset is None else offset.reshape(shape).astype(np.float32), group)


def quantize_float(w: Tensor, weights: str) -> Codes | None:
    """Float weights in the format's own GGUF type (q8: Q8_0, q4: Q4_1), or None when the
    columns do not fill whole blocks (the weight then stays float)."""
    import gguf
    from gguf.quants import quantize

    qtype = "Q8_0" if weights == "q8" else "Q4_1"
    if w.shape[-1] % 32:
        return None
    raw = quantize(w.detach().float().cpu().numpy(), gguf.GGMLQuantizationType[qtype])
    return unpack_gguf(GGUFBlocks(qtype, raw.reshape(w.shape[0], -1), w.shape[-1]))


# ------------------------------------------------------------------------------------- modules

_scratch = threading.local()


def _buffer(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable flat buffer of this thread (one per slot, dtype and device); grows on demand."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    # a buffer made under inference mode cannot be written outside it: one set per mode
    key = (slot, dtype, device, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


class QuantLinear(nn.Module):
    """A linear layer (no bias, or a float bias) whose weight [out, in] stays quantized: buffers
    ``codes`` (uint8 two 4-bit codes a byte, int8/uint8 one code a byte, or bf16 values),
    ``scale`` and ``offset`` (fp32 per group, absent for bf16 / symmetric types)."""

    def __init__(self, out_features: int, in_features: int, codes: Tensor, scale: Tensor | None,
                 offset: Tensor | None, group: int, bits: int, kind: str, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.group, self.bits, self.kind = group, bits, kind
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.bias = bias

    @classmethod
    def build(cls, source: Source, weights: str, device, bias: nn.Parameter | None = None) -> "QuantLinear":
        """From a loader's tensor: GGUF blocks are kept (types in ``UNPACKERS``), anything else is
        quantized to the format's type (bf16: rounded to bf16)."""
        if isinstance(source, GGUFBlocks):
            if weights != "bf16" and source.qtype in UNPACKERS:
                return cls.from_codes(unpack_gguf(source), source.qtype, device, bias)
            w = dequantize_blocks(source)
        else:
            w = source.float()
        rows, cols = w.shape
        if weights == "bf16":
            return cls(rows, cols, w.to(device=device, dtype=torch.bfloat16), None, None, cols, 16, "BF16", bias)
        codes = quantize_float(w, weights)
        if codes is None:  # no whole blocks: store the weight as it is (bf16-free, exact)
            log.warning("a %dx%d weight stays fp32 (columns are not whole blocks of 32)", rows, cols)
            return cls(rows, cols, w.to(device), None, None, cols, 32, "F32", bias)
        return cls.from_codes(codes, "Q8_0" if weights == "q8" else "Q4_1", device, bias)

    @classmethod
    def from_codes(cls, c: Codes, kind: str, device, bias: nn.Parameter | None = None) -> "QuantLinear":
        rows, cols = c.codes.shape
        four = c.codes.dtype == np.uint8 and int(c.codes.max(initial=0)) < 16 and (cols // 2) % c.group == 0
        if four:  # byte j holds columns j (low nibble) and j + cols/2 (high)
            codes = c.codes[:, :cols // 2] | (c.codes[:, cols // 2:] << 4)
        else:
            codes = c.codes
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return cls(rows, cols, t(codes), t(c.scale), t(c.offset), c.group, 4 if four else 8, kind, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | Tensor | None = None,
                   scratch: bool = False) -> Tensor:
        """The float weight (of ``rows`` only, when given). ``scratch``: into this thread's reused
        buffer (valid until the next scratch dequantize; only for an immediate matmul)."""
        codes = self.codes if rows is None else self.codes[rows]
        n, cols = codes.shape[0], self.in_features
        if scratch:
            w = _buffer("w", n * cols, torch.float32, codes.device).view(n, cols)
        else:
            w = torch.empty(n, cols, dtype=torch.float32, device=codes.device)
        if self.bits == 4:
            q = _buffer("q", n * cols, torch.uint8, codes.device).view(n, cols)
            half = cols // 2
            torch.bitwise_and(codes, 15, out=q[:, :half])
            torch.bitwise_right_shift(codes, 4, out=q[:, half:])
            w.copy_(q)
        else:
            w.copy_(codes)
        if self.scale is not None:
            scale = self.scale if rows is None else self.scale[rows]
            wg = w.view(n, cols // self.group, self.group)
            wg.mul_(scale.unsqueeze(-1))  # exact: see the module docstring
            if self.offset is not None:
                wg.add_((self.offset if rows is None else self.offset[rows]).unsqueeze(-1))
        return w if dtype == torch.float32 else w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # scratch only when no autograd graph could keep the tile for a backward pass
        scratch = not (torch.is_grad_enabled() and x.requires_grad)
        step = max(1, TILE // self.in_features)
        if step >= self.out_features:
            return F.linear(x, self.dequantize(x.dtype, scratch=scratch), self.bias)
        parts = [F.linear(x, self.dequantize(x.dtype, slice(a, a + step), scratch),
                          None if self.bias is None else self.bias[a:a + step])
                 for a in range(0, self.out_features, step)]
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind}, bits={self.bits}, group={self.group}"


class QuantEmbedding(QuantLinear):
    """An embedding table [vocab, dim] kept quantized: looks up (dequantizes) only the rows it
    is asked for; ``attend`` is the tied output head (x @ table.T, tile by tile)."""

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        return self.dequantize(torch.float32, flat).view(*ids.shape, self.in_features)

    def attend(self, x: Tensor) -> Tensor:
        return QuantLinear.forward(self, x)


def dequantize_blocks(blocks: GGUFBlocks) -> Tensor:
    """Any GGUF type ``gguf`` reads, as a float32 [rows, cols] tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    arr = dequantize(blocks.raw, GGMLQuantizationType[blocks.qtype])
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(blocks.raw.shape[0], blocks.cols))


def quantize_model(model: nn.Module, weights: str, source: Callable[[str], Source],
                   device: torch.device | str = "cpu") -> None:
    """Swap every ``nn.Linear`` and ``nn.Embedding`` of ``model`` (built on the meta device) for a
    quantized module filled from ``source(key)`` (key: the state-dict name of its weight); a
    linear's bias stays a (meta) float parameter for the loader to fill."""
    check_weights(weights)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding):
            new = QuantEmbedding.build(source(name + ".weight"), weights, device)
        elif isinstance(module, nn.Linear):
            new = QuantLinear.build(source(name + ".weight"), weights, device, module.bias)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def weight_stats(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model's weights as held in memory: quantized modules count
    their codes, scales and offsets; rotary tables and other non-persistent buffers are not
    weights."""
    params = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            params += m.out_features * m.in_features
        params += sum(p.numel() for p in m.parameters(recurse=False))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return params, size
