"""TCP hole punching: coordinated simultaneous open from each peer's listening port.

Mechanism. Two peers that cannot dial each other, but share some channel (a relay circuit, a
connection through a third peer), swap a :class:`PunchOffer` and a :class:`PunchAnswer`: each
carries the sender's peer id, the public address its *listening* port appears at, how its NAT maps
ports, and the attempt id; the answer adds when to start and the retry window. At that
moment both sides connect (:func:`simultaneous_open`) from their listening port (SO_REUSEADDR +
SO_REUSEPORT, bound to the listen address and port) to the other's public address. Each outgoing
SYN opens a mapping in its own router for exactly that remote address and port, so the peer's SYN,
aimed at the same pair, comes in through it and meets a socket in SYN_SENT: TCP simultaneous open,
and both ``connect()`` calls return one connection. Which side runs the handshake as initiator
is fixed by :func:`is_initiator` (the lower peer id), since both sides dialled.

Timing. The start is agreed without trusting clocks: the answer says "``lead_s`` after this
answer"; the answerer starts ``lead_s`` after sending it, the offerer ``lead_s`` after receiving
it, less half the channel's round trip if it measured one (offer sent -> answer received). Behind
routers that drop unsolicited SYNs (most home routers) the first SYN dies at the far router, the
second gets through, and the kernel's SYN retransmit (1 s, then 3 s) finishes the job: starts
apart by less than the window still connect. Routers that answer an unsolicited SYN with a RST
make it a race (the early side's connect is refused, and the refused flow's conntrack entry then
rejects the peer's SYN too): only an attempt whose SYN crosses the peer's in flight wins. We
retry after a pause as long as the refusal took (about one round trip, at least
``retry_pause_s``), jittered +-50 % so two sides retrying in lockstep do not keep missing each
other by the same offset: each side has a SYN in flight about half the time, so on internet
round trips a few attempts cross; on the microsecond links of a test lab it is luck (4 of 12
punches connected through RST-answering routers, every one through dropping ones). The window
and the number of attempts are bounded (:data:`MAX_WINDOW_S`, :data:`MAX_ATTEMPTS`), so a punch
that cannot work fails with :class:`PunchFailed` after at most ``window_s``, never hangs, and
one punch sends at most :data:`MAX_ATTEMPTS` SYNs to the address a peer named.

Which NATs it beats, and which it cannot:

* beats: endpoint-independent ("port-preserving" / full-cone / restricted-cone) mapping on both
  sides, with any filtering, address- and port-dependent included (the usual home router, Linux
  masquerade without ``fully-random``), and a public host behind a stateful firewall;
* cannot: address- and port-dependent mapping ("symmetric" NAT, Linux ``fully-random``, many
  carrier-grade NATs) on either side: the punching connection gets a fresh public port, so the
  address the peer aims at is not the one the mapping opened, and the peer's SYN is dropped.
  Port prediction is not attempted; such pairs use a relay. Two hosts on one LAN behind one
  router also fail unless the router hairpins (they should dial each other's LAN address).

Prediction (:func:`classify_mapping`, :func:`predict`): a peer compares its listening port with the
public port that an observer (a relay, the coordinator) saw a connection *from that port* come
from: equal address = public, equal port = preserving, other port = random (not predictable; also
what a preserving NAT does when another host behind it holds that public port). Only
preserving/public pairs are worth a punch; ``unknown`` is tried, since it costs one window.

Wire form (msgpack arrays, at most :data:`MAX_ENCODED_BYTES`; one typed schema for both ends)::

    offer   [1, "offer",  attempt(16 bytes), peer_id(40 hex), [ip, port], mapping]
    answer  [1, "answer", attempt, peer_id, [ip, port], mapping, lead_s f64, window_s f64]

Sans-IO parts (schema, prediction, the initiator rule, :class:`PunchBook`) need no event loop;
:func:`simultaneous_open` is the only asyncio code. Hostile input: the schema refuses anything
malformed with ProtocolError (a lead beyond :data:`MAX_LEAD_S` included); the number of SYNs one
punch sends is bounded.
"""
from __future__ import annotations

import asyncio
import errno
import math
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import msgpack

from peer import addrscope
from peer.errors import PeerUnavailable, ProtocolError

VERSION = 1
MAPPINGS = ("public", "preserving", "random", "unknown")
ATTEMPT_BYTES = 16
DEFAULT_WINDOW_S = 5.0   # covers the SYN resends at 1 s and 3 s after a drop by the far router
MAX_WINDOW_S = 30.0
DEFAULT_LEAD_S = 0.5     # answer -> start: more than the channel's one-way delay
MAX_LEAD_S = 30.0        # a longer lead (a hostile peer pinning our punch slot) is refused
RETRY_PAUSE_S = 0.01     # least mean pause after a refused attempt
MAX_ATTEMPTS = 200       # SYNs one punch may send (a refusal-paced retry loop, bounded)
MAX_ENCODED_BYTES = 256
_PEER_ID = re.compile(r"[0-9a-f]{40}")
Address = tuple[str, int]


