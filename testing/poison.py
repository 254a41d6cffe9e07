"""A malicious peer's pseudo-gradients: value attacks (flip: -delta, huge: delta x 1e3) and a
crafted payload whose first value is a NaN, injected below the codecs as a hostile peer would.
Shared by the poisoning tests (tests/test_robust.py, tests/poison_child.py) and bench/poison.py.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Callable

HUGE_SCALE = 1e3
_NAN = struct.pack("<f", math.nan)


def poison_tensors(attack: str, tensors: list) -> list:
    """What a malicious peer sends instead of its pseudo-gradient (value attacks)."""
    if attack == "flip":
        return [-t for t in tensors]
    if attack == "huge":
        return [t * HUGE_SCALE for t in tensors]
    return tensors


def corrupt_payload(payload) -> bytes:
    """A crafted payload that the sender's codec would refuse to produce: its first 4 bytes become
    a NaN (the first block scale of int codecs, a value pair of fp16/bf16, a value of fp32)."""
    raw = bytearray(payload)
    raw[:4] = _NAN[:len(raw[:4])]
    return bytes(raw)


def install_payload_poisoner(host) -> Callable[[], None]:
    """Make ``host`` corrupt every contribution it sends in an all-reduce (robust: '|c|', ring
    reduce-scatter: '|rs|'), below the codecs, as a malicious peer crafting bytes would.
    Returns the function that makes it honest again."""
    real_send = host.send

    async def send(peer, tag, header, payload=b"", **options):
        if ("|c|" in tag or "|rs|" in tag) and isinstance(header, dict) and "m" in header:
            payload = corrupt_payload(payload)
        return await real_send(peer, tag, header, payload, **options)
    host.send = send
    return lambda: setattr(host, "send", real_send)


class PoisoningAverager:
    """An Averager that hands a poisoned version of every pseudo-gradient to the real one."""

    def __init__(self, inner, attack: str) -> None:
        self.inner, self.attack = inner, attack

    @property
    def group_size(self) -> int:
        return self.inner.group_size

    def start(self, tensors, tag, *, within_s=None):
        return self.inner.start(poison_tensors(self.attack, tensors), tag, within_s=within_s)
