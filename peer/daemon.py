"""The peer daemon behind `peer join`: one identity, one PeerHost, one coordinator session.

Lifecycle: load/create the identity -> be admitted (a credential for this key: cached in
``<key>.cred`` or redeemed from a join string, the closed swarm's token or open admission;
peer/access.py) -> listen (PeerHost, whose handshakes show that credential and require one from
the same authority) -> join the coordinator -> heartbeat
every interval the coordinator dictates, carrying stats (measured throughput, the link matrix
row: ping RTT and transport rtt/bandwidth per peer) -> keep the mesh view (a route for every
live peer) -> ping peers so links carry real encrypted traffic -> start role plug-ins -> on stop,
stop roles, leave, close. When the coordinator is unreachable the daemon keeps the last mesh and
retries with capped exponential backoff; a heartbeat answered "unknown/dead peer" makes it join
again, so a restarted or wiped coordinator repopulates itself.

Revocation: every heartbeat answer lists the identities the coordinator revoked; the daemon
hands them to ``PeerHost.revoke`` (their connections close, their handshakes are refused). A
daemon whose own identity is revoked stops: ``run`` raises DaemonError ("revoked ... ask the
operator for a new invite"), so `peer join` exits 1 rather than retrying a key that will never
be accepted again. A credential nearing expiry is renewed in the heartbeat loop.

Reach (issue 15): the coordinator dials every joiner back; the daemon reads the outcome from its
own row of the view (``reachable``) and the address the coordinator saw it come from (the join
answer's ``observed``: without ``--announce``, a peer listening on a wildcard address announces
that IP with its listen port, so a router that forwards the port just works). Reachable peers
relay for the others unless ``--no-relay`` (``--relay-rate`` caps it); an unreachable peer
reserves at 1-2 relays picked by measured RTT and load (:func:`peer.reach.pick_relays`) and
publishes them in its heartbeat (``stats.reach``); the view carries every peer's relays, so the
mesh routes (``PeerHost.add_route``) reach an unreachable peer by reversal (when we are
reachable), a relay circuit, or a hole punch upgraded from it. Each link row of the heartbeat
says its ``path`` (direct | reversed | punched | relayed) for the status page.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from peer import metrics
from peer.access import Admission, AdmissionError, CredentialCache, needs_renewal
from peer.credentials import Credential
from peer.defaults import DEFAULT_KEY_PATH, DEFAULT_LISTEN
from peer.errors import LowbandError
from peer.identity import Identity
from peer.membership import (CoordinatorAuthError, CoordinatorClient, CoordinatorError,
                             CoordinatorUnavailable, NotRegistered, PeerBanned, Revoked)
from peer.reach import Reach, Route, pick_relays, relay_candidates, route_for
from peer.roles import Role, load_role
from peer.transport import PeerHost, split_address

log = logging.getLogger("lowband.peer.daemon")

PING_METHOD = "lowband.ping"


class DaemonError(LowbandError):
    """The daemon cannot start or keep going (bad config, fatal coordinator answer)."""


def parse_address(address: str, what: str) -> tuple[str, int]:
    """"host:port" -> (host, port), as a DaemonError naming the flag when malformed."""
    try:
        host, port = split_address(address)
    except ValueError:
        raise DaemonError(f"{what} {address!r} is not HOST:PORT") from None
    if not host or not 0 <= port < 65536:
        raise DaemonError(f"{what} {address!r} is not HOST:PORT")
    return host, port


@dataclass
class DaemonConfig:
    """How a peer runs. Admission: ``join`` (a join string: invite or open swarm; its URL unless
    ``coordinator`` overrides it), ``token`` (closed swarm, >= 128 bits), or neither (a coordinator
    started with ``--open``). ``insecure``: allow plain http to a non-loopback coordinator."""

    coordinator: str | None = None
    token: str | None = None
    join: str | None = None
    insecure: bool = False
    listen: str = DEFAULT_LISTEN
    announce: str | None = None           # address other peers dial; default: the listen address
    key_path: Path = DEFAULT_KEY_PATH
    device: str = "auto"                  # auto | cpu | cuda
    roles: dict[str, str] = field(default_factory=dict)  # role name -> its argument
    role_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> its options
    ping_interval: float = 2.0
    request_timeout: float = 5.0          # per coordinator request and per ping
    max_backoff: float = 5.0              # cap of the reconnect backoff, seconds
    metrics_port: int | None = None       # serve Prometheus /metrics on the listen host; 0 = any port
    relay: bool = True                    # relay for unreachable peers when we are reachable
    relay_rate: float | None = None       # cap of all relayed traffic, bytes/s (None: uncapped)
    access: Admission = field(init=False, repr=False)  # resolved from coordinator/join/token

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise DaemonError(f"device must be auto, cpu or cuda, not {self.device!r}")
        try:
            self.access = Admission.make(url=self.coordinator, join=self.join, token=self.token,
                                         insecure=self.insecure)
        except AdmissionError as e:
            raise DaemonError(str(e)) from None
        self.coordinator = self.access.url
        if self.ping_interval <= 0 or self.request_timeout <= 0:
            raise DaemonError("ping interval and request timeout must be positive")
        parse_address(self.listen, "--listen")
        if self.announce is not None:
            parse_address(self.announce, "--announce")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise DaemonError(f"--metrics-port {self.metrics_port} is not a TCP port")
        if self.relay_rate is not None and not self.relay_rate > 0:
            raise DaemonError(f"--relay-rate must be positive, not {self.relay_rate}")


def resolve_device(requested: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu. torch is imported lazily (auto/cuda only)."""
    if requested != "auto":
        if requested == "cuda" and not _cuda_available():
            raise DaemonError("--device cuda requested but torch reports no CUDA device")
        return requested
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def device_memory(device: str) -> int | None:
    """Total bytes of memory on ``device`` (None when the platform does not say)."""
    if device == "cuda":
        import torch
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def measure_throughput(device: str, seconds: float = 0.2) -> float:
    """Measured float32 matmul rate in FLOP/s on ``device`` (a short, honest probe; roles report
    their own task throughput — samples/s, tokens/s — through :meth:`PeerDaemon.report`)."""
    n = 256
    if device == "cuda":
        import torch
        a = torch.randn(n, n, device="cuda")
        matmul, sync = (lambda: a @ a), torch.cuda.synchronize
    else:
        import numpy as np
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        matmul, sync = (lambda: a @ a), (lambda: None)
    matmul()
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul()
        reps += 1
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def outbound_host(coordinator_url: str) -> str:
    """The local IP the OS would use to reach the coordinator (no packet is sent)."""
    target = urlparse(coordinator_url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class PeerDaemon:
    """A running peer. Use :meth:`start`, then :meth:`run` until it returns or is cancelled,
    then :meth:`stop` (leaves the swarm)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.identity: Identity | None = None
        self.host: PeerHost | None = None
        self.client: CoordinatorClient | None = None
        self.device = "cpu"
        self.address = ""                     # announced address
        self.meta: dict[str, Any] = {}
        self.mesh: dict[str, str] = {}        # live peer id -> address (excluding self)
        self.routes: dict[str, Route] = {}    # live peer id -> how we reach it
        self.reachable: bool | None = None    # did the coordinator's dial-back reach us? None: not yet
        self.observed: str | None = None      # our IP as the coordinator saw it
        self.reservations: dict[str, str] = {}  # relay peer id -> address, reserved there now
        self._reserving: dict[str, asyncio.Task] = {}
        self._published_relays: list[str] = []  # our relays as the coordinator's view lists them
        self.ping_rtt: dict[str, float] = {}  # peer id -> last ping round trip, seconds
        self.ping_counts: dict[str, list[int]] = {}  # peer id -> [ok, failed]
        self.heartbeat_interval = 2.0
        self.peer_timeout = 10.0
        self.registered = False
        self.view: str | None = None          # id of the coordinator's peer list we hold
        self.revoked: set[str] = set()        # identities the coordinator revoked, cut from the mesh
        self.coordinator_reachable = True
        self.roles: dict[str, Role] = {}
        self._running_roles: list[tuple[str, Role]] = []
        self._reported: dict[str, Any] = {}
        self._metrics_runner: Any = None      # aiohttp runner of the /metrics server
        self.metrics_url: str | None = None
        self._started_at = time.time()

    @property
    def peer_id(self) -> str:
        assert self.identity is not None, "daemon not started"
        return self.identity.peer_id

    def report(self, key: str, value: Any) -> None:
        """Let roles publish a stat (JSON-able) in every following heartbeat, e.g.
        report("throughput", tokens_per_s) replaces the startup matmul figure. The two
        well-known role stats also feed this peer's Prometheus metrics (peer.metrics):
        "train" {step, ...} once per outer step, "serve" {model, sessions, tokens_per_s, ...}."""
        self._reported[key] = value
        if not isinstance(value, dict):
            return
        if key == "train" and isinstance(value.get("step"), int):
            metrics.record_outer_step(value["step"], value.get("loss"))
        elif key == "serve" and isinstance(value.get("model"), str):
            metrics.set_inference(value["model"], tokens_per_s=value.get("tokens_per_s") or 0.0,
                                  sessions=value.get("sessions") or 0)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        # Roles resolve first so a missing plug-in fails before anything listens or joins.
        self.roles = {name: load_role(name, arg, cfg.role_options.get(name))
                      for name, arg in cfg.roles.items()}
        try:
            self.identity = Identity.load_or_create(cfg.key_path)
        except (OSError, ValueError) as e:
            raise DaemonError(f"cannot load or create key {cfg.key_path}: {e}") from e
        self.device = await asyncio.to_thread(resolve_device, cfg.device)
        throughput = await asyncio.to_thread(measure_throughput, self.device)
        self.meta = {"device": self.device, "memory": device_memory(self.device),
                     "roles": sorted(cfg.roles), "throughput": throughput, "pid": os.getpid(),
                     "relay": cfg.relay}
        self.client = CoordinatorClient(None, None, self.identity, access=cfg.access,
                                        cache=CredentialCache(cfg.key_path),
                                        timeout=cfg.request_timeout)
        credential = await self._admit_with_retry()
        lacking = sorted(set(cfg.roles) - credential.roles)
        if lacking:
            raise DaemonError(f"this peer's credential allows roles {sorted(credential.roles)}, not "
                              f"{', '.join(lacking)}: ask for an invite with --role {lacking[0]}")
        # The mesh trusts credentials of this coordinator only; a swarm token, when there is one,
        # was the proof of admission and is not needed on the mesh (peers admitted by invite do
        # not know it).
        self.host = PeerHost(self.identity, None, credential=credential,
                             authority=credential.authority, relay=cfg.relay,
                             relay_rate=cfg.relay_rate)
        listen_host, listen_port = parse_address(cfg.listen, "--listen")
        try:
            await self.host.start(listen_host, listen_port)
        except OSError as e:
            raise DaemonError(f"cannot listen on {cfg.listen}: {e.strerror or e}") from e
        self.host.handle(PING_METHOD, self._on_ping)
        if cfg.metrics_port is not None:
            try:
                self._metrics_runner, port = await metrics.start_metrics_server(listen_host,
                                                                                cfg.metrics_port)
            except OSError as e:
                raise DaemonError(f"cannot serve metrics on {listen_host}:{cfg.metrics_port}: "
                                  f"{e.strerror or e}") from e
            shown = listen_host if listen_host not in ("0.0.0.0", "::", "") else \
                outbound_host(cfg.coordinator)
            self.metrics_url = f"http://{shown}:{port}/metrics"
        if cfg.announce:
            self.address = cfg.announce
        else:
            bound_host, bound_port = split_address(self.host.address)
            if bound_host in ("0.0.0.0", "::", ""):
                bound_host = outbound_host(cfg.coordinator)
            self.address = f"{bound_host}:{bound_port}"
        self.host.announce = self.address
        await self._join_with_retry()
        if self._announce_observed():
            await self._join_with_retry()  # the coordinator probes the corrected address
        await self._settle_reach()
        for name, role in self.roles.items():
            try:
                await role.start(self)
            except Exception as e:  # plug-in code: report which role broke, not a traceback
                raise DaemonError(f"role {name!r} failed to start: {type(e).__name__}: {e}") from e
            self._running_roles.append((name, role))

    async def run(self) -> None:
        """Heartbeat and ping until cancelled; raises DaemonError on a fatal coordinator answer."""
        await asyncio.gather(self._heartbeat_loop(), self._ping_loop())

    async def stop(self) -> None:
        """Stop roles, leave the swarm (best effort, bounded), close everything."""
        for task in self._reserving.values():
            task.cancel()
        while self._running_roles:
            name, role = self._running_roles.pop()
            try:
                await asyncio.wait_for(role.stop(), self.config.request_timeout * 2)
            except Exception:  # one broken role must not keep the peer from leaving
                log.exception("role %r failed to stop", name)
        if self.client is not None:
            if self.registered:
                try:
                    await self.client.leave()
                    log.info("left the swarm")
                except CoordinatorError as e:
                    log.warning("could not leave cleanly: %s", e)
            await self.client.close()
        if self.host is not None:
            await self.host.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    # -- coordinator session ---------------------------------------------------------------
    async def _join(self) -> None:
        assert self.client is not None
        if self.host is not None:
            self._show_credential()  # the coordinator probes this address with a handshake
        answer = await self.client.join(self.address, self.meta)
        self.registered = True
        if isinstance(answer.get("observed"), str):
            self.observed = answer["observed"]
        self._apply(answer)
        log.info("joined %s as %s (%d live peers)", self.config.coordinator, self.peer_id[:12],
                 len(answer.get("peers", [])))

    async def _settle_reach(self, wait_s: float = 10.0) -> None:
        """Before roles start: wait (bounded) for the probe's verdict and, unreachable, for the
        view to list our relays, so the first collective does not abort on a peer nobody can
        reach yet. Heartbeats here are the loop's own (run() takes over after)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.reachable is True or (self.reachable is False and self._published_relays):
                return
            await asyncio.sleep(min(self.heartbeat_interval, 0.5))
            try:
                self._apply(await self._timed_heartbeat())
            except CoordinatorError as e:
                log.info("reachability not settled (%s); starting anyway", e)
                return
        log.info("reachability not settled after %.0fs (reachable: %s, relays: %s); starting "
                 "anyway", wait_s, self.reachable, sorted(r[:12] for r in self.reservations))

    def _announce_observed(self) -> bool:
        """Without --announce, a peer listening on every interface announces the IP the
        coordinator saw it come from (its router's, behind a NAT) with its listen port, when
        that differs from the local guess; True when the address changed (join again)."""
        if self.config.announce or self.observed is None or self.host is None:
            return False
        listen_host, _ = split_address(self.host.address or "")
        if listen_host not in ("0.0.0.0", "::", ""):
            return False
        host, port = split_address(self.address)
        if host == self.observed:
            return False
        self.address = self.host.announce = f"{self.observed}:{port}"
        log.info("announcing %s (the address the coordinator sees us at)", self.address)
        return True

    async def _admit_with_retry(self) -> Credential:
        """This key's credential (cached or redeemed), waiting out an unreachable coordinator;
        a refusal (used invite, wrong token, revoked key) or an untrustworthy answer is fatal."""
        assert self.client is not None
        delay = 0.25
        while True:
            try:
                credential = await self.client.admit()
                log.info("admitted by %s: roles %s, credential valid for %.0fs",
                         self.config.coordinator, ",".join(sorted(credential.roles)),
                         credential.expires - time.time())
                return credential
            except CoordinatorUnavailable as e:
                log.warning("%s; retrying in %.1fs", e, delay)
            except (CoordinatorError, AdmissionError) as e:
                raise DaemonError(f"not admitted: {e}") from e
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.config.max_backoff)

    async def _renew_credential(self) -> None:
        """Renew the credential once it nears expiry (best effort: the old one works until it
        expires, the next heartbeat tries again), then show it on the mesh."""
        assert self.client is not None
        current = self.client.credential
        if current is not None and needs_renewal(current):
            try:
                current = await self.client.admit(fresh=True)
                log.info("credential renewed, valid for %.0fs", current.expires - time.time())
            except Revoked:
                raise
            except (CoordinatorError, AdmissionError) as e:
                log.warning("could not renew this peer's credential: %s", e)
        self._show_credential()

    def _show_credential(self) -> None:
        """Make new handshakes present the client's current credential: a renewed one, or the
        one it got when the coordinator had forgotten this key (a wiped database)."""
        assert self.client is not None and self.host is not None
        current = self.client.credential
        if current is None or current is self.host.credential:
            return
        if current.authority != self.host.credential.authority:
            # Token mode only (a join string pins the authority): a coordinator that lost its
            # database signs with a new key, proven by token_mac. Its reachability probe and the
            # peers re-admitted there show credentials of that key, so the mesh follows it;
            # connections up now stay.
            log.warning("the coordinator signs with a new authority key %s... (its database was "
                        "reset?); the mesh now requires credentials from it",
                        current.authority.hex()[:16])
            self.host.set_authority(current.authority, current)
        else:
            self.host.credential = current

    async def _join_with_retry(self) -> None:
        delay = 0.25
        while True:
            try:
                return await self._join()
            except CoordinatorUnavailable as e:
                log.warning("%s; retrying in %.1fs", e, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._backoff_cap())

    def _backoff_cap(self) -> float:
        # Retry well within the coordinator's restart grace period (one peer timeout), so a
        # restarted coordinator hears from every survivor before it may declare anyone dead.
        return max(0.25, min(self.config.max_backoff, self.peer_timeout / 4))

    async def _heartbeat_loop(self) -> None:
        assert self.client is not None
        delay = 0.25
        while True:
            try:
                if self.registered:
                    self._apply(await self._timed_heartbeat())
                else:
                    await self._join()
                await self._renew_credential()
                if not self.coordinator_reachable:
                    log.info("coordinator %s is reachable again", self.config.coordinator)
                self.coordinator_reachable = True
                delay = 0.25
                await asyncio.sleep(self.heartbeat_interval)
            except NotRegistered as e:
                log.warning("coordinator no longer counts this peer (%s); joining again", e)
                self.registered = False
            except CoordinatorUnavailable as e:
                if self.coordinator_reachable:
                    log.warning("%s; keeping the last mesh view and retrying", e)
                self.coordinator_reachable = False
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._backoff_cap())
            except (CoordinatorAuthError, PeerBanned, AdmissionError) as e:
                raise DaemonError(str(e)) from e
            except CoordinatorError as e:  # 4xx we did not expect: report and keep trying
                log.error("coordinator refused the request: %s", e)
                await asyncio.sleep(self.config.max_backoff)

    async def _timed_heartbeat(self) -> dict:
        assert self.client is not None
        start = time.perf_counter()
        try:
            answer = await self.client.heartbeat(self.collect_stats(), self.view)
        except NotRegistered:
            metrics.HEARTBEATS.labels("unregistered").inc()
            raise
        except CoordinatorUnavailable:
            metrics.HEARTBEATS.labels("unavailable").inc()
            raise
        except CoordinatorError:
            metrics.HEARTBEATS.labels("refused").inc()
            raise
        metrics.HEARTBEAT_SECONDS.observe(time.perf_counter() - start)
        metrics.HEARTBEATS.labels("ok").inc()
        return answer

    def _apply(self, answer: dict) -> None:
        """Take the coordinator's view: heartbeat interval, revoked identities (cut from the
        mesh) and live peers -> mesh routes."""
        for key in ("heartbeat_interval", "peer_timeout"):
            value = answer.get(key)
            if isinstance(value, (int, float)) and value > 0:
                setattr(self, key, float(value))
        self._apply_revoked(answer.get("revoked"))
        if "peers" not in answer:  # our view is current (see CoordinatorClient.heartbeat)
            return
        view = answer.get("view")
        self.view = view if isinstance(view, str) else None
        rows = {str(p["peer_id"]): p for p in answer["peers"]
                if isinstance(p, dict) and isinstance(p.get("peer_id"), str)
                and isinstance(p.get("address"), str) and p["peer_id"] not in self.revoked}
        mine = rows.pop(self.peer_id, None)
        if mine is not None:
            self._learn_reachability(mine)
            self._published_relays = [r for r in mine.get("relays") or () if r in rows]
        routes: dict[str, Route] = {}
        for peer_id, row in rows.items():
            # Direct dials only to addresses the coordinator verified (dialled back): a joiner
            # must not be able to aim the swarm's pings at a third party. Others: their relays.
            route = route_for(row, rows)
            if route is not None:
                routes[peer_id] = route
        assert self.host is not None
        for peer_id, route in routes.items():
            if self.routes.get(peer_id) != route:
                self.host.add_route(peer_id, route.address, relays=route.relays,
                                    reachable=route.reachable)
                how = route.address if route.reachable else \
                    "relays " + ",".join(r[:12] for r, _ in route.relays)
                log.info("mesh: + %s at %s", peer_id[:12], how)
        for peer_id in set(self.mesh) - set(routes):
            log.info("mesh: - %s", peer_id[:12])
            self._forget(peer_id)
        self.routes = routes
        self.mesh = {peer_id: route.address for peer_id, route in routes.items()}
        metrics.MESH_PEERS.set(len(routes))
        self._choose_relays(rows.values())

    def _learn_reachability(self, mine: dict) -> None:
        """Our own view row: the probe's verdict (and, unreachable, where punches aim)."""
        assert self.host is not None
        reachable = mine.get("reachable")
        if not isinstance(reachable, bool) or reachable is self.reachable:
            return
        self.reachable = self.host.reachable = reachable
        if reachable:
            log.info("the coordinator reached us at %s: others dial us directly%s", self.address,
                     "; relaying for unreachable peers" if self.config.relay else "")
            return
        log.warning("the coordinator cannot dial %s (NAT or firewall?): peers reach us through "
                    "relays", self.address)
        observed = mine.get("observed")
        if isinstance(observed, str) and self.host.address:
            # Only the IP was seen (from an ephemeral port): assume the router keeps our port.
            _, port = split_address(self.host.address)
            self.host.set_observed((observed, port))

    def _choose_relays(self, rows) -> None:
        """Unreachable: hold reservations at the best 1-2 relays of the view; release others."""
        if self.reachable is not False:
            return
        assert self.host is not None
        candidates = relay_candidates(rows, self.peer_id)
        by_id = {str(c["peer_id"]): str(c["address"]) for c in candidates}
        wanted = pick_relays(candidates, self.ping_rtt, keep=list(self.reservations))
        for relay_id in set(self.reservations) - set(wanted):
            log.info("relay %s released", relay_id[:12])
            self.host.release(relay_id)
            self.reservations.pop(relay_id, None)
        for relay_id in wanted:
            task = self._reserving.get(relay_id)
            if relay_id not in self.reservations and (task is None or task.done()):
                self._reserving[relay_id] = asyncio.create_task(
                    self._reserve(relay_id, by_id[relay_id]))

    async def _reserve(self, relay_id: str, address: str) -> None:
        assert self.host is not None
        try:
            await self.host.reserve(relay_id, address)
        except (LowbandError, OSError) as e:
            log.warning("reservation at relay %s failed: %s", relay_id[:12], e)
            return
        self.reservations[relay_id] = address
        log.info("reserved at relay %s (%s): peers reach us through it", relay_id[:12], address)

    def _forget(self, peer_id: str) -> None:
        self.mesh.pop(peer_id, None)
        self.routes.pop(peer_id, None)
        if self.reservations.pop(peer_id, None) is not None and self.host is not None:
            self.host.release(peer_id)
        self.ping_rtt.pop(peer_id, None)
        self.ping_counts.pop(peer_id, None)

    def _apply_revoked(self, revoked: Any) -> None:
        if not isinstance(revoked, list):
            return
        fresh = {p for p in revoked if isinstance(p, str)} - self.revoked
        if not fresh:
            return
        if self.peer_id in fresh:
            raise Revoked(f"coordinator {self.config.coordinator} revoked this peer's identity; "
                          "ask the operator for a new invite (and use a new --key)", status=403,
                          code="revoked")
        assert self.host is not None
        self.revoked |= fresh
        self.host.revoke(sorted(fresh))
        for peer_id in fresh & set(self.mesh):
            log.info("mesh: - %s (revoked)", peer_id[:12])
            self._forget(peer_id)
        metrics.MESH_PEERS.set(len(self.mesh))
        log.info("cut %d revoked identit%s from the mesh", len(fresh), "y" if len(fresh) == 1 else "ies")

    def collect_stats(self) -> dict:
        """Heartbeat stats: throughput, mesh size, and this peer's row of the link matrix."""
        assert self.host is not None
        links = {}
        connected = set(self.host.connected_peers())
        for peer_id in self.mesh:
            row: dict[str, Any] = {"connected": peer_id in connected}
            if peer_id in self.ping_rtt:
                row["ping_rtt_s"] = round(self.ping_rtt[peer_id], 6)
            ok, failed = self.ping_counts.get(peer_id, (0, 0))
            row["pings_ok"], row["pings_failed"] = ok, failed
            link = self.host.link_stats(peer_id)
            row.update(rtt_s=link.rtt_s, bandwidth_Bps=link.bandwidth_Bps,
                       bytes_sent=link.bytes_sent, bytes_received=link.bytes_received)
            path = self.host.link_path(peer_id)
            if path is not None:
                row["path"] = path
            links[peer_id] = row
        relay = self.host.relay
        reach = Reach(relay=relay is not None and self.reachable is True,
                      load=len(relay.reserved) if relay is not None else 0,
                      relays=tuple(sorted(self.reservations)))
        return {"throughput": self.meta.get("throughput"), "mesh_size": len(self.mesh),
                "uptime_s": round(time.time() - self._started_at, 3), "links": links,
                "reach": reach.to_json(), **self._reported}

    # -- peer traffic ----------------------------------------------------------------------
    async def _on_ping(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        return {"t": header.get("t")}, payload

    async def ping(self, peer_id: str) -> float:
        """One encrypted RPC round trip to ``peer_id`` (dialing first if needed, bounded by the
        request timeout); returns and records the RTT in seconds."""
        assert self.host is not None
        start = time.perf_counter()
        await asyncio.wait_for(self.host.call(peer_id, PING_METHOD, {"t": time.time()}, b"",
                                              timeout=self.config.request_timeout),
                               self.config.request_timeout)
        rtt = time.perf_counter() - start
        first = peer_id not in self.ping_rtt
        self.ping_rtt[peer_id] = rtt
        self.ping_counts.setdefault(peer_id, [0, 0])[0] += 1
        if first:
            log.info("ping %s ok, rtt %.2f ms", peer_id[:12], rtt * 1e3)
        return rtt

    async def _ping_one(self, peer_id: str) -> None:
        try:
            await self.ping(peer_id)
        except (LowbandError, TimeoutError) as e:
            if peer_id in self.mesh:
                self.ping_counts.setdefault(peer_id, [0, 0])[1] += 1
            log.debug("ping %s failed: %s", peer_id[:12], e or type(e).__name__)

    async def _ping_loop(self) -> None:
        """Ping every mesh peer each interval; a slow or unreachable peer only delays itself."""
        inflight: dict[str, asyncio.Task] = {}
        try:
            while True:
                inflight = {p: t for p, t in inflight.items() if not t.done()}
                for peer_id in self.mesh:
                    if peer_id not in inflight:
                        inflight[peer_id] = asyncio.create_task(self._ping_one(peer_id))
                await asyncio.sleep(self.config.ping_interval)
        finally:
            for task in inflight.values():
                task.cancel()
            await asyncio.gather(*inflight.values(), return_exceptions=True)