class PunchFailed(PeerUnavailable):
    """The simultaneous open did not connect within its window (the message lists the errors)."""


# ------------------------------------------------------------------------------ prediction
def classify_mapping(local: Address, observed: Address | None) -> str:
    """How our NAT maps our listening port, from the address an observer saw a connection made
    *from that port* come from: "public" (no NAT), "preserving" (same port), "random", or
    "unknown" (nothing observed). A listener on 0.0.0.0 cannot tell public from preserving and
    says "preserving" (the prediction is the same)."""
    if observed is None:
        return "unknown"
    if (observed[0], int(observed[1])) == (local[0], int(local[1])):
        return "public"
    return "preserving" if int(observed[1]) == int(local[1]) else "random"


@dataclass(frozen=True)
class Prediction:
    worth_trying: bool
    reason: str


def predict(ours: str, theirs: str) -> Prediction:
    """Whether a punch between NATs mapping like ``ours`` and ``theirs`` can connect."""
    for name, mapping in (("our", ours), ("the peer's", theirs)):
        if mapping not in MAPPINGS:
            raise ValueError(f"{name} mapping must be one of {', '.join(MAPPINGS)}, got {mapping!r}")
    if "random" in (ours, theirs):
        side = "our" if ours == "random" else "the peer's"
        return Prediction(False, f"{side} NAT gives every connection a new public port "
                                 "(address/port-dependent mapping): use a relay")
    if "unknown" in (ours, theirs):
        return Prediction(True, "a mapping is unknown: one window is worth a try")
    return Prediction(True, f"mappings {ours} x {theirs} keep the listening port: punching works "
                            "through filtering NATs and firewalls")


def is_initiator(my_id: str, peer_id: str) -> bool:
    """On a punched socket both sides dialled: the lower peer id runs the handshake as initiator."""
    if my_id == peer_id:
        raise ValueError("cannot punch a connection to ourselves")
    return my_id < peer_id


# ------------------------------------------------------------------------------ schema
def _address(value: object, what: str) -> Address:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and type(value[1]) is int and 0 < value[1] < 65536):
        raise ProtocolError(f"punch {what} must be [ip, port 1..65535], got {str(value)[:80]}")
    try:
        ip = addrscope.parse_ip(value[0])  # ::ffff:127.0.0.1 is 127.0.0.1
    except ValueError:
        raise ProtocolError(f"punch {what} must be an IP address literal, got {value[0][:64]!r}") from None
    # never where a peer on another host can be: a hostile offer must not aim our SYNs (and then
    # our handshake bytes) at services on our own host or link
    if addrscope.unicast_error(ip) is not None or ip.is_loopback:
        raise ProtocolError(f"punch {what} {ip} is not a unicast address another host can have")
    return str(ip), value[1]


def _fields(data: object, kind: str, n: int) -> list:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"punch {kind} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_ENCODED_BYTES:
        raise ProtocolError(f"punch {kind} is {len(data)} bytes, more than {MAX_ENCODED_BYTES}")
    try:
        fields = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True,
                                 max_array_len=8, max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises many types
        raise ProtocolError(f"undecodable punch {kind}: {type(e).__name__}: {e}") from e
    if not (isinstance(fields, list) and len(fields) == n + 2 and fields[0] == VERSION
            and type(fields[0]) is int and fields[1] == kind):
        raise ProtocolError(f"punch {kind} must be a msgpack array [version {VERSION}, {kind!r}, "
                            f"{n} fields]")
    attempt, peer_id, observed, mapping = fields[2:6]
    if not (isinstance(attempt, bytes) and len(attempt) == ATTEMPT_BYTES):
        raise ProtocolError(f"punch attempt id must be {ATTEMPT_BYTES} bytes")
    if not (isinstance(peer_id, str) and _PEER_ID.fullmatch(peer_id)):
        raise ProtocolError("punch peer id must be 40 lowercase hex characters")
    if mapping not in MAPPINGS:
        raise ProtocolError(f"punch mapping must be one of {', '.join(MAPPINGS)}")
    return [attempt, peer_id, _address(observed, "observed address"), mapping, *fields[6:]]


