"""Typed errors of the collectives layer (subclasses of the peer layer's ``LowbandError``)."""
from __future__ import annotations

from peer.errors import LowbandError


class CollectiveError(LowbandError):
    """A collective could not produce a result: retries exhausted, too few peers left, this
    peer was excluded by the others, or the peers' inputs do not match (shapes, codec, op)."""


class CollectiveAborted(CollectiveError):
    """One attempt of a collective was aborted because the membership changed (a peer died,
    stalled or left). ``survivors`` is the membership the live peers agreed on (None while
    the abort is still inside the attempt); the caller may retry over it (``all_reduce`` and
    friends already do, up to ``Group.max_attempts``)."""

    def __init__(self, message: str, survivors: list[str] | None = None) -> None:
        super().__init__(message)
        self.survivors = survivors
