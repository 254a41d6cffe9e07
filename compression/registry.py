"""Codec lookup by wire name."""
from __future__ import annotations

from typing import Any

from .base import Codec
from .blockwise import Int4Codec, Int8Codec, Uint8MinMaxCodec
from .floats import Bf16Codec, Fp16Codec, Fp32Codec

CODECS: dict[str, type[Codec]] = {
    cls.name: cls for cls in (Fp32Codec, Fp16Codec, Bf16Codec, Int8Codec, Uint8MinMaxCodec, Int4Codec)
}


def get_codec(name: str, **opts: Any) -> Codec:
    """Build a codec by name (fp32 fp16 bf16 int8 uint8 int4) with options such as
    block_size=, scale_dtype=, stochastic=, zstd=, zstd_level=. Raises ValueError for unknown
    names or options, and for bad option values."""
    cls = CODECS.get(name)
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(CODECS)}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"codec {name!r} has no option(s) {unknown}; options: {sorted(known)}")
    return cls(**opts)
