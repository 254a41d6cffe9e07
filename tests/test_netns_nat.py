"""Home-router topologies (testing.nat): real nft masquerade NAT between network namespaces, shown
with plain TCP (testing.natprobe). Ground truth for reversal, relays and hole punching (issue 15):

- a NATed host connects out; the public side sees the router's address, with the inside port kept
  by the port-preserving NAT (unless another host behind it holds that public tuple)
  and a fresh random port per connection behind fully-random; hosts on one LAN talk directly;
- nobody outside dials in (LAN addresses are unroutable, the router's WAN port drops new SYNs);
- TCP simultaneous open from the listening port to each other's observed address connects two
  hosts behind port-preserving NATs and fails when either side is fully-random;
- everything is deleted on close, also when the test body raises, and after a SIGKILLed run.

What the kernel does (6.18; the numbers these tests print): the first SYN of a simultaneous
open is dropped by the far router's firewall, the peer's SYN then matches the near router's
mapping and both connect() calls return, on the first attempt, ~4 ms after the agreed
moment. A fully-random side maps its punching connection to a new port, so the peer aims at a
closed one and its own SYN arrives where the peer has no mapping: never connects. Routers
without the firewall answer the early SYN with a RST (ECONNREFUSED), which makes simultaneous
open a race won only when both SYNs cross in flight -- 1 of 4 tries in 10 s of 0.1 s retries on
these microsecond links (``topology(firewall=False)``); kernel netem is not available to add delay.

Needs root plus ip/tc/nft (CI runs as root); skipped with the reason elsewhere.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from testing import natprobe
from testing.nat import Host, NatLab, Router
from testing.netns import LinkShape, remove_stale, unavailable_reason
from tests.test_netns import TCP_SINK, TCP_SOURCE

_REASON = unavailable_reason(need_nat=True)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

PUNCH_TIMEOUT_S = 4.0  # a SYN dropped by the far router is resent after 1 s; 3 s is the second resend


def topology(**router_kw) -> NatLab:
    """Two port-preserving and two fully-random routers, one host behind each, two public hosts
    (pub1 behind its own stateful firewall)."""
    return NatLab(
        [Host("a0", "home"), Host("a1", "home2"), Host("b0", "cgn"), Host("b1", "cgn2"),
         Host("pub0"), Host("pub1", firewall=True)],
        {"home": Router("preserving", **router_kw), "home2": Router("preserving", **router_kw),
         "cgn": Router("random", **router_kw), "cgn2": Router("random", **router_kw)})


def start(lab: NatLab, name: str, *args: object) -> tuple[subprocess.Popen, dict]:
    proc = lab.popen(name, natprobe.argv(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"probe {args[0]} in {name} exited before reporting"
    return proc, json.loads(line)


def serve(lab: NatLab, name: str) -> tuple[subprocess.Popen, int]:
    proc, first = start(lab, name, "serve", lab.address(name))
    return proc, first["port"]


def dial(lab: NatLab, src: str, host: str, port: int, bind_port: int = 0) -> dict:
    done = lab.run(src, natprobe.argv("dial", lab.address(src), host, port, bind_port), timeout=15)
    return json.loads(done.stdout)


def punch(lab: NatLab, x: str, y: str, observer: int, **plan) -> tuple[dict, dict, list]:
    """Both sides learn their observed address from pub0, then dial each other at one moment."""
    px, ox = start(lab, x, "punch", lab.address(x), lab.address("pub0"), observer)
    py, oy = start(lab, y, "punch", lab.address(y), lab.address("pub0"), observer)
    assert ox["ok"] and oy["ok"], (ox, oy)
    at = time.time() + 0.3
    for proc, peer, hello in ((px, oy, x), (py, ox, y)):
        proc.stdin.write(json.dumps({"peer": peer["observed"], "at": at, "timeout": PUNCH_TIMEOUT_S,
                                     "hello": hello, **plan}) + "\n")
        proc.stdin.flush()
    rx, ry = (json.loads(proc.communicate(timeout=PUNCH_TIMEOUT_S + 10)[0]) for proc in (px, py))
    return rx, ry, [ox, oy]


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15).stdout
    return [line.split(" ", 1)[0] for line in listed.splitlines()]


def host_links() -> set[str]:
    """Interface names in the host's own namespace."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=15).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def host_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=15).stdout


@pytest.mark.root
@needs_netns
def test_nated_hosts_connect_out_and_are_seen_as_their_router():
    with topology() as lab:
        _, port = serve(lab, "pub0")
        pub = lab.address("pub0")
        for name in ("a0", "b0", "pub1"):
            seen = [dial(lab, name, pub, port, bind_port=40000) for _ in range(2)]
            assert all(s["ok"] for s in seen), seen
            assert {s["observed"][0] for s in seen} == {lab.public_address(name)}, seen
            assert seen[0]["local"] == [lab.address(name), 40000]
            ports = [s["observed"][1] for s in seen]
            print(name, "behind", lab.hosts[name].behind, "inside port 40000 seen as", ports)
            if name == "b0":  # fully-random: a fresh public port per connection, never the inside one
                assert ports[0] != ports[1] and 40000 not in ports, ports
            else:  # port-preserving NAT (and no NAT at all): the inside port is the public port
                assert ports == [40000, 40000], ports
        assert lab.public_address("a0") == lab.wan["home"] != lab.address("a0")


