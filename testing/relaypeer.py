"""Relay-test peers in NatLab namespaces, shared by tests/test_relay.py, tests/test_reach_abuse.py
and bench/nat.py: :class:`Peer` drives one ``tests/relay_child.py`` process (a PeerHost in a
namespace, commanded by JSON lines on stdin), :func:`nat_lab` builds the two-router lab the relay
tests use, :func:`relayed_pair` two NATed peers reserved at the given relays."""
from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

from testing.nat import Host, NatLab, Router

CHILD = str(Path(__file__).resolve().parents[1] / "tests" / "relay_child.py")


class Peer:
    def __init__(self, lab: NatLab, name: str, *flags: str) -> None:
        self.proc = lab.popen(name, [sys.executable, CHILD, lab.address(name), *flags],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._line(15)
        self.peer_id, self.address = hello["peer_id"], hello["address"]

    def _line(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"child gave no answer in {timeout}s"
        line = self.proc.stdout.readline()
        assert line, f"child exited ({self.proc.poll()})"
        return json.loads(line)

    def ask(self, timeout: float = 25.0, **cmd) -> dict:
        self.post(**cmd)
        return self.answer(timeout)

    def post(self, **cmd) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 25.0) -> dict:
        return self._line(timeout)

    def ok(self, **cmd) -> dict:
        answer = self.ask(**cmd)
        assert answer["ok"], answer
        return answer


def nat_lab(*public: Host) -> NatLab:
    return NatLab([Host("a0", "home"), Host("b0", "cgn"), *public],
                  {"home": Router("preserving"), "cgn": Router("random")})


def relayed_pair(lab: NatLab, relays: list[Peer]) -> tuple[Peer, Peer]:
    """A behind the preserving NAT, B behind the fully-random one, both reserved at every relay
    and routed to each other by their (unreachable) LAN address plus those relays."""
    a, b = Peer(lab, "a0", "--unreachable"), Peer(lab, "b0", "--unreachable")
    table = [[r.peer_id, r.address] for r in relays]
    for me, other in ((a, b), (b, a)):
        for r in relays:
            me.ok(op="reserve", relay=r.peer_id, address=r.address)
        me.ok(op="route", peer=other.peer_id, address=other.address, relays=table, reachable=False)
    return a, b
