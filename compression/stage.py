"""Byte-level helpers shared by all codecs: tensor <-> payload views and the optional zstd stage."""
from __future__ import annotations

import warnings

import torch
import zstandard

from .errors import CodecError


def payload_view(buf: torch.Tensor) -> memoryview:
    """The finished uint8 payload as a zero-copy bytes-like object (one `.cpu()` copy if on GPU)."""
    return memoryview(buf.cpu().numpy())


def payload_tensor(payload, expected: int, device: torch.device | str) -> torch.Tensor:
    """Wrap `payload` (bytes-like) as a uint8 tensor on `device` after checking its length,
    so a short or long payload never reaches the arithmetic."""
    try:
        view = memoryview(payload).cast("B")
    except TypeError as exc:
        raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}") from exc
    if view.nbytes != expected:
        raise CodecError(f"payload is {view.nbytes} bytes, metadata implies {expected}")
    if expected == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if view.readonly:
        with warnings.catch_warnings():
            # Read-only buffers (bytes) are fine: decoding never writes into its input.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(view, dtype=torch.uint8)
    else:  # received payloads are bytearrays: skip the costly warnings context
        raw = torch.frombuffer(view, dtype=torch.uint8)
    return raw.to(device)


def zstd_compress(raw: memoryview, level: int) -> tuple[memoryview | bytes, bool]:
    """Compress `raw`; keep it raw when zstd does not shrink it, so the payload never exceeds
    the codec's `wire_bytes`. Returns (payload, compressed?)."""
    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    if len(packed) < raw.nbytes:
        return packed, True
    return raw, False


def zstd_decompress(payload, expected: int) -> bytes:
    """Decompress one zstd frame whose content size must be exactly `expected` bytes; the size is
    checked from the frame header before anything is allocated."""
    try:
        payload = memoryview(payload).cast("B")
        declared = zstandard.frame_content_size(payload)
    except TypeError as exc:
        raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}") from exc
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from exc
    if declared != expected:
        raise CodecError(f"zstd frame declares {declared} bytes, metadata implies {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from exc
    if len(out) != expected:
        raise CodecError(f"zstd frame decoded to {len(out)} bytes, expected {expected}")
    return out