@pytest.mark.root
@needs_netns
def test_port_preserving_only_while_the_public_tuple_is_free():
    with NatLab([Host("a0", "home"), Host("a2", "home"), Host("pub0")], {"home": Router("preserving")}) as lab:
        _, port = serve(lab, "pub0")
        holder, first = start(lab, "a0", "hold", lab.address("a0"), lab.address("pub0"), port, 40000)
        second = dial(lab, "a2", lab.address("pub0"), port, bind_port=40000)  # same inside port, other host
        holder.communicate(timeout=15)  # stdin closed: the first connection ends
        _, lan_port = serve(lab, "a2")
        local = dial(lab, "a0", lab.address("a2"), lan_port)
    print("two hosts behind one router, inside port 40000 each ->", first["observed"], second["observed"])
    assert first["observed"] == [lab.wan["home"], 40000]
    # Same router address and destination while the first flow is live: another public port.
    assert second["observed"][0] == lab.wan["home"] and second["observed"][1] != 40000
    assert local == {"ok": True, "local": local["local"], "observed": [lab.address("a0"), local["local"][1]]}


@pytest.mark.root
@needs_netns
def test_nobody_dials_into_a_nated_host():
    with topology() as lab:
        _, port = serve(lab, "a0")
        assert dial(lab, "a0", lab.address("a0"), port)["ok"]  # the server is up
        attempts = {
            ("pub0", "lan"): dial(lab, "pub0", lab.address("a0"), port),
            ("pub0", "router"): dial(lab, "pub0", lab.public_address("a0"), port),
            ("b0", "lan"): dial(lab, "b0", lab.address("a0"), port),
            ("b0", "router"): dial(lab, "b0", lab.public_address("a0"), port),
        }
        print(attempts)
        assert not any(result["ok"] for result in attempts.values()), attempts
        assert "unreachable" in attempts["pub0", "lan"]["error"]     # no route to a LAN from outside
        assert "Timeout" in attempts["pub0", "router"]["error"]      # the router drops the SYN silently


@pytest.mark.root
@needs_netns
def test_router_without_firewall_refuses_instead_of_dropping():
    with topology(firewall=False) as lab:
        _, port = serve(lab, "a0")
        result = dial(lab, "pub0", lab.public_address("a0"), port)
        assert result["ok"] is False and "ConnectionRefused" in result["error"], result


@pytest.mark.root
@needs_netns
def test_stateful_firewall_on_a_public_host():
    with topology() as lab:
        _, port1 = serve(lab, "pub1")
        _, port0 = serve(lab, "pub0")
        assert dial(lab, "pub1", lab.address("pub0"), port0)["ok"]  # out: fine
        blocked = dial(lab, "pub0", lab.address("pub1"), port1)
        assert blocked["ok"] is False and "Timeout" in blocked["error"], blocked
        lab.set_firewall("pub1", False)
        assert dial(lab, "pub0", lab.address("pub1"), port1)["ok"]
        assert lab.describe()["hosts"]["pub1"]["firewall"] is False


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("pair, expect", [(("a0", "a1"), True), (("b0", "b1"), False), (("a0", "b0"), False)],
                         ids=["preserving-preserving", "random-random", "preserving-random"])
def test_tcp_simultaneous_open(pair, expect):
    with topology() as lab:
        _, observer = serve(lab, "pub0")
        rx, ry, observed = punch(lab, *pair, observer)
        print(pair, "observed", [o["observed"] for o in observed], "->", rx, ry)
        assert rx["ok"] is expect and ry["ok"] is expect, (rx, ry)
        if expect:
            x, y = pair
            assert (rx["got"], ry["got"]) == (y, x)
            assert rx["via"] == ry["via"] == "connect"  # a true simultaneous open, not an accept
            # Both connected from their listening port, each seen at the other's observed address.
            assert rx["peer"] == observed[1]["observed"] and ry["peer"] == observed[0]["observed"]
            assert all(o["observed"][1] == o["port"] for o in observed)


@pytest.mark.root
@needs_netns
def test_shaped_router_uplink_limits_a_nated_host():
    rate = 20.0
    with NatLab([Host("a0", "home"), Host("pub0")],
                {"home": Router("preserving", uplink=LinkShape(rate_mbit=rate))}) as lab:
        sink = lab.popen("pub0", [sys.executable, "-c", TCP_SINK, lab.address("pub0")],
                         stdout=subprocess.PIPE, text=True)
        port = json.loads(sink.stdout.readline())["port"]
        lab.run("a0", [sys.executable, "-c", TCP_SOURCE, lab.address("pub0"), str(port), str(4 << 20)], timeout=30)
        result = json.loads(sink.communicate(timeout=30)[0].splitlines()[-1])
    print("router uplink", rate, "Mbit/s -> measured", result)
    assert result["bytes"] == 4 << 20
    assert abs(result["mbit"] - rate) <= 0.15 * rate, result



