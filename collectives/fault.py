"""Abort, agree on survivors, retry: the fault protocol every collective runs under.

PCCL-style (papers.md, "Prime Collective Communications Library"): membership only changes
between attempts. One attempt = one operation tag + attempt number; every message tag of the
attempt starts with ``attempt_prefix`` so a retry never consumes a stale message.

While an attempt runs, each peer listens to every other member for an abort notice. When a peer
fails locally (neighbour lost, stalled past its deadline, mismatched input) or hears an abort:

1. it cancels its work and sends ``x1`` (the abort notice, which also proves it is alive, and
   lists the members it saw die) to all members it has not seen die, then waits, up to an
   agreement deadline, until it has heard ``x1`` from every member not seen dead by anyone
   (and not ruled out by the membership hook);
2. it sends the set it heard from (``x2``) to those peers and waits for theirs; the survivors
   are what it heard, intersected with every set it received, restricted to those that answered.

A dead or stalled peer sends nothing in time, so everyone drops it; asymmetric views are
reconciled by the intersection of step 2. A peer whose failure no retry can fix (mismatched
inputs, non-finite values) sends ``x1`` marked "leave" with its reason and raises; the others
raise too, naming it. The caller gets a result or a ``CollectiveError``.

Known limit: completion is not atomic. A peer that already returned does not answer a later
abort of the same attempt, so if a peer dies in the last moments of an operation, the peers
still finishing retry without the finished ones and their results differ from the finished
peers'. A state-hash comparison after each outer step (as PCCL does) catches that and resyncs.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from peer.errors import LowbandError, PeerUnavailable

from .errors import CollectiveAborted, CollectiveError
from .group import Group

log = logging.getLogger(__name__)
T = TypeVar("T")

# body(members, attempt_prefix, deadline_loop_time) -> result of one attempt
AttemptBody = Callable[[list[str], str, float], Awaitable[T]]
DeadlineFn = Callable[[list[str]], float]


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not tag or "|" in tag or len(tag) > 200:
        raise CollectiveError(f"tag must be a non-empty str without '|' (<= 200 chars), got {tag!r}")
    return tag


def attempt_prefix(kind: str, tag: str, attempt: int) -> str:
    # The trailing '|' keeps prefix-discard of attempt 1 from touching attempt 10.
    return f"lbc|{kind}|{tag}|{attempt}|"


def _retryable(exc: BaseException) -> bool:
    """Transport trouble and timeouts change membership; anything else is the caller's input."""
    if isinstance(exc, CollectiveError):
        return isinstance(exc, CollectiveAborted)
    return isinstance(exc, (LowbandError, TimeoutError, asyncio.TimeoutError, OSError))


