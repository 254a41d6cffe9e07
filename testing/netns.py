"""Kernel-shaped test networks: N Linux network namespaces on one bridge (root only).

Userspace relays (testing.netem) shape delay and stalls; kernel shaping is for what a relay cannot
do honestly -- a token-bucket rate limit that TCP must probe against (``tc tbf``) and random
packet loss (``nft ... numgen random``). Layout, all inside namespaces this module creates, so
the host's own interfaces, addresses and routes are never touched:

    <prefix>-sw : bridge br0 (no address) + one veth end p<i> per peer, tbf = peer i's download
    <prefix>-<i>: eth0 with an address from a private test subnet, tbf = peer i's upload,
                  optional nft rule dropping loss_pct % of the packets arriving at eth0

Names carry the pid and a per-process counter so concurrent runs never clash; everything is
deleted by the names it created on ``close()``, on leaving the ``with`` block, and at exit;
namespaces of a run killed before it could clean up are removed by the next build
(``remove_stale``: the pid in the name is no longer alive). Deleting a namespace also deletes
what lives only inside it: its veth ends (and so their peers), bridges, qdiscs and nft tables;
no link, route or table is ever made in the host's own namespace.

``NamespaceSet`` is the lifecycle both labs share (create by name, run and kill processes inside,
delete); ``shape_link`` puts one ``LinkShape`` on the two ends of a veth. ``testing.nat.NatLab``
builds home routers doing NAT on top of them.

This module imports on any OS (stdlib only); building raises ``NetnsUnavailable`` where
namespaces cannot be made (not Linux, not root, ``ip``/``tc``/``nft`` missing).
"""
from __future__ import annotations

import atexit
import ipaddress
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

_COMMAND_TIMEOUT_S = 15.0
_TOOLS = ("ip", "tc", "nft")
_NFT_TABLE = "lowband_loss"
_PREFIX = "lowband"
# <prefix>-<pid>-<lab counter>-<member>; members are "sw", a number or a short lowercase name.
_NAME = re.compile(rf"{_PREFIX}-(\d+)-\d+-[a-z0-9]+")
_counter = itertools.count()
_live: "set[NamespaceSet]" = set()
_Lab = TypeVar("_Lab", bound="NamespaceSet")


class NetnsError(RuntimeError):
    """A namespace command failed; the message holds the command and its stderr."""


class NetnsUnavailable(NetnsError):
    """Namespaces cannot be built here (see unavailable_reason())."""


