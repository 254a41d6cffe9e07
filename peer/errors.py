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
    """A remote handler raised or refused the call. The text reads "peer: Type: message";
    ``remote_type`` and ``detail`` carry the type name and message as sent (typed, no parsing)."""

    def __init__(self, message: str = "", *, remote_type: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.detail = detail


class RemoteBusy(RemoteError):
    """The remote peer runs its limit of handlers for us; retry later."""


class RemoteRateLimited(RemoteError):
    """The remote peer's request rate limit for us is exhausted; retry later."""


class Forbidden(RemoteError):
    """The remote peer refused the call: our credential lacks every role its handler requires."""


class NoSuchMethod(RemoteError):
    """The remote peer has no handler for the method called."""


class TransportTimeout(LowbandError, TimeoutError):
    """A call, receive or connect did not finish in time."""
