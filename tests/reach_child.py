"""Child process for tests/test_reachability.py: a bare PeerHost listening under a given key.

The parent passes the private key (hex) in LOWBAND_TEST_KEY, so it knows the identity the
coordinator's probe must find, and either the swarm token (--token) or, for credential mode, the
authority's private key in LOWBAND_TEST_AUTHORITY (the child issues itself a train credential).
Prints ``READY {"address", "peer_id"}`` once listening, then ``INBOUND <peer_id>`` each time an
authenticated peer (the probe) has come and gone, and serves until killed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from peer.credentials import issue
from peer.identity import Identity
from peer.transport import PeerHost, install_event_loop_policy


async def main(args: argparse.Namespace) -> None:
    identity = Identity.from_private_bytes(bytes.fromhex(os.environ["LOWBAND_TEST_KEY"]))
    if "LOWBAND_TEST_AUTHORITY" in os.environ:
        authority = Identity.from_private_bytes(bytes.fromhex(os.environ["LOWBAND_TEST_AUTHORITY"]))
        credential = issue(authority, identity.public_bytes, ["train"], now=time.time(),
                           lifetime_s=3600, serial=1)
        host = PeerHost(identity, None, credential=credential, authority=authority.public_bytes)
    else:
        host = PeerHost(identity, args.token.encode())
    await host.start(args.host, 0)
    host.on_peer_lost(lambda peer_id: print(f"INBOUND {peer_id}", flush=True))
    print("READY " + json.dumps({"address": host.address, "peer_id": host.peer_id}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--token", default="")
    p.add_argument("--host", default="127.0.0.1")
    install_event_loop_policy()
    asyncio.run(main(p.parse_args()))