def unavailable_reason(need_nft: bool = True, need_nat: bool = False) -> str | None:
    """Why this process cannot build namespaces, or None if it can. ``need_nat``: also the
    kernel's NAT (nft masquerade, which needs the nf_nat modules testing/nat.py's routers use)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return "network namespaces need root"
    missing = [tool for tool in _TOOLS if (tool != "nft" or need_nft or need_nat) and shutil.which(tool) is None]
    if missing:
        return "missing commands: " + ", ".join(missing) + " (apt-get install iproute2 nftables)"
    return _nat_unavailable() if need_nat else None


_NAT_PROBE: list[str | None] = []


def _nat_unavailable() -> str | None:
    """Load a masquerade rule in a throwaway namespace once per process; the error if it fails."""
    if not _NAT_PROBE:
        name = f"lowband-{os.getpid()}-natprobe"
        rules = "table ip probe {\n chain post {\n  type nat hook postrouting priority 100;\n  masquerade\n }\n}\n"
        try:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
            try:
                done = subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=rules,
                                      capture_output=True, text=True, timeout=10)
                _NAT_PROBE.append(None if done.returncode == 0 else
                                  f"the kernel refuses nft masquerade: {done.stderr.strip()[:200]}")
            finally:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as e:
            _NAT_PROBE.append(f"cannot make a network namespace: {e}")
    return _NAT_PROBE[0]


@dataclass(frozen=True)
class LinkShape:
    """Kernel shaping of one peer's access link.

    rate_mbit: tbf rate applied to upload and download separately; None = unshaped.
    burst_bytes: tbf bucket; must exceed the MTU (64 KiB on loopback-sized segments with GSO),
        256 KiB is what the 100 Mbit/s bench figures were measured with
        (docs/architecture.md §Measuring performance).
    tbf_latency_ms: longest a packet may wait in the tbf queue before being dropped.
    loss_pct: percent of packets arriving at the peer dropped at random (0 .. 100).
    """

    rate_mbit: float | None = None
    burst_bytes: int = 256 * 1024
    tbf_latency_ms: float = 50.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not (math.isfinite(self.rate_mbit) and self.rate_mbit > 0):
            raise ValueError(f"rate_mbit must be > 0 or None, got {self.rate_mbit!r}")
        if not (isinstance(self.burst_bytes, int) and self.burst_bytes >= 2048):
            raise ValueError(f"burst_bytes must be an int >= 2048 (more than one MTU), got {self.burst_bytes!r}")
        if not (math.isfinite(self.tbf_latency_ms) and self.tbf_latency_ms > 0):
            raise ValueError(f"tbf_latency_ms must be > 0, got {self.tbf_latency_ms!r}")
        if not (math.isfinite(self.loss_pct) and 0 <= self.loss_pct <= 100):
            raise ValueError(f"loss_pct must be within 0..100, got {self.loss_pct!r}")

    def tbf_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", str(self.burst_bytes),
                "latency", f"{self.tbf_latency_ms}ms"]

    def nft_script(self, device: str) -> str:
        # mod 10000 gives 0.01 % resolution. Prerouting (before conntrack) so that packets a
        # router forwards are lost too, not only those delivered to the namespace itself.
        threshold = round(self.loss_pct * 100)
        return (f"table inet {_NFT_TABLE} {{\n chain loss {{\n"
                f"  type filter hook prerouting priority raw; policy accept;\n"
                f"  iifname \"{device}\" numgen random mod 10000 < {threshold} drop\n }}\n}}\n")


def _run(args: list[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(args)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of labs whose process died without cleaning up (SIGKILL skips atexit);
    the owner's pid is part of every name. Returns the names deleted."""
    listed = _run(["ip", "netns", "list"], check=False).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME.fullmatch(name)
        if match and not _pid_alive(int(match.group(1))):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


def shape_link(near: tuple[str, str], far: tuple[str, str], shape: LinkShape,
               previous: LinkShape | None = None) -> None:
    """Shape the veth whose ends are ``near`` = (namespace, device) -- the side whose upload is
    limited, and where arriving packets are lost -- and ``far`` (the other end: near's download).
    ``previous``: the shape applied before, so its loss table is replaced rather than doubled."""
    for netns, dev in (near, far):
        if shape.rate_mbit is None:
            _run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)
        else:
            _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", *shape.tbf_args()])
    netns, dev = near
    if previous is not None and previous.loss_pct:
        _run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", _NFT_TABLE])
    if shape.loss_pct:
        _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], stdin=shape.nft_script(dev))


