"""Child process for tests/test_transport.py: one PeerHost serving test RPCs.

Prints ``READY {"address", "peer_id"}`` once listening; logs go to stdout so the parent test
can read the reasons this side gave for rejecting or dropping connections.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.errors import LowbandError
from peer.identity import Identity
from peer.transport import PeerHost, install_event_loop_policy


def pattern(seed: int, n: int) -> bytes:
    """Deterministic pseudo-random bytes both sides can regenerate."""
    return random.Random(seed).randbytes(n)


class Impostor(Identity):
    """Presents ``victim``'s public key but can only sign with its own private key."""

    def __init__(self, victim: Identity) -> None:
        super().__init__(Ed25519PrivateKey.generate())
        self.public_bytes = victim.public_bytes
        self.peer_id = victim.peer_id


def make_identity(impostor: bool) -> Identity:
    return Impostor(Identity.generate()) if impostor else Identity.generate()


async def main(args: argparse.Namespace) -> None:
    host = PeerHost(make_identity(args.impostor), args.token.encode(), conns_per_peer=args.conns)
    await host.start(args.host, 0)

    async def echo(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        return {"echo": header}, payload

    async def fail(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        raise ValueError("handler exploded on purpose")

    async def sleep(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        await asyncio.sleep(header["s"])
        return {}, b""

    async def recv_sha(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        hdr, data = await host.recv(peer_id, header["tag"], timeout=60)
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "header": hdr}, b""

    async def send_back(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        await host.send(peer_id, header["tag"], {"seed": header["seed"]}, pattern(header["seed"], header["size"]))
        return {}, b""

    async def stats(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        """What an attack costs this process: resident memory, asyncio tasks, open connections."""
        with open("/proc/self/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"rss_mb": rss_kb / 1024, "tasks": len(asyncio.all_tasks()), "live": len(host._live)}, b""

    handlers = {"echo": echo, "fail": fail, "sleep": sleep, "recv_sha": recv_sha, "send_back": send_back,
                "stats": stats}
    for name, fn in handlers.items():
        host.handle(name, fn)
    print("READY " + json.dumps({"address": host.address, "peer_id": host.peer_id}), flush=True)
    if args.connect:
        try:
            remote = await host.connect(args.connect)
            print(f"CONNECTED {remote}", flush=True)
        except LowbandError as e:
            print(f"CONNECT-FAILED {type(e).__name__}: {e}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--token", default="swarm-token-b94de711f24b1b117b1e35ebf8e6f5a3301e96dc")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--conns", type=int, default=2)
    p.add_argument("--impostor", action="store_true")
    p.add_argument("--connect", default="")
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="LOG %(levelname)s %(message)s")
    install_event_loop_policy()
    asyncio.run(main(p.parse_args()))
