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
(``remove_stale``: the pid in the name is no longer alive).
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

_COMMAND_TIMEOUT_S = 15.0
_TOOLS = ("ip", "tc", "nft")
_NFT_TABLE = "lowband_loss"
_PREFIX = "lowband"
_NAME = re.compile(rf"{_PREFIX}-(\d+)-\d+-(?:sw|\d+)")
_counter = itertools.count()
_live: "set[NetnsLab]" = set()


class NetnsError(RuntimeError):
    """A namespace command failed; the message holds the command and its stderr."""


class NetnsUnavailable(NetnsError):
    """Namespaces cannot be built here (see unavailable_reason())."""


def unavailable_reason(need_nft: bool = True) -> str | None:
    """Why this process cannot build namespaces, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return "network namespaces need root"
    missing = [tool for tool in _TOOLS if (tool != "nft" or need_nft) and shutil.which(tool) is None]
    if missing:
        return "missing commands: " + ", ".join(missing) + " (apt-get install iproute2 nftables)"
    return None


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
        # mod 10000 gives 0.01 % resolution.
        threshold = round(self.loss_pct * 100)
        return (f"table inet {_NFT_TABLE} {{\n chain input {{\n"
                f"  type filter hook input priority 0; policy accept;\n"
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


class NetnsLab:
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
        net = ipaddress.ip_network(subnet)
        if (net.version != 4 or not net.is_private or net.is_loopback or net.is_link_local
                or net.num_addresses - 2 < n):
            raise ValueError(f"subnet must be a private IPv4 network with room for {n} hosts, got {subnet!r}")
        self.n = n
        self.shapes = shapes
        self.prefix = f"{_PREFIX}-{os.getpid()}-{next(_counter)}"
        self.switch = f"{self.prefix}-sw"
        self.names = [f"{self.prefix}-{i}" for i in range(n)]
        hosts = net.hosts()
        self.addresses = [str(next(hosts)) for _ in range(n)]
        self.prefixlen = net.prefixlen
        self._created: list[str] = []
        self._applied: dict[int, LinkShape] = {}
        self._children: list[subprocess.Popen] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def build(self) -> "NetnsLab":
        reason = unavailable_reason(need_nft=any(s.loss_pct for s in self.shapes))
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale()
        _live.add(self)
        try:
            self._add_netns(self.switch)
            self._ip(self.switch, "link", "add", "br0", "type", "bridge")
            self._ip(self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                self._add_netns(name)
                port = f"p{i}"
                self._ip(self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
                self._ip(self.switch, "link", "set", port, "master", "br0")
                self._ip(self.switch, "link", "set", port, "up")
                self._ip(name, "addr", "add", f"{self.addresses[i]}/{self.prefixlen}", "dev", "eth0")
                self._ip(name, "link", "set", "eth0", "up")
                self._ip(name, "link", "set", "lo", "up")
                self.set_shape(i, self.shapes[i])
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

    def __enter__(self) -> "NetnsLab":
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shaping ---------------------------------------------------------------------------------
    def set_shape(self, i: int, shape: LinkShape) -> None:
        """Apply (or change, while traffic flows) peer i's rate limit and loss."""
        name = self.names[i]
        for netns, dev in ((name, "eth0"), (self.switch, f"p{i}")):
            if shape.rate_mbit is None:
                _run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)
            else:
                _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", *shape.tbf_args()])
        previous = self._applied.get(i)
        if previous is not None and previous.loss_pct:
            _run(["ip", "netns", "exec", name, "nft", "delete", "table", "inet", _NFT_TABLE])
        if shape.loss_pct:
            _run(["ip", "netns", "exec", name, "nft", "-f", "-"], stdin=shape.nft_script("eth0"))
        self._applied[i] = shape
        self.shapes[i] = shape

    # -- running things inside -----------------------------------------------------------------
    def address(self, i: int) -> str:
        return self.addresses[i]

    def exec_args(self, i: int, args: Sequence[str]) -> list[str]:
        """The argv that runs `args` inside namespace i."""
        return ["ip", "netns", "exec", self.names[i], *args]

    def popen(self, i: int, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a process inside namespace i; it is killed (by pid) when the lab closes."""
        child = subprocess.Popen(self.exec_args(i, args), **kwargs)
        self._children.append(child)
        return child

    def run(self, i: int, args: Sequence[str], *, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside namespace i to completion; captures text output."""
        done = subprocess.run(self.exec_args(i, args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NetnsError(f"{' '.join(args)} in {self.names[i]} failed ({done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
        return done

    # -- internals -----------------------------------------------------------------------------
    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)

    def _ip(self, netns: str, *args: str) -> None:
        _run(["ip", "-n", netns, *args])


@atexit.register
def _close_all() -> None:
    for lab in list(_live):
        lab.close()