class NamespaceSet:
    """Namespaces named ``<prefix>-<member>`` that one lab creates, the processes it starts inside
    them, and their deletion. Subclasses build the links in ``_build()`` and map their own keys
    (an index, a host name) to a namespace name in ``namespace()``."""

    def __init__(self) -> None:
        self.prefix = f"{_PREFIX}-{os.getpid()}-{next(_counter)}"
        self._created: list[str] = []
        self._children: list[subprocess.Popen] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def _need_nft(self) -> bool:
        return True

    def _build(self) -> None:
        raise NotImplementedError

    def build(self: _Lab) -> _Lab:
        reason = unavailable_reason(need_nft=self._need_nft())
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale()
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill what runs inside, then delete every namespace this lab created (idempotent)."""
        for child in self._children:
            if child.poll() is None:
                child.kill()
        for child in self._children:
            try:
                child.wait(timeout=_COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._children.clear()
        for name in reversed(self._created):
            # A namespace stays alive while any process is inside; these were all started by us.
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", name], check=False)
        self._created.clear()
        _live.discard(self)

    def __enter__(self: _Lab) -> _Lab:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things inside -----------------------------------------------------------------
    def namespace(self, key) -> str:
        raise NotImplementedError

    def exec_args(self, key, args: Sequence[str]) -> list[str]:
        """The argv that runs `args` inside the namespace of `key`."""
        return ["ip", "netns", "exec", self.namespace(key), *args]

    def popen(self, key, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a process inside the namespace of `key`; it is killed (by pid) when the lab closes."""
        child = subprocess.Popen(self.exec_args(key, args), **kwargs)
        self._children.append(child)
        return child

    def run(self, key, args: Sequence[str], *, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the namespace of `key` to completion; captures text output."""
        done = subprocess.run(self.exec_args(key, args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NetnsError(f"{' '.join(args)} in {self.namespace(key)} failed ({done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
        return done

    # -- building blocks -----------------------------------------------------------------------
    def _add_netns(self, member: str) -> str:
        name = f"{self.prefix}-{member}"
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    def _ip(self, netns: str, *args: str) -> None:
        _run(["ip", "-n", netns, *args])

    def _bridge(self, netns: str, bridge: str) -> None:
        self._ip(netns, "link", "add", bridge, "type", "bridge")
        self._ip(netns, "link", "set", bridge, "up")

    def _veth(self, netns: str, dev: str, bridge_netns: str, bridge: str, port: str,
              address: str | None = None) -> None:
        """A veth from device `dev` in `netns` (with `address`, "a.b.c.d/len") to `port` on `bridge`."""
        self._ip(bridge_netns, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", netns)
        self._ip(bridge_netns, "link", "set", port, "master", bridge)
        self._ip(bridge_netns, "link", "set", port, "up")
        if address is not None:
            self._ip(netns, "addr", "add", address, "dev", dev)
        self._ip(netns, "link", "set", dev, "up")

    def _nft(self, netns: str, script: str) -> None:
        _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], stdin=script)


class NetnsLab(NamespaceSet):
    """N namespaces on a private bridge. Use as a context manager:

    >>> with NetnsLab(4, LinkShape(rate_mbit=100)) as lab:
    ...     server = lab.popen(1, [sys.executable, "server.py", "--host", lab.address(1)])
    ...     lab.run(0, [sys.executable, "client.py", lab.address(1)])
    """

    def __init__(self, n: int, shape: LinkShape | Sequence[LinkShape] = LinkShape(), *,
                 subnet: str = "10.77.0.0/24") -> None:
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be a positive int, got {n!r}")
        shapes = [shape] * n if isinstance(shape, LinkShape) else list(shape)
        if len(shapes) != n:
            raise ValueError(f"got {len(shapes)} link shapes for {n} namespaces")
        net = private_network(subnet, n)
        super().__init__()
        self.n = n
        self.shapes = shapes
        self.switch = f"{self.prefix}-sw"
        self.names = [f"{self.prefix}-{i}" for i in range(n)]
        hosts = net.hosts()
        self.addresses = [str(next(hosts)) for _ in range(n)]
        self.prefixlen = net.prefixlen
        self._applied: dict[int, LinkShape] = {}

    def _need_nft(self) -> bool:
        return any(s.loss_pct for s in self.shapes)

    def _build(self) -> None:
        self._add_netns("sw")
        self._bridge(self.switch, "br0")
        for i in range(self.n):
            name = self._add_netns(str(i))
            self._veth(name, "eth0", self.switch, "br0", f"p{i}", f"{self.addresses[i]}/{self.prefixlen}")
            self.set_shape(i, self.shapes[i])

    def set_shape(self, i: int, shape: LinkShape) -> None:
        """Apply (or change, while traffic flows) peer i's rate limit and loss."""
        shape_link((self.names[i], "eth0"), (self.switch, f"p{i}"), shape, self._applied.get(i))
        self._applied[i] = shape
        self.shapes[i] = shape

    def namespace(self, i: int) -> str:
        return self.names[i]

    def address(self, i: int) -> str:
        return self.addresses[i]


def private_network(subnet: str, hosts: int) -> ipaddress.IPv4Network:
    """`subnet` parsed, refused unless a private IPv4 network with room for `hosts` addresses:
    test labs must never take addresses that mean something outside them."""
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise ValueError(f"subnet {subnet!r}: {exc}") from exc
    if (net.version != 4 or not net.is_private or net.is_loopback or net.is_link_local
            or net.num_addresses - 2 < hosts):
        raise ValueError(f"subnet must be a private IPv4 network with room for {hosts} hosts, got {subnet!r}")
    return net


@atexit.register
def _close_all() -> None:
    for lab in list(_live):
        lab.close()
