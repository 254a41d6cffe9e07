"""``collectives.ring.Sender``: closing it sends every message queued before the close, whatever
its phase. The robust all-reduce queues its all-gather chunks at phase 2, the number the ring
used for the end marker, so a close while chunks were still queued dropped all but the first:
receivers then timed out on the shard's last chunk ("no message ...|g|11"), every step of a
3-peer tiny-preset run with ``--robust detect`` aborted and the peers split and resynced.

Real PeerHosts on 127.0.0.1; the messages are queued before the sender runs, so the order the
queue yields them is the only thing under test.
"""
from __future__ import annotations

import asyncio

from collectives.ring import Sender
from collectives.robust import _GATHER
from peer.identity import Identity
from peer.transport import PeerHost

TOKEN = b"sender-close-token-4e0c9a1b7d2f"


async def test_close_sends_every_queued_message_of_every_phase():
    a, b = PeerHost(Identity.generate(), TOKEN), PeerHost(Identity.generate(), TOKEN)
    try:
        await a.start("127.0.0.1", 0)
        address = await b.start("127.0.0.1", 0)
        await a.connect(address, b.peer_id)
        sender = Sender(a, b.peer_id, timeout_s=10.0)
        for phase in (0, 1, _GATHER):
            for chunk in range(3):
                sender.put((phase, 0, chunk), f"m{phase}.{chunk}", {"c": chunk}, b"x" * 1000)
        sender.close()
        await asyncio.wait_for(sender.run(), 10)
        for phase in (0, 1, _GATHER):
            for chunk in range(3):
                header, payload = await b.recv(a.peer_id, f"m{phase}.{chunk}", timeout=5)
                assert header == {"c": chunk} and len(payload) == 1000
    finally:
        await a.close()
        await b.close()
