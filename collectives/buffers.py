"""Large result buffers that cost few page faults.

A fresh 100 MB tensor is first touched page by page while a ring writes into it: ~25,000 4 KiB
faults per all-reduce, a fifth of a rank's CPU on loopback. Asking for transparent huge pages
(where the kernel's policy is ``madvise``, as on most distributions) makes that ~50 faults of
2 MiB; the zeroing work stays, the per-fault cost goes.
"""
from __future__ import annotations

import mmap

import torch

_HUGE = 2 << 20  # x86-64 / arm64 transparent huge page
_MIN_BYTES = 4 * _HUGE  # below this the page faults do not matter


def empty_f32(numel: int, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous fp32 tensor; large CPU ones live in huge-page-backed memory
    (an anonymous mapping, released with the tensor), others come from torch's allocator."""
    nbytes = numel * 4
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if device.type != "cpu" or nbytes < _MIN_BYTES or advise is None:
        return torch.empty(numel, dtype=torch.float32, device=device)
    # private: a shared anonymous mapping is shmem, which has its own (usually off) THP policy
    region = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # + slack to align
    try:
        region.madvise(advise)
    except OSError:  # THP disabled or unsupported: plain pages, still correct
        pass
    pad = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % _HUGE
    return torch.frombuffer(region, dtype=torch.float32, count=numel, offset=pad)  # keeps region alive
