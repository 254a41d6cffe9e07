"""Reachability: the coordinator dials back each joiner's announced address (issue 15 item 1).

At join the registry records the address the request came from (``observed``) and hands the
announced address to the :class:`Prober`, which opens one real TCP connection to it and runs the
mesh handshake as initiator with ``expected_peer_id`` = the joiner, then closes. The peer is
``reachable`` only if whoever answers there proves it holds the joiner's key; a peer that
announces someone else's address (another peer's, or a third party's service) is marked
unreachable, and peers dial only verified addresses (the ``reachable`` field of the membership
view). The probe's RTT is the TCP connect time (one SYN / SYN-ACK round trip).

The coordinator is a mesh participant only for this probe: its handshakes come from a factory
(``make_handshake(expected_peer_id) -> Handshake``), built from the swarm token
(:func:`token_handshakes`) or from a credential the coordinator issues to a fresh key of its own
with role ``operator`` (:func:`credential_handshakes`).

Why the swarm cannot be aimed at a third party through it: each join probes its announced
address once (never again on heartbeats); probes run at most ``ProbeLimits.concurrency`` at a
time and are paced (:class:`Pacer`) to ``rate_per_s`` overall and ``per_host_rate_per_s`` per
target IP after a burst: a probe that would have to wait more than ``max_wait_s`` is not made;
each is bounded by ``timeout_s`` end to end and by the handshake's frame limit in bytes; and a
probe only reads the handshake, it sends nothing else. A joiner from a public address cannot
have the coordinator dial a loopback or private address (:func:`private_target`); the announced
name is resolved once and exactly the checked address is dialled. A probe refused by a limit
leaves the peer unverified (``reachable`` false, ``probe_error`` says why); joining again
retries.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from peer.errors import LowbandError
from peer.handshake import MAX_HANDSHAKE_FRAME, Handshake
from peer.identity import Identity

if TYPE_CHECKING:
    from aiohttp import web

    from coordinator.registry import MembershipRegistry

log = logging.getLogger("lowband.coordinator.reachability")

HandshakeFactory = Callable[[str], Handshake]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The handshake's messages are a few hundred bytes each; more than this before it is done is not
# a lowband peer.
MAX_PROBE_READ = 4 * MAX_HANDSHAKE_FRAME


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    rtt_s: float | None  # TCP connect time
    error: str | None    # why not reachable (None when reachable)


@dataclass(frozen=True)
class ProbeLimits:
    timeout_s: float = 5.0            # one probe, connect + handshake
    concurrency: int = 16             # probes in flight
    max_queued: int = 4096            # probes waiting (paced or for a slot); beyond: not probed
    rate_per_s: float = 50.0          # probes started, all targets together
    burst: int = 200
    per_host_rate_per_s: float = 1.0  # probes of one target IP (many peers behind one NAT or on
    per_host_burst: int = 32          # one machine join at once: hence the burst)
    max_wait_s: float = 30.0          # longest a probe is delayed by pacing; beyond: not probed

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.concurrency < 1 or self.max_queued < 0:
            raise ValueError("probe timeout must be > 0, concurrency >= 1, max_queued >= 0")
        if (min(self.rate_per_s, self.per_host_rate_per_s) <= 0
                or min(self.burst, self.per_host_burst) < 1):
            raise ValueError("probe rates must be > 0 and bursts >= 1")


class Pacer:
    """Per-key pacing (the generic cell rate algorithm): ``burst`` events at once, then one per
    1/``rate`` s. :meth:`reserve` books the next slot and says how long to wait for it, or None
    when that is beyond ``max_wait`` (nothing booked). At most ``max_keys`` keys are kept."""

    def __init__(self, rate: float, burst: int, max_wait: float, *, max_keys: int = 65536) -> None:
        self.interval, self.tolerance, self.max_wait = 1.0 / rate, burst / rate, max_wait
        self.max_keys = max_keys
        self._tat: OrderedDict[str, float] = OrderedDict()  # key -> theoretical arrival time

    def reserve(self, key: str, now: float) -> float | None:
        tat = max(self._tat.pop(key, now), now)
        wait = max(0.0, tat + self.interval - self.tolerance - now)
        if wait > self.max_wait:
            self._tat[key] = tat
            return None
        self._tat[key] = tat + self.interval
        while len(self._tat) > self.max_keys:
            self._tat.popitem(last=False)
        return wait


def split_host(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def probe(address: str, handshake: Handshake, *, timeout_s: float) -> ProbeResult:
    """Dial ``address`` and run ``handshake`` (initiator) to completion, then hang up."""
    try:
        host, port = split_host(address)
    except ValueError as e:
        return ProbeResult(False, None, str(e))
    deadline = time.monotonic() + timeout_s
    writer = None
    try:
        started = time.perf_counter()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        rtt = time.perf_counter() - started
        read = 0
        while not handshake.done:
            out = handshake.data_to_send()
            if out:
                writer.write(out)
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            data = await asyncio.wait_for(reader.read(MAX_HANDSHAKE_FRAME), left)
            if not data:
                return ProbeResult(False, rtt, "connection closed during the handshake")
            read += len(data)
            if read > MAX_PROBE_READ:
                return ProbeResult(False, rtt, f"more than {MAX_PROBE_READ} bytes before the "
                                               "handshake finished: not a lowband peer")
            handshake.receive_data(data)
        if out := handshake.data_to_send():
            writer.write(out)
            await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
        return ProbeResult(True, rtt, None)
    except asyncio.TimeoutError:
        return ProbeResult(False, None, f"no handshake within {timeout_s:g}s")
    except LowbandError as e:  # AuthError (another peer id, wrong token) or ProtocolError
        if writer is not None and (reject := handshake.data_to_send()):
            writer.write(reject)  # the REJECT with the reason, for the other side's log
        return ProbeResult(False, None, f"{type(e).__name__}: {e}"[:300])
    except OSError as e:
        return ProbeResult(False, None, f"cannot connect: {e.strerror or e}"[:300])
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass


Record = Callable[[str, int, ProbeResult], Awaitable[object]]


def private_target(ip: IPAddress, observed: str | None) -> str | None:
    """Why a peer that joined from ``observed`` may not have ``ip`` probed, or None. A joiner
    coming from a public address cannot make the coordinator dial its own loopback or private
    networks (other peers could not reach such an address from the internet either)."""
    try:
        source = ipaddress.ip_address(observed) if observed else None
    except ValueError:
        return None
    if source is not None and source.is_global and not ip.is_global:
        return (f"not probed: announced a non-public address while joining from a public one "
                f"({ip})")
    return None


class Prober:
    """Schedules at most one bounded probe per join and records each outcome."""

    def __init__(self, make_handshake: HandshakeFactory, record: Record,
                 limits: ProbeLimits | None = None) -> None:
        self.make_handshake = make_handshake
        self.record = record
        self.limits = limits = limits or ProbeLimits()
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._overall = Pacer(limits.rate_per_s, limits.burst, limits.max_wait_s, max_keys=1)
        self._per_host = Pacer(limits.per_host_rate_per_s, limits.per_host_burst, limits.max_wait_s)
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def schedule(self, peer_id: str, incarnation: int, address: str,
                 observed: str | None = None) -> None:
        """Probe ``address`` for ``peer_id`` in the background (never raises). ``observed``: the
        address the join came from (see :func:`private_target`)."""
        if self._closed:
            return
        refused = None
        if len(self._tasks) >= self.limits.concurrency + self.limits.max_queued:
            refused = "not probed: too many probes pending; join again later"
        else:
            try:
                split_host(address)
            except ValueError as e:
                refused = str(e)
        coro = (self._record(peer_id, incarnation, ProbeResult(False, None, refused))
                if refused else self._run(peer_id, incarnation, address, observed))
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, peer_id: str, incarnation: int, address: str, observed: str | None) -> None:
        try:
            result = await self._probe(peer_id, address, observed)
        except Exception as e:  # a bug must still leave an outcome, never "probing" forever
            log.exception("probe of %s at %s failed", peer_id[:12], address)
            result = ProbeResult(False, None, f"probe failed: {type(e).__name__}")
        log.info("probe of %s at %s: %s", peer_id[:12], address,
                 f"reachable, rtt {result.rtt_s * 1e3:.1f} ms" if result.reachable else result.error)
        await self._record(peer_id, incarnation, result)

    async def _probe(self, peer_id: str, address: str, observed: str | None) -> ProbeResult:
        host, port = split_host(address)
        try:  # resolve once, check, and dial exactly the address that was checked
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM), self.limits.timeout_s)
            ip = ipaddress.ip_address(infos[0][4][0])
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
            return ProbeResult(False, None, f"cannot resolve {host}: {e}"[:300])
        if reason := private_target(ip, observed):
            return ProbeResult(False, None, reason)
        now = time.monotonic()
        host_wait = self._per_host.reserve(str(ip), now)
        if host_wait is None:
            return ProbeResult(False, None, f"not probed: {ip} was probed too often (limit "
                                            f"{self.limits.per_host_rate_per_s:g}/s after "
                                            f"{self.limits.per_host_burst}); join again later")
        overall_wait = self._overall.reserve("", now)
        if overall_wait is None:
            return ProbeResult(False, None, "not probed: too many joins to probe now; join again later")
        await asyncio.sleep(max(host_wait, overall_wait))
        try:
            hs = self.make_handshake(peer_id)
        except Exception as e:  # e.g. the credential could not be issued
            log.error("cannot build a probe handshake: %s: %s", type(e).__name__, e)
            return ProbeResult(False, None, "coordinator cannot probe (see its log)")
        target = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        async with self._slots:
            return await probe(target, hs, timeout_s=self.limits.timeout_s)

    async def _record(self, peer_id: str, incarnation: int, result: ProbeResult) -> None:
        try:
            await self.record(peer_id, incarnation, result)
        except Exception:
            log.exception("recording the probe of %s failed", peer_id[:12])

    async def wait_idle(self) -> None:
        """Wait for every scheduled probe to finish (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


# -- handshake factories --------------------------------------------------------------------------
def token_handshakes(token: bytes, identity: Identity | None = None) -> HandshakeFactory:
    """Token mode: the coordinator knows the swarm token; its probe key is fresh by default."""
    identity = identity or Identity.generate()
    return lambda peer_id: Handshake(identity, token, initiator=True, expected_peer_id=peer_id)


def credential_handshakes(authority: Identity, token: bytes | None = None, *,
                          lifetime_s: float = 86400.0,
                          now: Callable[[], float] = time.time) -> HandshakeFactory:
    """Credential mode: a fresh probe key holding an ``operator`` credential the coordinator
    issues itself from its authority key (renewed when less than half its lifetime is left);
    ``token`` too when the mesh also checks a swarm token."""
    from peer.credentials import issue  # the credential layer (contract C1)

    identity = Identity.generate()
    held: list = []

    def make(peer_id: str) -> Handshake:
        t = now()
        if not held or held[0].expires - t < lifetime_s / 2:
            held[:] = [issue(authority, identity.public_bytes, ["operator"], now=t,
                             lifetime_s=lifetime_s, serial=0)]
        return Handshake(identity, token, initiator=True, expected_peer_id=peer_id,
                         credential=held[0], authority=authority.public_bytes, now=now)
    return make


# -- wiring ---------------------------------------------------------------------------------------
def setup_reachability(app: "web.Application", registry: "MembershipRegistry",
                       make_handshake: HandshakeFactory, limits: ProbeLimits | None = None) -> Prober:
    """Attach a prober to ``registry`` (every join is probed from now on) and stop it with the
    app. A registry that has one keeps it."""
    if registry.prober is not None:
        return registry.prober

    async def record(peer_id: str, incarnation: int, result: ProbeResult) -> None:
        await registry.set_reachability(peer_id, incarnation, result.reachable, result.rtt_s,
                                        result.error)

    prober = registry.prober = Prober(make_handshake, record, limits)

    async def lifecycle(app: "web.Application"):
        yield
        registry.prober = None
        await prober.close()

    app.cleanup_ctx.append(lifecycle)
    return prober
