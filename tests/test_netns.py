"""Kernel-shaped namespaces: tbf gives ~the configured rate, nft loss drops packets, cleanup works.

Needs root plus the ip/tc/nft commands (CI runs as root); skipped elsewhere.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testing.netns import LinkShape, NetnsLab, remove_stale, unavailable_reason

_REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# Receives one TCP stream; times the part after the first 1 MB so tbf's initial burst is excluded.
TCP_SINK = r"""
import json, socket, sys, time
srv = socket.create_server((sys.argv[1], 0))
print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
conn, _ = srv.accept()
total, t_mark, mark = 0, None, 1 << 20
while data := conn.recv(1 << 18):
    total += len(data)
    if t_mark is None and total >= mark:
        t_mark, mark = time.monotonic(), total
print(json.dumps({"bytes": total, "mbit": (total - mark) * 8 / (time.monotonic() - t_mark) / 1e6}), flush=True)
"""

TCP_SOURCE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
block = b"\0" * (1 << 16)
for _ in range(int(sys.argv[3]) >> 16):
    s.sendall(block)
s.close()
"""

# Counts UDP datagrams until a quiet second.
UDP_SINK = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(1.0)
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
got = 0
try:
    s.settimeout(15.0)
    s.recv(100); got = 1
    s.settimeout(1.0)
    while True:
        s.recv(100); got += 1
except socket.timeout:
    pass
print(json.dumps({"got": got}), flush=True)
"""

UDP_SOURCE = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x" * 64, (sys.argv[1], int(sys.argv[2])))
    if i % 50 == 49:
        time.sleep(0.005)  # pace so the receiver's socket buffer never overflows
"""


def start_sink(lab: NetnsLab, i: int, script: str) -> tuple[subprocess.Popen, int]:
    proc = lab.popen(i, [sys.executable, "-c", script, lab.address(i)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())["port"]


def sink_result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15).stdout


@pytest.mark.root
@needs_netns
def test_tbf_rate_limit_and_cleanup():
    rate = 40.0
    with NetnsLab(2, LinkShape(rate_mbit=rate)) as lab:
        assert all(name in namespaces() for name in lab.names)
        assert lab.address(0) != lab.address(1) and lab.address(0).startswith("10.77.0.")
        sink, port = start_sink(lab, 1, TCP_SINK)
        lab.run(0, [sys.executable, "-c", TCP_SOURCE, lab.address(1), str(port), str(8 << 20)])
        result = sink_result(sink)
        names = list(lab.names) + [lab.switch]
    assert result["bytes"] == 8 << 20
    print("tbf", rate, "Mbit/s -> measured", result)
    assert abs(result["mbit"] - rate) <= 0.15 * rate, result
    listed = namespaces()
    assert not any(name in listed for name in names), "namespaces left behind"


@pytest.mark.root
@needs_netns
def test_nft_loss_drops_packets():
    sent = 2000
    with NetnsLab(2, [LinkShape(), LinkShape(loss_pct=30)]) as lab:
        sink, port = start_sink(lab, 1, UDP_SINK)
        lab.run(0, [sys.executable, "-c", UDP_SOURCE, lab.address(1), str(port), str(sent)])
        lossy = sink_result(sink)["got"]
        lab.set_shape(1, LinkShape())  # loss removed while running
        sink, port = start_sink(lab, 1, UDP_SINK)
        lab.run(0, [sys.executable, "-c", UDP_SOURCE, lab.address(1), str(port), str(sent)])
        clean = sink_result(sink)["got"]
    print("nft 30% loss: got", lossy, "of", sent, "; without loss", clean)
    assert clean == sent
    # Binomial(2000, 0.7): mean 1400, sd ~20.5; 5 sd either side.
    assert 1300 <= lossy <= 1500, lossy


@pytest.mark.root
@needs_netns
def test_namespaces_of_a_killed_run_are_removed(procs):
    child = procs.python("-c", "from testing.netns import NetnsLab\n"
                               "lab = NetnsLab(2).build()\n"
                               "print('READY {\"built\": true}', flush=True)\n"
                               "import time; time.sleep(120)")
    owned = [name for name in namespaces().split() if name.startswith(f"lowband-{child.pid}-")]
    assert len(owned) == 3  # two peers and the switch
    child.kill()
    child.wait()
    assert set(owned) <= set(remove_stale())
    assert not any(name.startswith(f"lowband-{child.pid}-") for name in namespaces().split())


def test_bad_arguments_raise_value_error():
    for kwargs in ({"rate_mbit": 0}, {"burst_bytes": 100}, {"loss_pct": 101}):
        with pytest.raises(ValueError):
            LinkShape(**kwargs)
    with pytest.raises(ValueError):
        NetnsLab(2, [LinkShape()])
    with pytest.raises(ValueError):
        NetnsLab(2, subnet="8.8.8.0/24")  # never a public network
    with pytest.raises(ValueError):
        NetnsLab(2, subnet="127.0.0.0/24")