class _Attempt:
    def __init__(self, group: Group, members: list[str], prefix: str) -> None:
        self.group, self.host, self.members, self.prefix = group, group.host, members, prefix
        self.me = group.self_id
        self.others = [m for m in members if m != self.me]
        self.heard: set[str] = set()
        self.dead: set[str] = set()            # lost our connection(s) to it
        self.reported_dead: set[str] = set()   # another member lost its connection(s) to it
        self.reasons: list[str] = []
        self.triggered = asyncio.Event()
        self.background: set[asyncio.Task] = set()
        self.fatal: CollectiveError | None = None

    def trigger(self, reason: str) -> None:
        if not self.triggered.is_set():
            self.reasons.append(reason)
            self.triggered.set()

    async def _watch(self, peer: str) -> None:
        try:
            header, _ = await self.host.recv(peer, self.prefix + "x1", timeout=None)
            if isinstance(header, dict) and isinstance(header.get("dead"), list):
                self.reported_dead.update(p for p in header["dead"] if isinstance(p, str))
            if isinstance(header, dict) and header.get("leave"):
                # It hit an error no retry can fix (its inputs differ from ours or are invalid):
                # the caller's mistake, so every peer reports it rather than going on without it.
                self.fatal = CollectiveError(f"peer {peer[:8]} failed: {str(header['leave'])[:500]}")
            else:
                self.heard.add(peer)
            self.trigger(f"abort notice from {peer[:8]}")
        except PeerUnavailable:
            # Not a trigger by itself: a peer that already did its part may close while the
            # rest finish from buffered messages. Whoever still needs it fails in its own
            # send/recv; here it only stops the agreement from waiting for a dead peer.
            self.dead.add(peer)

    def _post(self, peer: str, suffix: str, header: dict, timeout: float) -> None:
        async def send() -> None:
            try:
                await asyncio.wait_for(self.host.send(peer, self.prefix + suffix, header, b""), timeout)
            except (LowbandError, OSError, asyncio.TimeoutError):
                pass  # a peer we cannot reach simply does not count as heard by it
        task = asyncio.get_running_loop().create_task(send())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def run(self, body: AttemptBody, deadline: float) -> T:
        loop = asyncio.get_running_loop()
        watchers = [loop.create_task(self._watch(p)) for p in self.others]
        work = loop.create_task(body(self.members, self.prefix, deadline))
        trig = loop.create_task(self.triggered.wait())
        try:
            await asyncio.wait({work, trig}, timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if work.done() and not work.cancelled() and work.exception() is None:
                return work.result()
            if not work.done():
                self.trigger("attempt deadline passed")
                work.cancel()
            else:
                exc = work.exception()
                self.trigger(f"{type(exc).__name__}: {exc}")
                if not _retryable(exc):
                    # e.g. mismatched inputs or a non-finite value: retrying cannot help. Tell
                    # the others to go on without us, and fail now.
                    agree_s = self.group.policy.agree_s(self.host, self.others)
                    for p in self.others:
                        self._post(p, "x1", {"leave": f"{type(exc).__name__}: {exc}"}, agree_s)
                    await asyncio.wait(set(self.background), timeout=agree_s)
                    raise exc
            await asyncio.gather(work, return_exceptions=True)
            survivors = await self._agree(watchers) if self.fatal is None else []
            if self.fatal is not None:
                raise self.fatal
        finally:
            trig.cancel()
            for w in watchers:
                w.cancel()
            await asyncio.gather(trig, *watchers, return_exceptions=True)
        raise CollectiveAborted(f"attempt {self.prefix!r} aborted ({'; '.join(self.reasons)}); "
                                f"survivors {[s[:8] for s in survivors]}", survivors)

    async def _agree(self, watchers: list[asyncio.Task]) -> list[str]:
        loop = asyncio.get_running_loop()
        policy = self.group.policy
        agree_s = policy.agree_s(self.host, self.others)
        hook = self.group.believed_alive()
        for p in self.others:
            if p not in self.dead:
                self._post(p, "x1", {"dead": sorted(self.dead)}, agree_s)
        # Round 1: hear x1 from everyone that might still be alive (the watchers collect them).
        # Peers that anyone saw die are not waited for (they still count if they do answer).
        end = loop.time() + agree_s
        while loop.time() < end:
            waiting = [p for p in self.others if p not in self.heard and p not in self.dead
                       and p not in self.reported_dead and (hook is None or p in hook)]
            if not waiting:
                break
            pending = [w for w in watchers if not w.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=end - loop.time(), return_when=asyncio.FIRST_COMPLETED)
        heard = sorted(self.heard | {self.me})
        # Round 2: exchange what each heard; keep only what everyone that answered agrees on.
        for p in heard:
            if p != self.me:
                self._post(p, "x2", {"heard": heard}, agree_s)
        survivors = set(heard)
        # Everyone in `heard` is alive and answers as soon as its own round 1 ends, which may be
        # up to a full round after ours: wait two rounds.
        replies = await asyncio.gather(*(self.host.recv(p, self.prefix + "x2", timeout=2 * agree_s)
                                         for p in heard if p != self.me), return_exceptions=True)
        for p, reply in zip([p for p in heard if p != self.me], replies):
            if isinstance(reply, BaseException):
                survivors.discard(p)
                continue
            their = reply[0].get("heard") if isinstance(reply[0], dict) else None
            if isinstance(their, list):
                survivors &= set(their)
            else:
                survivors.discard(p)
        if self.me not in survivors:
            raise CollectiveError(f"this peer was excluded by the others after {self.prefix!r} aborted "
                                  f"({'; '.join(self.reasons)})")
        return [m for m in self.members if m in survivors]

    def cleanup(self) -> None:
        for task in list(self.background):
            task.cancel()
        self.host.discard_tag(self.prefix)


async def run_resilient(group: Group, kind: str, tag: str, body: AttemptBody,
                        deadline_s: DeadlineFn, timeout: float | None = None) -> T:
    """Run ``body`` over the group, retrying over agreed survivors after each abort.

    ``deadline_s(members)`` gives one attempt's deadline; ``timeout`` (if set) caps the total.
    A group of one runs ``body`` directly (it returns the input unchanged)."""
    validate_tag(tag)
    loop = asyncio.get_running_loop()
    t_end = loop.time() + timeout if timeout is not None else None
    members = list(group.members)
    reasons: list[str] = []
    attempts: list[_Attempt] = []
    try:
        for attempt in range(group.max_attempts):
            if len(members) < group.min_peers:
                raise CollectiveError(f"collective {tag!r}: only {len(members)} peer(s) left, "
                                      f"min_peers={group.min_peers} ({'; '.join(reasons)})")
            deadline = loop.time() + deadline_s(members)
            if t_end is not None:
                if loop.time() >= t_end:
                    break
                deadline = min(deadline, t_end)
            prefix = attempt_prefix(kind, tag, attempt)
            if len(members) == 1:
                return await body(members, prefix, deadline)
            att = _Attempt(group, members, prefix)
            attempts.append(att)
            try:
                return await att.run(body, deadline)
            except CollectiveAborted as exc:
                log.warning("collective %s attempt %d aborted: %s", tag, attempt, exc)
                reasons.append(str(exc))
                members = exc.survivors
        raise CollectiveError(f"collective {tag!r} failed after {len(attempts)} attempt(s): "
                              + " | ".join(reasons))
    finally:
        for att in attempts:
            att.cleanup()