@dataclass(frozen=True)
class PunchOffer:
    """First message: "punch me at ``observed``". ``observed``: where our listening port is seen
    from outside; ``mapping``: :func:`classify_mapping` of it."""

    attempt: bytes
    peer_id: str
    observed: Address
    mapping: str

    @classmethod
    def make(cls, peer_id: str, observed: Address, mapping: str) -> "PunchOffer":
        """A fresh attempt; ValueError on a bad field (ours to fix, not the peer's)."""
        try:
            return cls.decode(cls(os.urandom(ATTEMPT_BYTES), peer_id, observed, mapping).encode())
        except ProtocolError as e:
            raise ValueError(str(e)) from None

    def encode(self) -> bytes:
        return msgpack.packb([VERSION, "offer", self.attempt, self.peer_id, list(self.observed), self.mapping],
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "PunchOffer":
        return cls(*_fields(data, "offer", 4))


@dataclass(frozen=True)
class PunchAnswer:
    """Reply to an offer: the answerer's own address and mapping, when both start (``lead_s``
    seconds after this answer: no clock is compared) and for how long they retry."""

    attempt: bytes
    peer_id: str
    observed: Address
    mapping: str
    lead_s: float
    window_s: float

    @classmethod
    def to(cls, offer: PunchOffer, peer_id: str, observed: Address, mapping: str, *,
           lead_s: float = DEFAULT_LEAD_S, window_s: float = DEFAULT_WINDOW_S) -> "PunchAnswer":
        """ValueError on a bad lead or window (ours to fix, not the peer's)."""
        try:
            return cls.decode(cls(offer.attempt, peer_id, observed, mapping, float(lead_s),
                                  float(window_s)).encode())
        except ProtocolError as e:
            raise ValueError(str(e)) from None

    def encode(self) -> bytes:
        return msgpack.packb([VERSION, "answer", self.attempt, self.peer_id, list(self.observed), self.mapping,
                              float(self.lead_s), float(self.window_s)], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "PunchAnswer":
        attempt, peer_id, observed, mapping, lead_s, window_s = _fields(data, "answer", 6)
        if not (type(lead_s) is float and 0 <= lead_s <= MAX_LEAD_S):
            raise ProtocolError(f"punch lead must be a float within [0, {MAX_LEAD_S}] seconds")
        if not (type(window_s) is float and 0 < window_s <= MAX_WINDOW_S):
            raise ProtocolError(f"punch window must be a float within (0, {MAX_WINDOW_S}] seconds")
        return cls(attempt, peer_id, observed, mapping, lead_s, window_s)


@dataclass(frozen=True)
class PunchPlan:
    """One side's part of an agreed punch: whom to dial, when (``at``: unix time on our clock), for
    how long, and its handshake role."""

    attempt: bytes
    peer_id: str
    remote: Address
    at: float
    window_s: float
    initiator: bool
    prediction: Prediction = field(compare=False)


def plan(my_id: str, offer: PunchOffer, answer: PunchAnswer, *, now: float, rtt_s: float = 0.0) -> PunchPlan:
    """Our plan from the exchanged offer and answer (we are either of the two). ``now``: for the
    answerer, when it sends the answer; for the offerer, when the answer arrived, and ``rtt_s``
    the round trip it measured (offer sent -> answer received; 0 = unknown). Raises
    ProtocolError when they do not belong together, involve us on neither or both sides, or the
    peer names a private address while ours is public."""
    if not (math.isfinite(rtt_s) and rtt_s >= 0):
        raise ValueError(f"rtt_s must be a finite number >= 0, got {rtt_s!r}")
    if offer.attempt != answer.attempt:
        raise ProtocolError("punch answer is for another attempt than the offer")
    if offer.peer_id == answer.peer_id:
        raise ProtocolError("punch offer and answer come from the same peer")
    if my_id not in (offer.peer_id, answer.peer_id):
        raise ProtocolError(f"punch between {offer.peer_id} and {answer.peer_id} does not involve us")
    offerer = my_id == offer.peer_id
    mine, theirs = (offer, answer) if offerer else (answer, offer)
    if addrscope.dial_error(theirs.observed[0], mine.observed[0]) is not None:
        raise ProtocolError(f"peer {theirs.peer_id} names the non-public address {theirs.observed[0]} while we are "
                            "public: refused (it would aim our SYNs into a private network)")
    # the answer took about rtt/2 to reach us: the answerer started that much earlier
    at = now + (max(0.0, answer.lead_s - rtt_s / 2) if offerer else answer.lead_s)
    return PunchPlan(offer.attempt, theirs.peer_id, theirs.observed, at, answer.window_s,
                     is_initiator(my_id, theirs.peer_id), predict(mine.mapping, theirs.mapping))


class PunchBook:
    """Punches in flight, by the address they aim at (sans-IO). During a punch the peer's SYN can
    reach our *listener* instead of our connecting socket (a host without NAT or firewall, or a
    retry gap in a RST race); the host then asks :meth:`inbound` with the accepted connection's
    remote address, and if a plan matches it runs that connection's handshake with the plan's role
    and peer id (and cancels the connect loop) instead of as an ordinary responder."""

    def __init__(self, max_live: int = 64) -> None:
        self.max_live = max_live
        self._live: dict[Address, PunchPlan] = {}

    def add(self, p: PunchPlan) -> None:
        if p.remote in self._live:
            raise PunchFailed(f"a punch to {p.remote[0]}:{p.remote[1]} is already in flight")
        if len(self._live) >= self.max_live:
            raise PunchFailed(f"{self.max_live} punches already in flight")
        self._live[p.remote] = p

    def remove(self, p: PunchPlan) -> None:
        if self._live.get(p.remote) is p:
            del self._live[p.remote]

    def inbound(self, remote: Address) -> PunchPlan | None:
        return self._live.get((remote[0], int(remote[1])))


# ------------------------------------------------------------------------------ asyncio
def punch_socket(local: Address) -> socket.socket:
    """A non-blocking TCP socket bound to our listening address and port. The listener must have
    SO_REUSEPORT too (asyncio: ``create_server(..., reuse_port=True)``)."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # REUSEPORT shares the listener's port; REUSEADDR allows rebinding while an earlier
        # connection from that port sits in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(local)
    except OSError as e:
        sock.close()
        hint = (" (the listening socket needs SO_REUSEPORT: create_server(..., reuse_port=True))"
                if e.errno == errno.EADDRINUSE else "")
        raise PunchFailed(f"cannot bind a punching socket to {local[0]}:{local[1]}: {e}{hint}") from e
    return sock


def _reason(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    return errno.errorcode.get(code, type(e).__name__) if code else type(e).__name__


async def simultaneous_open(local: Address, remote: Address, *, at: float, window_s: float = DEFAULT_WINDOW_S,
                            retry_pause_s: float = RETRY_PAUSE_S,
                            now: Callable[[], float] = time.time) -> socket.socket:
    """At unix time ``at``, connect from ``local`` (our listening address and port) to ``remote``,
    retrying refused attempts after a jittered ``retry_pause_s`` until ``window_s`` has passed
    (at most MAX_ATTEMPTS SYNs); returns the connected non-blocking socket (hand it to
    ``loop.create_connection(..., sock=sock)`` and run the handshake with ``is_initiator``) or
    raises :class:`PunchFailed` listing each attempt's error."""
    if not 0 < window_s <= MAX_WINDOW_S:
        raise ValueError(f"window_s must be within (0, {MAX_WINDOW_S}], got {window_s!r}")
    if not retry_pause_s > 0:
        raise ValueError(f"retry_pause_s must be > 0, got {retry_pause_s!r}")
    if (remote[0], int(remote[1])) == (local[0], int(local[1])):
        raise ValueError(f"cannot punch from {local[0]}:{local[1]} to itself")
    if (":" in local[0]) != (":" in remote[0]):
        raise PunchFailed(f"cannot punch from {local[0]} to {remote[0]}: the address families differ")
    loop = asyncio.get_running_loop()
    delay = at - now()
    if delay > MAX_LEAD_S:
        raise ValueError(f"punch start is {delay:.1f} s ahead, more than {MAX_LEAD_S} s")
    await asyncio.sleep(max(0.0, delay))
    deadline = loop.time() + window_s
    errors: list[str] = []
    while (left := deadline - loop.time()) > 0 and len(errors) < MAX_ATTEMPTS:
        sock = punch_socket(local)
        started = loop.time()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, remote), left)
            peer = sock.getpeername()
            if (peer[0], peer[1]) != (remote[0], int(remote[1])):  # cannot happen on a sane stack
                raise ConnectionError(f"connected to {peer[0]}:{peer[1]}, not the punched address")
            return sock
        except asyncio.TimeoutError:
            sock.close()
            errors.append("no answer to our SYNs")
            break
        except OSError as e:  # refused (RST race), unreachable, 4-tuple still in use, ...
            sock.close()
            errors.append(_reason(e))
        except BaseException:
            sock.close()
            raise
        pause = max(retry_pause_s, loop.time() - started) * random.uniform(0.5, 1.5)
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
    shown = ", ".join(errors[:5]) + (f", ... ({len(errors)} attempts)" if len(errors) > 5 else "")
    limit = f"in {MAX_ATTEMPTS} attempts" if len(errors) >= MAX_ATTEMPTS else f"within {window_s:g} s"
    raise PunchFailed(f"hole punch from {local[0]}:{local[1]} to {remote[0]}:{remote[1]} did not connect "
                      f"{limit}: {shown or 'no attempt'} (a NAT with address/port-dependent "
                      "mapping on either side cannot be punched; use a relay)")
