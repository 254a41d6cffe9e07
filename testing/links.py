"""N benchmark "hosts" joined by one of three kinds of links, and the link rate measured in the same run.

Kinds (docs/architecture.md §Measuring performance; the all-reduce issue's setups):

* ``loopback``  -- unshaped; host i is 127.0.0.(11+i) in this network namespace.
* ``tbf100``    -- host i is its own network namespace on a private bridge (testing.netns.NetnsLab,
  addresses 10.77.0.x inside namespaces this module creates, never any other network), with
  ``tc tbf rate 100mbit burst 256kb`` on its upload and its download. Root only.
* ``emu100d25`` -- loopback plus one testing.netem relay per ordered host pair, 100 Mbit/s and 25 ms
  one-way delay per direction of each pair link. The relays run on an event loop thread of the
  process that opened the links. Note the model differs from tbf100: each *pair* link has
  100 Mbit/s, not each host's access link, so a host talking to three peers at once has three
  links' capacity (ring all-reduce sends to one neighbour only, so rings see one link either way).
* ``emu20d50``  -- the same relays at 20 Mbit/s and 50 ms one-way delay (a home uplink; the
  DiLoCo benchmark's links).

How an application reaches another host: host j's service binds ``links.address(j)`` on some
port (0 = any, then reported back); the parent collects ``ports[j]`` and calls
``links.routes(ports)``: ``routes[i][j]`` is the ``host:port`` that host i must dial to reach host
j's service. On loopback and tbf100 that is simply ``address(j):ports[j]``; on emu100d25 it is the
relay (i -> j), so the app maps peer j to that endpoint (e.g. ``PeerHost.add_route(peer_j,
routes[i][j])``). Apps that learn peer addresses from each other at run time (gloo's rendezvous,
hivemind's DHT) bypass relays, so ``supports_direct_dial`` is False on emu100d25 and the anchors
refuse it with LinksUnsupported.

Processes on a host are started with ``links.popen(i, argv)`` (inside namespace i for tbf100) and
killed by pid when the links close; namespaces and relays are deleted by the names/ids created.

    with open_links("tbf100", 4) as links:
        rate = measure_link_rate(links)            # bytes/s over one shaped link, one TCP stream
        bound = ring_lower_bound_s(4, 100e6, rate)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path

from testing.netem import LinkEmulatorSet, LinkSpec
from testing.netns import LinkShape, NetnsLab, NetnsUnavailable, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("loopback", "tbf100", "emu100d25", "emu20d50")
_RATE_MBIT = 100.0
_DELAY_MS = 25.0
_TBF_BURST = 256 * 1024
_LOOPBACK_BASE = 11
_PROCESS_KILL_TIMEOUT_S = 10.0
_RELAY_CALL_TIMEOUT_S = 30.0


class LinksError(RuntimeError):
    """The links could not be built or used."""


class LinksUnsupported(LinksError):
    """This kind of link cannot be used here (not root, no `ip`/`tc`) or by this application."""


class Links:
    """N hosts joined by one kind of link; a context manager that cleans up what it created."""

    kind: str
    #: Configured per-direction rate in bytes/s (None = unshaped); measure_link_rate gives the real one.
    nominal_rate_Bps: float | None = None
    one_way_delay_s: float = 0.0
    #: Whether host i may dial address(j) directly and still cross the shaped link.
    supports_direct_dial: bool = True

    def __init__(self, n: int) -> None:
        if not (isinstance(n, int) and n >= 2):
            raise ValueError(f"need an int >= 2 hosts, got {n!r}")
        self.n = n
        self._children: list[subprocess.Popen] = []
        self._open = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> "Links":
        self._open = True
        return self

    def close(self) -> None:
        """Kill every process started on a host (by pid), then tear down the links (idempotent)."""
        for child in self._children:
            kill_group(child)
        for child in self._children:
            try:
                child.wait(timeout=_PROCESS_KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._children.clear()
        self._open = False

    def __enter__(self) -> "Links":
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hosts ---------------------------------------------------------------------------------------
    def address(self, i: int) -> str:
        """The IPv4 address a service on host i binds to."""
        raise NotImplementedError

    def interface(self, i: int) -> str:
        """The network interface holding address(i), for apps that bind interfaces (gloo)."""
        self._check(i)
        return "lo"

    def wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` on host i."""
        self._check(i)
        return list(argv)

    def popen(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a process on host i; it is killed by pid when the links close."""
        if not self._open:
            raise LinksError("links are not open (use them in a with block)")
        # Own process group: children of the child (hivemind's DHT, averager, p2pd) die with it.
        child = subprocess.Popen(self.wrap(i, argv), start_new_session=True, **kwargs)
        self._children.append(child)
        return child

    def start(self, i: int, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> "HostProcess":
        """Start a process on host i with piped stdin and line-pumped stdout+stderr, cwd = repo root."""
        return HostProcess(self.popen(i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=ROOT,
                                      env=dict(os.environ if env is None else env)))

    def routes(self, ports: Sequence[int]) -> list[list[str | None]]:
        """``routes[i][j]``: where host i dials to reach host j's service on ``ports[j]``
        (None on the diagonal)."""
        self._check_ports(ports)
        return [[None if i == j else f"{self.address(j)}:{ports[j]}" for j in range(self.n)]
                for i in range(self.n)]

    def describe(self) -> dict:
        return {"kind": self.kind, "hosts": self.n, "addresses": [self.address(i) for i in range(self.n)],
                "nominal_rate_Bps": self.nominal_rate_Bps, "one_way_delay_s": self.one_way_delay_s}

    def _check(self, i: int) -> None:
        if not (isinstance(i, int) and 0 <= i < self.n):
            raise ValueError(f"host index must be within 0..{self.n - 1}, got {i!r}")

    def _check_ports(self, ports: Sequence[int]) -> None:
        if len(ports) != self.n or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise ValueError(f"need {self.n} ports within 1..65535, got {list(ports)!r}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group a Links child leads (its id is the child's pid), then the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()


class HostProcess:
    """A child whose output lines a thread collects, so waiting for a tagged line can time out.

    Protocol of bench children: ``READY {json}`` when up, ``RESULT {json}`` when done."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, name=f"pump-{proc.pid}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        self.proc.wait()
        with self._changed:
            self._changed.notify_all()

    def tagged(self, tag: str, timeout: float) -> dict:
        """The JSON after the first ``TAG `` line; LinksError if the child exits or times out first."""
        prefix = tag + " "
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return json.loads(line[len(prefix):])
                left = deadline - time.monotonic()
                if self.proc.poll() is not None or left <= 0:
                    why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else \
                        f"timed out after {timeout:g} s"
                    raise LinksError(f"child {self.proc.pid} {why} before printing {tag}:\n{self.tail()}")
                self._changed.wait(min(left, 1.0))

    def send(self, message: dict) -> None:
        """One JSON line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def wait(self, timeout: float) -> int:
        """Exit status, killing the child (by pid) if it has not exited within `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return self.proc.wait(_PROCESS_KILL_TIMEOUT_S)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.lines[-lines:])


class LoopbackLinks(Links):
    kind = "loopback"

    def address(self, i: int) -> str:
        self._check(i)
        return f"127.0.0.{_LOOPBACK_BASE + i}"


class TbfLinks(Links):
    """Namespaces on a bridge, tbf on each host's upload and download (testing.netns)."""

    kind = "tbf100"
    nominal_rate_Bps = _RATE_MBIT * 1e6 / 8

    def __init__(self, n: int, subnet: str = "10.77.0.0/24") -> None:
        super().__init__(n)
        self.lab = NetnsLab(n, LinkShape(rate_mbit=_RATE_MBIT, burst_bytes=_TBF_BURST), subnet=subnet)

    def open(self) -> "Links":
        reason = unavailable_reason(need_nft=False)
        if reason:
            raise LinksUnsupported(f"tbf100 links: {reason}")
        try:
            self.lab.build()
        except NetnsUnavailable as exc:
            raise LinksUnsupported(f"tbf100 links: {exc}") from exc
        return super().open()

    def close(self) -> None:
        super().close()
        self.lab.close()

    def address(self, i: int) -> str:
        self._check(i)
        return self.lab.address(i)

    def interface(self, i: int) -> str:
        self._check(i)
        return "eth0"  # testing.netns names every host's veth end eth0

    def wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        self._check(i)
        return self.lab.exec_args(i, argv)

    def describe(self) -> dict:
        return {**super().describe(), "namespaces": list(self.lab.names), "tbf_burst_bytes": _TBF_BURST}


class EmulatedLinks(LoopbackLinks):
    """Loopback hosts reaching each other through testing.netem relays (one per ordered pair)."""

    kind = "emu100d25"
    nominal_rate_Bps = _RATE_MBIT * 1e6 / 8
    one_way_delay_s = _DELAY_MS / 1e3
    supports_direct_dial = False

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._relays: LinkEmulatorSet | None = None
        self._routes: dict[tuple[int, ...], list[list[str | None]]] = {}

    def open(self) -> "Links":
        loop = _new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="links-relays", daemon=True)
        self._thread.start()
        self._relays = LinkEmulatorSet("127.0.0.1", seed=0)
        return super().open()

    def close(self) -> None:
        super().close()
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._relays is not None:
            try:
                self._call(self._relays.close(), loop)
            except Exception:  # noqa: BLE001 -- teardown must go on to stop the loop
                pass
            self._relays = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(_PROCESS_KILL_TIMEOUT_S)
        loop.close()
        self._routes.clear()

    def routes(self, ports: Sequence[int]) -> list[list[str | None]]:
        """Builds (once per port set) the relay mesh; relays (i, j) and (j, i) share one link."""
        self._check_ports(ports)
        key = tuple(ports)
        if key not in self._routes:
            if self._loop is None or self._relays is None:
                raise LinksError("links are not open (use them in a with block)")
            spec = LinkSpec.from_ms(self.one_way_delay_s * 1e3, rate_mbit=self.nominal_rate_Bps * 8 / 1e6)
            targets = {j: (self.address(j), ports[j]) for j in range(self.n)}
            relays: dict = self._call(self._relays.mesh(targets, spec), self._loop)
            self._routes[key] = [[None if i == j else relays[i, j].endpoint for j in range(self.n)]
                                 for i in range(self.n)]
        return self._routes[key]

    @staticmethod
    def _call(coro, loop: asyncio.AbstractEventLoop):
        future: Future = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(_RELAY_CALL_TIMEOUT_S)


class EmulatedLinks20d50(EmulatedLinks):
    """The relay mesh at 20 Mbit/s and 50 ms one-way delay per direction of each pair link."""

    kind = "emu20d50"
    nominal_rate_Bps = 20e6 / 8
    one_way_delay_s = 50e-3


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # optional: relays forward ~100 Mbit/s per pair in pure Python
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def open_links(kind: str, n: int) -> Links:
    """A Links of the given kind (not yet open: use it in a ``with`` block)."""
    factories = {"loopback": LoopbackLinks, "tbf100": TbfLinks, "emu100d25": EmulatedLinks,
                 "emu20d50": EmulatedLinks20d50}
    if kind not in factories:
        raise ValueError(f"link kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return factories[kind](n)


def ring_lower_bound_s(n: int, wire_bytes: float, rate_Bps: float) -> float:
    """Ring all-reduce time floor: each host sends (and receives) 2(N-1)/N of the wire bytes
    over its link (Patarasuk & Yuan 2009, bandwidth-optimal all-reduce)."""
    if n < 2 or rate_Bps <= 0:
        raise ValueError(f"need n >= 2 and a positive rate, got n={n!r}, rate={rate_Bps!r}")
    return 2 * (n - 1) / n * wire_bytes / rate_Bps


def ring_bound_fields(n: int, wire_bytes: float, median_s: float, rate_Bps: float | None) -> dict:
    """Fields to print beside a result: the measured link rate, the ring bound, median / bound."""
    if rate_Bps is None:
        return {}
    bound = ring_lower_bound_s(n, wire_bytes, rate_Bps)
    return {"link_rate_Bps": rate_Bps, "ring_lower_bound_s": bound, "median_over_bound": median_s / bound}


# One TCP stream: the sink times the bytes after the first MiB (tbf's burst and slow start excluded).
_SINK = r"""
import json, socket, sys, time
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(float(sys.argv[2]))
print("READY " + json.dumps({"port": srv.getsockname()[1]}), flush=True)
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[2]))
total, t_mark, mark = 0, None, 1 << 20
while data := conn.recv(1 << 20):
    total += len(data)
    if t_mark is None and total >= mark:
        t_mark, mark = time.perf_counter(), total
elapsed = time.perf_counter() - t_mark
print("RESULT " + json.dumps({"bytes": total, "timed_bytes": total - mark, "seconds": elapsed}), flush=True)
"""

_SOURCE = r"""
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=float(sys.argv[3]))
block = bytes(1 << 20)
for _ in range(int(sys.argv[2])):
    s.sendall(block)
s.close()
"""


def measure_link_rate(links: Links, *, src: int = 0, dst: int = 1, seconds: float = 2.0,
                      timeout: float = 60.0) -> float:
    """Bytes/s of one raw TCP stream from host `src` to host `dst` over the links as they are now.

    Sends about `seconds` worth at the nominal rate (at least 8 MiB; 256 MiB when unshaped)."""
    rate = links.nominal_rate_Bps
    mib = 256 if rate is None else max(8, int(rate * seconds) >> 20)
    sink = links.start(dst, [sys.executable, "-c", _SINK, links.address(dst), str(timeout)])
    ports = [sink.tagged("READY", timeout)["port"]] * links.n  # only routes[src][dst] is dialled
    source = links.start(src, [sys.executable, "-c", _SOURCE, links.routes(ports)[src][dst], str(mib), str(timeout)])
    result = sink.tagged("RESULT", timeout)
    if source.wait(timeout) != 0 or result["bytes"] != mib << 20:
        raise LinksError(f"link rate probe failed: {result}; source output: {source.tail()}")
    return result["timed_bytes"] / result["seconds"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testing.links", description="Measure one link's TCP rate.")
    parser.add_argument("--links", choices=KINDS, default="tbf100")
    parser.add_argument("--hosts", type=int, default=2)
    args = parser.parse_args(argv)
    with open_links(args.links, args.hosts) as links:
        start = time.perf_counter()
        rate = measure_link_rate(links)
        print(json.dumps({**links.describe(), "measured_rate_Bps": rate, "measured_mbit": rate * 8 / 1e6,
                          "probe_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
