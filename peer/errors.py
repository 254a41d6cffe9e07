"""Typed errors of the peer layer; every failure a caller can see is one of these."""
from __future__ import annotations


class LowbandError(Exception):
    """Base of every lowband error."""


class ProtocolError(LowbandError):
    """Bytes on the wire violate the protocol (bad frame, bad record, limit exceeded)."""


class AuthError(LowbandError):
    """The handshake failed: wrong swarm token, bad signature, unexpected peer id, or the
    remote side rejected us (its reason is in the message)."""


class PeerUnavailable(LowbandError):
    """The peer cannot be reached, or every connection to it was lost."""


class RemoteError(LowbandError):
    """A remote handler raised; the message carries its exception type and text."""


class TransportTimeout(LowbandError, TimeoutError):
    """A call, receive or connect did not finish in time."""
