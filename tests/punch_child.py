"""Child process for tests/test_punch.py: one side of a hole punch, run inside a NatLab namespace.

Listens on --host:0 with SO_REUSEPORT (as a PeerHost listener must for punching), learns where
that port is seen from outside by dialling the observer (testing/natprobe.py serve) *from the
listening port*, and prints ``READY {...}``. Then reads stdin lines -- the parent is the channel
that carries offers and answers (a relay in the product):

* ``GO`` (we offer): prints ``OFFER <hex PunchOffer>``, reads ``ANSWER <hex>``, and starts
  --lead s after it arrived, less half the round trip it measured;
* ``OFFER <hex>`` (we answer): prints ``ANSWER <hex PunchAnswer>`` and starts --lead s later.

Both print ``PLAN {...}``, run peer.punch.simultaneous_open at the agreed moment (an inbound
connection the listener gets from the punched address is taken too, through a PunchBook), run a
real credential-mode peer.handshake.Handshake over the socket with the role peer.punch.is_initiator
gives, exchange one AEAD record each way, and print ``RESULT {...}``. The private key comes in
LOWBAND_TEST_KEY and the authority's in LOWBAND_TEST_AUTHORITY (hex); each side issues itself a
train credential.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import time

from peer.credentials import issue
from peer.handshake import Handshake
from peer.identity import Identity
from peer.punch import PunchAnswer, PunchBook, PunchFailed, PunchOffer, classify_mapping, plan, simultaneous_open
from peer.secure import SecureChannel
from peer.transport import install_event_loop_policy
from peer.wire import FrameType
from testing import natprobe

_IO_TIMEOUT_S = 5.0


def say(kind: str, value: object) -> None:
    print(f"{kind} {value if isinstance(value, str) else json.dumps(value)}", flush=True)


async def handshake(sock: socket.socket, hs: Handshake, hello: str) -> dict:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(hs.data_to_send())
        while not hs.done:
            data = await asyncio.wait_for(reader.read(65536), _IO_TIMEOUT_S)
            if not data:
                raise ConnectionError("peer closed during the handshake")
            try:
                hs.receive_data(data)
            finally:
                writer.write(hs.data_to_send())
        result = hs.result
        channel = SecureChannel(result.send_key, result.recv_key)
        writer.write(bytes(channel.seal_frame(FrameType.DATA, {"hello": hello})))
        frames = channel.feed(hs.take_trailing_data())
        while not frames:
            data = await asyncio.wait_for(reader.read(65536), _IO_TIMEOUT_S)
            if not data:
                raise ConnectionError("peer closed before its first record")
            frames = channel.feed(data)
        await writer.drain()
        return {"peer_id": result.peer_id, "roles": sorted(result.roles or ()),
                "th": result.transcript_hash.hex(), "got": frames[0].header.get("hello"),
                "local": list(sock.getsockname()[:2]), "peer": list(sock.getpeername()[:2])}
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> None:
    identity = Identity.from_private_bytes(bytes.fromhex(os.environ["LOWBAND_TEST_KEY"]))
    authority = Identity.from_private_bytes(bytes.fromhex(os.environ["LOWBAND_TEST_AUTHORITY"]))
    credential = issue(authority, identity.public_bytes, ["train"], now=time.time(), lifetime_s=3600, serial=1)
    loop = asyncio.get_running_loop()
    book = PunchBook()
    accepted: asyncio.Future = loop.create_future()

    # The listener, as PeerHost's must be for punching: SO_REUSEPORT, so the punch can share its port.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((args.host, 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def serve() -> None:
        while True:
            conn, peer = await loop.sock_accept(listener)
            if book.inbound(peer) is not None and not accepted.done():
                accepted.set_result(conn)  # the peer's SYN reached the listener: the punch's connection
            else:
                conn.close()

    server = asyncio.ensure_future(serve())
    observer_host, observer_port = args.observer.rsplit(":", 1)
    seen = await loop.run_in_executor(None, natprobe.dial, args.host, observer_host, int(observer_port), port)
    if not seen["ok"]:
        raise SystemExit(f"observer unreachable: {seen}")
    observed = (seen["observed"][0], seen["observed"][1])
    mapping = classify_mapping((args.host, port), observed)
    say("READY", {"mapping": mapping})

    async def line() -> tuple[str, str]:
        kind, _, data = (await loop.run_in_executor(None, sys.stdin.readline)).strip().partition(" ")
        return kind, data

    kind, data = await line()
    if kind == "OFFER":
        their = PunchOffer.decode(bytes.fromhex(data))
        answer = PunchAnswer.to(their, identity.peer_id, observed, mapping, lead_s=args.lead, window_s=args.window)
        mine = plan(identity.peer_id, their, answer, now=time.time())
        say("ANSWER", answer.encode().hex())
    else:  # GO: we offer, and time the channel's round trip
        offer = PunchOffer.make(identity.peer_id, observed, mapping)
        sent = time.time()
        say("OFFER", offer.encode().hex())
        kind, data = await line()
        now = time.time()
        mine = plan(identity.peer_id, offer, PunchAnswer.decode(bytes.fromhex(data)), now=now, rtt_s=now - sent)
    if args.late:  # a peer whose start lags (slow channel, busy host): its peer's SYN comes first
        mine = dataclasses.replace(mine, at=mine.at + args.late)
    say("PLAN", {"listen": [args.host, port], "observed": list(observed), "mapping": mapping,
                 "remote": list(mine.remote), "initiator": mine.initiator,
                 "worth_trying": mine.prediction.worth_trying, "reason": mine.prediction.reason})
    book.add(mine)
    dial = asyncio.ensure_future(simultaneous_open((args.host, port), mine.remote, at=mine.at,
                                                   window_s=mine.window_s))
    try:
        done, _ = await asyncio.wait({dial, accepted}, return_when=asyncio.FIRST_COMPLETED)
        via = "connect" if dial in done else "accept"
        sock = dial.result() if dial in done else accepted.result()
    except PunchFailed as e:
        say("RESULT", {"ok": False, "error": str(e), "seconds": round(time.time() - mine.at, 3)})
        return
    finally:
        dial.cancel()
        book.remove(mine)
    seconds = round(time.time() - mine.at, 4)
    sock.setblocking(False)
    hs = Handshake(identity, None, initiator=mine.initiator, expected_peer_id=mine.peer_id,
                   credential=credential, authority=authority.public_bytes)
    result = await handshake(sock, hs, args.hello)
    say("RESULT", {"ok": True, "via": via, "seconds": seconds, "initiator": mine.initiator, **result})
    server.cancel()
    listener.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--observer", required=True, help="ip:port of a natprobe serve")
    p.add_argument("--hello", default="hi")
    p.add_argument("--lead", type=float, default=0.5)
    p.add_argument("--window", type=float, default=4.0)
    p.add_argument("--late", type=float, default=0.0, help="start this many seconds after the agreed moment")
    install_event_loop_policy()
    asyncio.run(main(p.parse_args()))
