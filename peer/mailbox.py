"""The tagged mailbox of a PeerHost: completed one-way messages wait here for ``recv``.

Messages are keyed by (peer id, tag). A receiver already waiting gets a message directly;
otherwise it is buffered, counted against the sending peer's unread-bytes limit.
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque

from peer.errors import PeerUnavailable, TransportTimeout

log = logging.getLogger("lowband.transport")

Envelope = tuple[dict, bytearray]  # (header, payload) of one received message


def _expire(fut: asyncio.Future, peer_id: str, tag: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(TransportTimeout(f"no message {tag!r} from {peer_id[:12]} within {timeout}s"))


class Mailbox:
    def __init__(self, max_bytes_per_peer: int) -> None:
        self.max_bytes_per_peer = max_bytes_per_peer
        self._mail: dict[tuple[str, str], deque[Envelope]] = defaultdict(deque)
        self._waiters: dict[tuple[str, str], deque[asyncio.Future]] = defaultdict(deque)
        self._bytes: dict[str, int] = {}  # peer id -> completed, unread bytes

    def buffered(self) -> int:
        """(peer, tag) keys with buffered messages."""
        return len(self._mail)

    def take(self, peer_id: str, tag: str) -> Envelope | None:
        """A buffered message, if any (no waiting)."""
        key = (peer_id, tag)
        box = self._mail.get(key)
        if not box:
            return None
        msg = box.popleft()
        if not box:
            del self._mail[key]
        self._unbuffer(peer_id, len(msg[1]))
        return msg

    async def wait(self, peer_id: str, tag: str, timeout: float | None) -> Envelope:
        """Wait for the next message (call :meth:`take` first); fails as :meth:`fail_peer` says."""
        key = (peer_id, tag)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters[key].append(fut)
        # a timer on the future itself, not wait_for: this runs once per received message
        timer = None if timeout is None else loop.call_later(max(0.0, timeout), _expire, fut, peer_id, tag, timeout)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            waiters = self._waiters.get(key)
            if waiters is not None:
                if fut in waiters:  # membership test first: deque.remove's error would repr a huge result
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[key]

    def deliver(self, peer_id: str, tag: str, msg: Envelope) -> bool:
        """Hand ``msg`` to a waiting receiver or buffer it; False: it would exceed the peer's
        unread-bytes limit (dropped; the caller cuts the peer off)."""
        key = (peer_id, tag)
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(msg)
                return True
        buffered, size, limit = self._bytes.get(peer_id, 0), len(msg[1]), self.max_bytes_per_peer
        if buffered and buffered + size > limit:
            # nobody reads what this peer sends: refuse rather than buffer without bound
            log.warning("dropping connections to %s: %d unread bytes buffered, a %d-byte message "
                        "under %r would exceed the %d-byte mailbox limit", peer_id[:12], buffered,
                        size, tag, limit)
            return False
        self._bytes[peer_id] = buffered + size
        self._mail[key].append(msg)
        return True

    def discard_tag(self, prefix: str) -> int:
        """Drop buffered messages whose tag starts with ``prefix``; how many were dropped."""
        dropped = 0
        for key in [k for k in self._mail if k[1].startswith(prefix)]:
            box = self._mail.pop(key)
            dropped += len(box)
            self._unbuffer(key[0], sum(len(payload) for _, payload in box))
        return dropped

    def fail_peer(self, peer_id: str, reason: str) -> None:
        """Wake everyone waiting on ``peer_id`` with PeerUnavailable (buffered mail stays)."""
        for key in [k for k in self._waiters if k[0] == peer_id]:
            for fut in self._waiters.pop(key):
                if not fut.done():
                    fut.set_exception(PeerUnavailable(reason))

    def fail_all(self, reason: str) -> None:
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(PeerUnavailable(reason))

    def _unbuffer(self, peer_id: str, size: int) -> None:
        left = self._bytes.get(peer_id, 0) - size
        if left > 0:
            self._bytes[peer_id] = left
        else:
            self._bytes.pop(peer_id, None)
