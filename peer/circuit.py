"""Relay control messages: one typed, sans-IO schema per message, shared by both ends.

They travel as the header of an RPC request or response (:mod:`peer.messages`), inside the
AEAD records of a connection authenticated by the normal handshake, so a relay only ever acts
for admitted peers. Methods (``METHOD_*``) and who sends what:

- ``Reserve`` (NATed B -> relay R, RPC ``relay.reserve``): keep B reachable through R; the
  reservation is B's ordinary connection to R and lives as long as it does.
- ``Incoming`` (R -> B over the reservation, RPC ``relay.incoming``): someone wants B. Kind
  ``circuit``: dial R again and ``CircuitAccept`` circuit ``cid``; kind ``reverse``: dial ``src``
  directly at ``address`` (connection reversal).
- ``Reverse`` (A -> R, RPC ``relay.reverse``): ask R to pass a reversal request to B.
- ``CircuitOpen`` (A -> R, first request on a fresh connection): splice this socket to B.
- ``CircuitAccept`` (B -> R, first request on a fresh connection): this socket is B's end of ``cid``.
- ``CircuitReady`` (R -> A and B, the response to those two): the next byte on the socket is
  the peer's; R forwards raw bytes from here on (the end-to-end handshake runs through it). It
  names the IP R sees the other end at: the only IP a hole punch over the circuit may aim at.

A relay builds the ``address`` of a reversal's ``Incoming`` from the IP it sees the requester at
(only the port comes from the ``Reverse``), so an honest relay never passes on a third party's
address.

A refusal is an RPC error with the reason; every ``from_header`` raises ProtocolError on a
malformed header.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from peer import addrscope
from peer.errors import ProtocolError

METHOD_RESERVE = "relay.reserve"
METHOD_INCOMING = "relay.incoming"
METHOD_REVERSE = "relay.reverse"
METHOD_OPEN = "relay.open"
METHOD_ACCEPT = "relay.accept"
SOCKET_METHODS = frozenset({METHOD_OPEN, METHOD_ACCEPT})  # requests that turn their socket into a circuit

_PEER_ID = re.compile(r"[0-9a-f]{40}")
_CID = re.compile(r"[0-9a-f]{32}")
_MAX_ADDRESS = 262


def _peer_id(header: dict, name: str) -> str:
    v = header.get(name)
    if not isinstance(v, str) or not _PEER_ID.fullmatch(v):
        raise ProtocolError(f"relay message field {name!r} must be a 40-hex peer id, got {v!r:.60}")
    return v


def _cid(header: dict) -> str:
    v = header.get("cid")
    if not isinstance(v, str) or not _CID.fullmatch(v):
        raise ProtocolError(f"relay message field 'cid' must be 32 hex chars, got {v!r:.60}")
    return v


def _address(header: dict) -> str:
    v = header.get("address")
    host, sep, port = v.rpartition(":") if isinstance(v, str) else ("", "", "")
    if (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(v) > _MAX_ADDRESS):
        raise ProtocolError(f"relay message field 'address' must be HOST:PORT, got {v!r:.60}")
    return v


def _ip(header: dict, name: str) -> str:
    v = header.get(name)
    if isinstance(v, str) and len(v) <= 64:
        try:
            return str(addrscope.parse_ip(v))
        except ValueError:
            pass
    raise ProtocolError(f"relay message field {name!r} must be an IP address literal, got {v!r:.60}")


def _only(header: object, fields: set[str], what: str) -> dict:
    if not isinstance(header, dict) or set(header) != fields:
        got = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise ProtocolError(f"{what} needs exactly the fields {sorted(fields)}, got {got}")
    return header


@dataclass(frozen=True)
class Reserve:
    def to_header(self) -> dict:
        return {}

    @classmethod
    def from_header(cls, header: object) -> "Reserve":
        _only(header, set(), "relay reservation")
        return cls()


@dataclass(frozen=True)
class Reverse:
    dst: str       # the NATed peer that should dial us
    address: str   # where it should dial (our reachable address)

    def to_header(self) -> dict:
        return asdict(self)

    @classmethod
    def from_header(cls, header: object) -> "Reverse":
        h = _only(header, {"dst", "address"}, "reversal request")
        return cls(_peer_id(h, "dst"), _address(h))


@dataclass(frozen=True)
class Incoming:
    kind: str      # "circuit" | "reverse"
    src: str       # who wants the reserved peer
    cid: str = ""  # circuit id (kind circuit)
    address: str = ""  # where to dial src (kind reverse)

    def to_header(self) -> dict:
        return asdict(self)

    @classmethod
    def from_header(cls, header: object) -> "Incoming":
        h = _only(header, {"kind", "src", "cid", "address"}, "incoming notice")
        kind = h["kind"]
        if kind == "circuit":
            return cls(kind, _peer_id(h, "src"), _cid(h), "")
        if kind == "reverse":
            return cls(kind, _peer_id(h, "src"), "", _address(h))
        raise ProtocolError(f"incoming notice kind must be 'circuit' or 'reverse', got {kind!r:.40}")


@dataclass(frozen=True)
class CircuitOpen:
    dst: str

    def to_header(self) -> dict:
        return asdict(self)

    @classmethod
    def from_header(cls, header: object) -> "CircuitOpen":
        return cls(_peer_id(_only(header, {"dst"}, "circuit request"), "dst"))


@dataclass(frozen=True)
class CircuitAccept:
    cid: str

    def to_header(self) -> dict:
        return asdict(self)

    @classmethod
    def from_header(cls, header: object) -> "CircuitAccept":
        return cls(_cid(_only(header, {"cid"}, "circuit acceptance")))


@dataclass(frozen=True)
class CircuitReady:
    peer: str      # the peer at the other end (the end-to-end handshake must prove it)
    observed: str  # the IP the relay sees that peer's socket come from (where a punch may aim)

    def to_header(self) -> dict:
        return asdict(self)

    @classmethod
    def from_header(cls, header: object) -> "CircuitReady":
        h = _only(header, {"peer", "observed"}, "circuit ready")
        return cls(_peer_id(h, "peer"), _ip(h, "observed"))
