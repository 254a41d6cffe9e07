"""Tensor codecs for the wire (depends on torch only).

    codec = get_codec("int8", block_size=1024)          # fp32 fp16 bf16 int8 uint8 int4
    meta, payload = codec.encode(x)                      # x: 1-D float tensor, any device
    y = codec.decode(meta, payload, device=x.device)     # float32, same numel
    codec.wire_bytes(numel); codec.error_bound(x); codec.name
    ef = ErrorFeedback(get_codec("int4")); meta, payload = ef.encode("layer.0", delta)

| codec | bytes/value | max abs error (error_bound) | encode(decode(encode(x))) == encode(x) |
|---|---|---|---|
| fp32 | 4 | 0 | yes |
| fp16 | 2 | max|x| 2^-11 + 2^-25 | yes |
| bf16 | 2 | max|x| 2^-8 + 2^-134 | yes |
| int8 | 1 + scale/block | max_b s_b (1/2 + 2^-16), s_b >= absmax_b / 127 | yes (blocks with normal scales; see blockwise) |
| int4 | 1/2 + scale/block | max_b s_b (1/2 + 2^-16), s_b >= absmax_b / 7 | yes (blocks with normal scales) |
| uint8 | 1 + 2 fp32/block | max_b s_b (1/2 + 2^-12) + (abs m_b + 255 s_b) 2^-23 | no |

Scales are fp32 (default) or fp16 (`scale_dtype="fp16"`, with a per-payload power of two in
meta["exp"]). Stochastic rounding (int codecs, `stochastic=True`) replaces 1/2 by 1 and is never
idempotent.
Non-finite input, or input outside a codec's range, raises CodecError (a ValueError) at encode;
so do malformed meta, payloads of the wrong length, and corrupt scales at decode. Any codec takes
`zstd=True` (lossless stage after it; payload never exceeds wire_bytes). fp64 input is rounded
to fp32 first. Decoding is elementwise, so one payload decodes bit-identically everywhere.
"""
from .base import Codec
from .blockwise import AbsmaxCodec, BlockCodec, Int4Codec, Int8Codec, Uint8MinMaxCodec
from .errors import CodecError
from .feedback import ErrorFeedback
from .floats import Bf16Codec, CastCodec, Fp16Codec, Fp32Codec
from .registry import CODECS, get_codec

__all__ = [
    "AbsmaxCodec",
    "Bf16Codec",
    "BlockCodec",
    "CODECS",
    "CastCodec",
    "Codec",
    "CodecError",
    "ErrorFeedback",
    "Fp16Codec",
    "Fp32Codec",
    "Int4Codec",
    "Int8Codec",
    "Uint8MinMaxCodec",
    "get_codec",
]