# Inside: opens the NAT mapping with one datagram, then counts what comes back until a quiet second.
UDP_INSIDE = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.sendto(b"open", (sys.argv[2], int(sys.argv[3])))
got = 0
try:
    s.settimeout(10.0)
    s.recv(100); got = 1
    s.settimeout(1.0)
    while True:
        s.recv(100); got += 1
except socket.timeout:
    pass
print(json.dumps({"got": got}), flush=True)
"""

# Outside: answers the first datagram's source (the router's mapping) with N paced datagrams.
UDP_OUTSIDE = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
s.settimeout(10.0)
_, mapped = s.recvfrom(100)
for i in range(int(sys.argv[2])):
    s.sendto(b"x" * 64, mapped)
    if i % 50 == 49:
        time.sleep(0.005)
"""


@pytest.mark.root
@needs_netns
def test_loss_on_a_router_uplink_drops_forwarded_packets():
    sent = 2000

    def received(lab: NatLab) -> int:
        outside = lab.popen("pub0", [sys.executable, "-c", UDP_OUTSIDE, lab.address("pub0"), str(sent)],
                            stdout=subprocess.PIPE, text=True)
        port = json.loads(outside.stdout.readline())["port"]
        done = lab.run("a0", [sys.executable, "-c", UDP_INSIDE, lab.address("a0"), lab.address("pub0"), str(port)],
                       timeout=30)
        outside.wait(timeout=15)
        return json.loads(done.stdout)["got"]

    with NatLab([Host("a0", "home"), Host("pub0")],
                {"home": Router("preserving", uplink=LinkShape(loss_pct=30))}) as lab:
        lossy = received(lab)
        lab.set_shape("home", LinkShape())  # loss removed from the running router
        clean = received(lab)
    print("router uplink 30% loss: got", lossy, "of", sent, "; without loss", clean)
    assert clean == sent
    assert 1300 <= lossy <= 1500, lossy  # Binomial(2000, 0.7): 5 sd either side

@pytest.mark.root
@needs_netns
def test_everything_is_deleted_also_when_the_body_raises():
    lab = topology()
    with pytest.raises(RuntimeError, match="test body failed"):
        with lab:
            members = [n for n in namespaces() if n.startswith(lab.prefix + "-")]
            assert len(members) == 1 + 4 + 6  # switch, routers, hosts
            assert len(lab.run("home", ["nft", "list", "tables"]).stdout.splitlines()) == 2  # nat + firewall
            serve(lab, "a0")
            raise RuntimeError("test body failed")
    assert not [n for n in namespaces() if n.startswith(lab.prefix + "-")]
    # No veth, bridge or table of ours ever lived in the host's namespace (other runs may add theirs).
    ours = {"br0", "lan0", "wan0"} | {f"r-{r}" for r in lab.routers} | {f"h-{h}" for h in lab.hosts}
    assert not ours & host_links()
    assert "lowband_" not in host_tables()


@pytest.mark.root
@needs_netns
def test_namespaces_of_a_killed_nat_run_are_removed(procs):
    child = procs.python("-c", "from testing.nat import Host, NatLab, Router\n"
                               "NatLab([Host('a0', 'home'), Host('pub0')], {'home': Router('random')}).build()\n"
                               "print('READY {\"built\": true}', flush=True)\n"
                               "import time; time.sleep(120)")
    owned = [n for n in namespaces() if n.startswith(f"lowband-{child.pid}-")]
    assert len(owned) == 4  # switch, router, two hosts
    child.kill()
    child.wait()
    assert set(owned) <= set(remove_stale())
    assert not [n for n in namespaces() if n.startswith(f"lowband-{child.pid}-")]


@pytest.mark.parametrize("hosts, routers, match", [
    ([], {}, "at least one host"),
    ([Host("A")], {}, "names are"),
    ([Host("sw")], {}, "names are"),
    ([Host("a"), Host("a")], {}, "unique"),
    ([Host("a", "nowhere")], {}, "unknown router"),
    ([Host("a", "r")], {"r": Router(lan="10.77.0.0/24")}, "overlaps"),
    ([Host("a", "r")], {"r": Router(lan="8.8.8.0/24")}, "private"),
    ([Host("a", "r", firewall=True)], {"r": Router()}, "firewall goes on its router"),
    (["a"], {}, "Host objects"),
    ([Host("a", "r")], {"r": "preserving"}, "Router objects"),
])
def test_bad_topologies_raise_value_error(hosts, routers, match):
    with pytest.raises(ValueError, match=match):
        NatLab(hosts, routers)


def test_bad_router_kind_raises_value_error():
    with pytest.raises(ValueError, match="preserving, random"):
        Router("symmetric")
