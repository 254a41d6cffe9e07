"""Swarm token strength: a user-chosen token below 128 bits of estimated entropy is refused.

A swarm token (closed admission, ``--token``) keys the handshake's token MAC and the admission
proof, so its entropy is all that stands between a dialer and the swarm. Strings are scored with
zxcvbn (dictionary words, keyboard walks, repeats and dates count for little), which is
conservative for random strings: a 43-character ``secrets.token_urlsafe(32)`` scores ~142 bits,
32 hex characters (a true 128 bits) only ~105. zxcvbn refuses inputs over 72 characters and is
superlinear in length, so a longer token is scored per 72-character slice and counts as its best
slice (a lower bound: guessing the whole is at least as hard as guessing any slice of it).
Raw byte tokens (tests, generated keys) are checked for length only, in the handshake.
"""
from __future__ import annotations

import math
import secrets

MIN_TOKEN_BITS = 128
MIN_TOKEN_BYTES = 16           # raw bytes tokens (a 128-bit random key)
_SLICE = 72                    # zxcvbn's own input limit
_MAX_SCORED_CHARS = 16 * _SLICE  # bounds the scoring time (~10 ms per slice)
HOW_TO_GENERATE = ("generate one with `coordinator token`, or "
                   "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")


def token_bits(token: str) -> float:
    """zxcvbn's entropy estimate of ``token`` in bits (best 72-character slice)."""
    from zxcvbn import zxcvbn  # imported on use: it loads word lists (~50 ms)
    text = token[:_MAX_SCORED_CHARS]
    slices = [text[k:k + _SLICE] for k in range(0, len(text), _SLICE)] or [""]
    return max(zxcvbn(s)["guesses_log10"] for s in slices) * math.log2(10)


def check_token_strength(token: str) -> None:
    """Raise ValueError (saying how to make a good one) unless ``token`` has >= 128 bits."""
    if not isinstance(token, str):
        raise TypeError(f"swarm token must be a string, got {type(token).__name__}")
    if not token:
        raise ValueError(f"the swarm token is empty; {HOW_TO_GENERATE}")
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise ValueError(f"the swarm token is too weak: about {bits:.0f} bits of entropy, "
                         f"at least {MIN_TOKEN_BITS} needed; {HOW_TO_GENERATE}")


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe), what ``coordinator token`` prints."""
    return secrets.token_urlsafe(32)
