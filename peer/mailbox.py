"""The tagged mailbox of a PeerHost: completed one-way messages wait here for ``recv``.

Messages are keyed by (peer id, tag). A receiver already waiting gets a message directly;
otherwise it is buffered, counted against the sending peer's unread-bytes limit and against a
host-wide one (identities are free, so per-peer limits alone do not bound the host's memory).

When the host-wide limit is reached, room is made before anyone is refused: first the unread
mail of peers no longer connected is dropped, then the peer holding the most unread bytes is
evicted (its mail dropped, the host cuts it off), unless that is the sender, whose message is
then refused. Junk parked by many throwaway identities therefore cannot shut out honest peers.
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from typing import Callable

from peer.errors import PeerUnavailable, TransportTimeout

log = logging.getLogger("lowband.transport")

Envelope = tuple[dict, bytearray]  # (header, payload) of one received message


def _expire(fut: asyncio.Future, peer_id: str, tag: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(TransportTimeout(f"no message {tag!r} from {peer_id[:12]} within {timeout}s"))


class Mailbox:
    def __init__(self, max_bytes_per_peer: int, max_bytes_total: int = 1 << 62, *,
                 connected: Callable[[str], bool] = lambda _: True,
                 evict: Callable[[str, str], object] = lambda peer_id, reason: None) -> None:
        """``connected(peer_id)``: whether the peer still has a connection; ``evict(peer_id,
        reason)``: cut a peer off whose mail was dropped to make room."""
        self.max_bytes_per_peer = max_bytes_per_peer
        self.max_bytes_total = max_bytes_total
        self._connected = connected
        self._evict = evict
        self.total = 0  # completed, unread bytes of every peer
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

    def deliver(self, peer_id: str, tag: str, msg: Envelope) -> str | None:
        """Hand ``msg`` to a waiting receiver or buffer it. Returns None, or why it was refused
        (it would exceed the peer's or the host's unread-bytes limit; dropped, and the caller
        cuts the peer off)."""
        key = (peer_id, tag)
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(msg)
                return None
        buffered, size = self._bytes.get(peer_id, 0), len(msg[1])
        # nobody reads what this peer sends: refuse rather than buffer without bound
        if buffered and buffered + size > self.max_bytes_per_peer:
            reason = (f"{buffered} unread bytes buffered, a {size}-byte message under {tag!r} would "
                      f"exceed the {self.max_bytes_per_peer}-byte mailbox limit")
        elif self.total + size > self.max_bytes_total and not self._make_room(peer_id, size):
            reason = (f"{self.total} unread bytes buffered from all peers, a {size}-byte message "
                      f"under {tag!r} would exceed the host-wide {self.max_bytes_total}-byte mailbox limit")
        else:
            self._bytes[peer_id] = buffered + size
            self.total += size
            self._mail[key].append(msg)
            return None
        return reason

    def _make_room(self, sender: str, size: int) -> bool:
        """Free buffered mail (see the module docstring) until ``size`` more bytes fit; False:
        the sender itself holds the most, and is refused."""
        for peer_id in [p for p in self._bytes if p != sender and not self._connected(p)]:
            log.warning("host-wide mailbox limit reached: dropping %d unread bytes of departed peer %s",
                        self._bytes[peer_id], peer_id[:12])
            self.drop_peer(peer_id)
        while self.total + size > self.max_bytes_total:
            holder = max(self._bytes, key=self._bytes.__getitem__, default=None)
            if holder is None or self._bytes.get(sender, 0) + size >= self._bytes[holder]:
                return False
            reason = (f"host-wide mailbox limit of {self.max_bytes_total} bytes reached, and this peer "
                      f"holds the most unread bytes ({self._bytes[holder]}): its mail is dropped")
            self.drop_peer(holder)
            self._evict(holder, reason)
        return True

    def drop_peer(self, peer_id: str) -> int:
        """Drop every buffered message of ``peer_id``; how many bytes were freed."""
        freed = 0
        for key in [k for k in self._mail if k[0] == peer_id]:
            freed += sum(len(payload) for _, payload in self._mail.pop(key))
        self._unbuffer(peer_id, freed)
        return freed

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
        self.total -= size
        left = self._bytes.get(peer_id, 0) - size
        if left > 0:
            self._bytes[peer_id] = left
        else:
            self._bytes.pop(peer_id, None)
