"""A PeerHost in its own process (and network namespace) for tests/test_relay.py, driven by JSON lines.

``python tests/relay_child.py HOST [--relay] [--unreachable] [--capture FILE] [--tamper OFFSET]``
listens on HOST:0 and prints ``{"peer_id", "address"}``. Then one JSON command per stdin line,
one JSON answer per stdout line (``{"ok": true, ...}`` or ``{"ok": false, "error", "type"}``):

- ``{"op": "reserve", "relay": id, "address": a}``: hold a reservation at a relay
- ``{"op": "route", "peer": id, "address": a | null, "relays": [[id, a], ...], "reachable": bool}``
- ``{"op": "call", "peer": id, "text": s, "size": n}``: echo call with an n-byte payload
- ``{"op": "send", "peer": id, "tag": t, "size": n, "marker": s}``: one message of n bytes
  (``marker`` repeated), then a call that returns once the peer has received it; answers the
  seconds it took and the sha256 the peer saw
- ``{"op": "observe", "host": h, "port": p}``: learn where our listening port is seen from
  (a ``testing/natprobe.py serve`` observer, dialled from that port) for hole punching
- ``{"op": "info", "peer": id}``: link path, relay stats, and the transport warnings logged so far
- ``{"op": "connect", "address": a}``: dial a peer directly
- ``{"op": "punch", "peer": id}``: hole-punch a link to a connected peer (PeerHost.punch)
- ``{"op": "offer", "peer": id, "observed": [ip, port]}``: send a hand-made punch offer naming any
  address (what a hostile peer can do); answers the peer's reply or its refusal

``--key HEX`` fixes the identity (the test picks which side has the lower id); ``--punch-late S``
starts our side of every punch S seconds late (so the peer's SYN reaches our listener first).

Hostile-relay hooks, for the relay process only: ``--capture FILE`` appends every spliced byte to
FILE; ``--tamper OFFSET`` flips one bit of the byte at OFFSET of the first circuit's
initiator-to-responder stream.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peer.identity import Identity  # noqa: E402
from peer.relay import Splice  # noqa: E402
from peer.transport import PeerHost  # noqa: E402

TOKEN = b"relay-test-swarm-token-0123456789abcdef"


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def hostile(capture: str | None, tamper: int | None) -> None:
    """Make this process's relay record (and maybe alter) what it splices."""
    forward = Splice.forward
    out = open(capture, "ab", buffering=0) if capture else None
    state = {"first": None}

    def spy(self: Splice, src, data: bytes) -> None:
        if out is not None:
            out.write(data)
        if state["first"] is None:
            state["first"] = self
        if tamper is not None and self is state["first"] and src is self.ends[0]:
            start = getattr(self, "_a_bytes", 0)
            self._a_bytes = start + len(data)  # type: ignore[attr-defined]
            if start <= tamper < start + len(data):
                b = bytearray(data)
                b[tamper - start] ^= 0x01
                data = bytes(b)
        forward(self, src, data)

    Splice.forward = spy  # type: ignore[method-assign]


def late(seconds: float) -> None:
    """Start this process's side of every simultaneous open ``seconds`` after the agreed moment."""
    from peer import transport
    real = transport.simultaneous_open

    async def lagging(local, remote, *, at, **kw):
        return await real(local, remote, at=at + seconds, **kw)

    transport.simultaneous_open = lagging


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("--relay", action="store_true")
    ap.add_argument("--unreachable", action="store_true")
    ap.add_argument("--capture")
    ap.add_argument("--tamper", type=int)
    ap.add_argument("--key")
    ap.add_argument("--punch-late", type=float, default=0.0)
    args = ap.parse_args()
    if args.punch_late:
        late(args.punch_late)
    warnings = Warnings()
    for name in ("lowband.transport", "lowband.relay"):
        logging.getLogger(name).addHandler(warnings)
        logging.getLogger(name).setLevel(logging.INFO)
    if args.capture or args.tamper is not None:
        hostile(args.capture, args.tamper)
    identity = Identity.from_private_bytes(bytes.fromhex(args.key)) if args.key else Identity.generate()
    host = PeerHost(identity, TOKEN, relay=args.relay, handshake_timeout=10.0)
    host.reachable = not args.unreachable
    address = await host.start(args.host, 0)
    received: dict[str, asyncio.Future] = {}

    async def echo(peer_id, header, payload):
        return {"text": header.get("text"), "n": len(payload)}, bytes(payload[:16])

    async def got(peer_id, header, payload):
        h, p = await host.recv(peer_id, header["tag"], timeout=60)
        return {"n": len(p), "sha": hashlib.sha256(p).hexdigest()}, b""

    host.handle("echo", echo)
    host.handle("got", got)
    print(json.dumps({"peer_id": host.peer_id, "address": address}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            answer = await run(host, cmd, warnings)
            answer["ok"] = True
        except Exception as e:
            answer = {"ok": False, "error": str(e), "type": type(e).__name__}
        print(json.dumps(answer), flush=True)
    await host.close()


async def run(host: PeerHost, cmd: dict, warnings: Warnings) -> dict:
    op = cmd["op"]
    if op == "reserve":
        await host.reserve(cmd["relay"], cmd["address"])
        return {}
    if op == "route":
        host.add_route(cmd["peer"], cmd.get("address"), relays=[tuple(r) for r in cmd.get("relays", [])],
                       reachable=cmd.get("reachable", True))
        return {}
    if op == "call":
        h, p = await host.call(cmd["peer"], "echo", {"text": cmd["text"]}, os.urandom(cmd.get("size", 0)), timeout=20)
        return {"header": h, "path": host.link_path(cmd["peer"])}
    if op == "send":
        marker = cmd.get("marker", "x").encode()
        payload = (marker * (cmd["size"] // len(marker) + 1))[:cmd["size"]]
        t0 = loop_time()
        await host.send(cmd["peer"], cmd["tag"], {"marker": cmd.get("marker")}, payload)
        h, _ = await host.call(cmd["peer"], "got", {"tag": cmd["tag"]}, timeout=60)
        return {"seconds": loop_time() - t0, "sha_ok": h["sha"] == hashlib.sha256(payload).hexdigest(),
                "n": h["n"], "path": host.link_path(cmd["peer"])}
    if op == "observe":
        from testing import natprobe
        listen_host, listen_port = host.address.rsplit(":", 1)
        seen = await asyncio.get_running_loop().run_in_executor(
            None, natprobe.dial, listen_host, cmd["host"], cmd["port"], int(listen_port))
        if not seen.get("ok"):
            raise RuntimeError(f"observer unreachable: {seen}")
        return {"mapping": host.set_observed(tuple(seen["observed"])), "observed": seen["observed"]}
    if op == "connect":
        return {"peer_id": await host.connect(cmd["address"])}
    if op == "punch":
        conn = await host.punch(cmd["peer"])
        return {"path": conn.path, "where": conn.where, "initiator": conn.hs.initiator}
    if op == "offer":
        from peer.punch import PunchAnswer, PunchOffer
        offer = PunchOffer.make(host.peer_id, tuple(cmd["observed"]), "preserving")
        _, raw = await host.call(cmd["peer"], "punch.offer", {}, offer.encode(), timeout=10)
        return {"answer": list(PunchAnswer.decode(bytes(raw)).observed)}
    if op == "info":
        return {"path": host.link_path(cmd["peer"]) if cmd.get("peer") else None,
                "relay": host.relay.stats() if host.relay else None, "log": warnings.lines}
    raise ValueError(f"unknown op {op!r}")


def loop_time() -> float:
    return asyncio.get_running_loop().time()


if __name__ == "__main__":
    asyncio.run(main())
