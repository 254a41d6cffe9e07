"""Typed errors of the codec layer."""


class CodecError(ValueError):
    """A payload or input a codec refuses: wrong length, corrupt metadata or scales,
    non-finite values, or values outside the codec's range. Subclass of ValueError so
    callers that only know "bad input" still catch it."""
