"""HTTP routes over the checkpoint store (coordinator/checkpoints.py), one per store method.
Bodies are size-capped and every chunk is verified against its name.

- ``GET  /api/runs/{run}/checkpoints``                  -> {"steps": [...], "latest": N|null}
- ``POST /api/runs/{run}/checkpoints/missing``  {"shas": [...]} -> {"missing": [...]} (resume:
  an uploader sends only these; a downloader asks the same of its local store)
- ``PUT  /api/runs/{run}/chunks/{sha}``  raw bytes   -> {"sha", "size"} (409-free: idempotent)
- ``GET  /api/runs/{run}/chunks/{sha}``              -> raw bytes (verified before sending)
- ``PUT  /api/runs/{run}/checkpoints/{step}``  manifest JSON -> {"step", "state_hash"}; refused
  (409) while chunks are missing or when another state holds the step
- ``GET  /api/runs/{run}/checkpoints/{step|latest}`` -> the manifest JSON

Writes come only from the run (docs/security.md). ``missing``, chunk PUTs and manifest PUTs are
signed requests of a ``train`` identity that took part in one of the run's last
``RECENT_WINDOWS`` outer steps. A manifest for step s is published only when

- the uploader is one of step s's voters: the participants of its rendezvous window (for a step
  taken offline, without a window, those of the last window before it);
- the coordinator knows the state the run agreed on after step s (``votes.step_majority``:
  weighted by verified contribution, never decided by the first report alone; for an offline
  step, more than half of its voters' weight), so the step was completed;
- the manifest's ``meta.global_state_hash`` is that majority hash, and the tensors really hash
  to it (``checkpoints.trainer_state_hash`` over the stored chunks).

Disk: each run has a quota (``RetentionPolicy.quota_bytes``) over all of its chunks, published
or not, each charged at least ``MIN_CHUNK_CHARGE``; chunks an uploader wrote that no published
manifest uses yet count against its own ``pending_bytes`` too, so one member cannot fill the
run's quota. An upload that would exceed the quota first collects unreferenced chunks older
than the grace period (so junk lives at most ``grace_s``), then is refused with 507.

``latest`` is the newest *trusted* checkpoint: one whose state hash is its step's majority (a
store with no run known here, e.g. one the operator filled, falls back to the newest step).
After each committed manifest the coordinator applies its :class:`RetentionPolicy`
(``CheckpointStore.prune``), never deleting the newest trusted checkpoint.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

from aiohttp import web

from coordinator import votes
from coordinator.auth import require_role
from coordinator.checkpoints import (DEFAULT_GRACE_S, MIN_CHUNK_CHARGE, Backend, BackendError,
                                     CheckpointConflict, CheckpointError, CheckpointNotFound,
                                     CheckpointStore, CorruptChunk, LocalBackend, ManifestError,
                                     MissingChunk, trainer_state_hash)
from coordinator.defaults import DEFAULT_CHECKPOINT_QUOTA_BYTES
from coordinator.registry import check_not_banned
from coordinator.runs import RUNS, RunService, run_row
from coordinator.validation import ApiError, bad, check_body, read_json_object
from peer.blobs import InvalidName, Manifest, check_sha, check_step

DEFAULT_MAX_CHUNK_BYTES = 8 * 1024 * 1024   # peers upload 4 MiB chunks (peer.blobs.CHUNK_SIZE)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_QUERY_SHAS = 100_000
BODY_TIMEOUT_S = 60.0  # a chunk over a slow link still arrives; a stalled client is cut off
# An uploader took part in one of the run's last this many outer steps (a background upload may
# finish a few steps after the one it saves; offline steps have no window at all).
RECENT_WINDOWS = 16
TRUST_SCAN = 64  # newest stored steps examined for the trusted ``latest``

CHECKPOINTS = web.AppKey("checkpoint_backend", object)
MAX_CHUNK = web.AppKey("checkpoint_max_chunk", int)
RETENTION = web.AppKey("checkpoint_retention", object)
LEDGER = web.AppKey("checkpoint_ledger", object)

log = logging.getLogger("lowband.coordinator.checkpoints")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints survive a commit: the ``keep_last`` newest steps of the run (None: keep
    everything) plus every step divisible by ``keep_every``, plus always the newest trusted one.
    An unreferenced chunk is deleted only once older than ``grace_s``, so an upload in flight
    keeps its chunks.

    Disk: ``quota_bytes`` bounds each run's chunks (None: no bound); ``pending_bytes`` bounds
    what one uploader holds in chunks no published manifest references (None: half the quota).
    Size the quota for ``keep_last`` + 1 checkpoints (chunks shared between steps count once)."""
    keep_last: int | None = 5
    keep_every: int | None = None
    grace_s: float = DEFAULT_GRACE_S
    quota_bytes: int | None = DEFAULT_CHECKPOINT_QUOTA_BYTES
    pending_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be at least 1, got {self.keep_every}")
        if not self.grace_s >= 0:
            raise ValueError(f"the chunk grace period must be >= 0 seconds, got {self.grace_s}")
        for name in ("quota_bytes", "pending_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < MIN_CHUNK_CHARGE):
                raise ValueError(f"{name} must be None or an int >= {MIN_CHUNK_CHARGE}, got {value!r}")

    @property
    def pending_limit(self) -> int | None:
        if self.pending_bytes is not None:
            return self.pending_bytes
        return None if self.quota_bytes is None else self.quota_bytes // 2


class Retention:
    """Applies a :class:`RetentionPolicy` after each commit, one commit-and-prune per run at a
    time (so no manifest is published while ``gc`` decides what is unreferenced).

    The mtime grace covers chunks an upload writes, but not old chunks it reuses: ``missing``
    tells an uploader to skip chunks already stored, and a prune may be about to delete exactly
    those. Such claims are spared like young chunks until a manifest using them is committed
    (from then on that manifest protects them) or ``grace_s`` passes (an abandoned upload)."""

    def __init__(self, policy: RetentionPolicy) -> None:
        self.policy = policy
        self.last: dict | None = None  # outcome of the latest prune, for /api/status
        self._claims: dict[str, dict[str, float]] = {}  # run -> sha -> last claim (unix s), oldest first
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, run: str) -> asyncio.Lock:
        return self._locks.setdefault(run, asyncio.Lock())

    def claim(self, run: str, shas: Iterable[str]) -> None:
        """Stored chunks an uploader relies on; only stored ones, so this is bounded by the store."""
        if self.policy.grace_s <= 0:
            return  # the operator chose no grace at all
        now = time.time()
        claims = self._claims.setdefault(run, {})
        for sha in shas:
            claims.pop(sha, None)  # re-insert: dict order stays oldest claim first
            claims[sha] = now
        expired = []
        for sha, at in claims.items():
            if at > now - self.policy.grace_s:
                break
            expired.append(sha)
        for sha in expired:
            del claims[sha]

    def release(self, run: str, shas: Iterable[str]) -> None:
        claims = self._claims.get(run, {})
        for sha in shas:
            claims.pop(sha, None)

    def protect(self, run: str) -> Callable[[str], bool]:
        claims = self._claims.setdefault(run, {})
        # Called from the prune's worker thread; dict.get is atomic under the GIL.
        return lambda sha: claims.get(sha, 0.0) > time.time() - self.policy.grace_s

    def collect(self, store: CheckpointStore) -> int:
        """Delete the run's unreferenced chunks past the grace period (blocking I/O: call in a
        thread, under ``lock``)."""
        return store.gc(self.policy.grace_s, self.protect(store.run))

    async def apply(self, store: CheckpointStore, committed: int, keep: Iterable[int] = ()) -> None:
        """Prune ``store``'s run after step ``committed`` was published (never deleting it nor
        the steps in ``keep``). A failure is logged, not raised: the commit itself succeeded."""
        p = self.policy
        if p.keep_last is None:
            return
        try:
            result = await asyncio.to_thread(store.prune, p.keep_last, p.keep_every, p.grace_s,
                                             keep_steps=(committed, *keep), protect=self.protect(store.run))
        except (CheckpointError, OSError) as e:
            log.warning("retention for run %s after step %d failed: %s", store.run, committed, e)
            self.last = {"run": store.run, "step": committed, "at": time.time(), "error": str(e)[:300]}
            return
        self.last = {"run": store.run, "step": committed, "at": time.time(),
                     "deleted_steps": result.deleted_steps, "chunks_removed": result.chunks_removed}
        if result.deleted_steps or result.chunks_removed:
            log.info("retention for run %s after step %d: deleted checkpoints %s and %d "
                     "unreferenced chunks (keep last %d, every %s)", store.run, committed,
                     result.deleted_steps, result.chunks_removed, p.keep_last, p.keep_every)


class UploadLedger:
    """Disk accounting of the upload routes, per run: the bytes its chunks occupy (one listing,
    then kept current by each write; listed again after anything is collected) and, per
    uploader, the chunks it wrote that no published manifest references yet (*pending*).
    Pending entries leave the ledger when a manifest using them is published or after the grace
    period, when ``gc`` may delete them; so an uploader's pending bytes are bounded per grace
    period. Kept in memory: after a restart the listing still counts every byte."""

    def __init__(self, policy: RetentionPolicy) -> None:
        self.policy = policy
        self._used: dict[str, int] = {}
        self._pending: dict[str, dict[str, tuple[str, int, float]]] = {}  # run -> sha -> (peer, bytes, at)
        self._by_peer: dict[str, Counter[str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, run: str) -> asyncio.Lock:
        return self._locks.setdefault(run, asyncio.Lock())

    async def used(self, store: CheckpointStore) -> int:
        if store.run not in self._used:
            self._used[store.run] = await asyncio.to_thread(store.usage)
        return self._used[store.run]

    def forget_usage(self, run: str) -> None:
        """Chunks were deleted: list the run again at the next check."""
        self._used.pop(run, None)

    def add(self, run: str, peer_id: str, sha: str, charge: int) -> None:
        if run in self._used:
            self._used[run] += charge
        pending = self._pending.setdefault(run, {})
        if sha not in pending:
            pending[sha] = (peer_id, charge, time.time())
            self._by_peer.setdefault(run, Counter())[peer_id] += charge

    def unadd(self, run: str, sha: str) -> None:
        """The write charged by ``add`` failed: nothing of it is anyone's to pay for."""
        self.forget_usage(run)
        self.settle(run, (sha,))

    def pending(self, run: str, peer_id: str) -> int:
        self._expire(run)
        return self._by_peer.get(run, Counter())[peer_id]

    def settle(self, run: str, shas: Iterable[str]) -> None:
        """A published manifest references ``shas``: they are no longer anyone's pending bytes."""
        pending = self._pending.get(run, {})
        for sha in shas:
            entry = pending.pop(sha, None)
            if entry is not None:
                self._drop(run, entry)

    def _expire(self, run: str) -> None:
        pending = self._pending.get(run, {})
        cutoff = time.time() - self.policy.grace_s
        expired = []
        for sha, entry in pending.items():  # oldest first
            if entry[2] > cutoff:
                break
            expired.append(sha)
        for sha in expired:
            self._drop(run, pending.pop(sha))

    def _drop(self, run: str, entry: tuple[str, int, float]) -> None:
        counts = self._by_peer[run]
        counts[entry[0]] -= entry[1]
        if counts[entry[0]] <= 0:
            del counts[entry[0]]


# -- who may write ------------------------------------------------------------------------------
def _check_uploader(conn: sqlite3.Connection, run: str, peer_id: str, windows: int) -> None:
    """ApiError unless ``peer_id`` (not banned) took part in one of ``run``'s last ``windows``
    closed rendezvous windows."""
    check_not_banned(conn, peer_id)
    run_row(conn, run)  # 404 for a run that does not exist
    rows = conn.execute("SELECT participants FROM run_windows WHERE run = ? AND closed_at IS NOT "
                        "NULL ORDER BY generation DESC, step DESC LIMIT ?", (run, windows))
    if not any(p == peer_id for r in rows for p, _ in json.loads(r["participants"])):
        raise ApiError(403, "not_a_participant",
                       f"peer {peer_id} took part in none of run {run!r}'s last {windows} outer "
                       f"steps; only the run's training peers upload its checkpoints")


@dataclass(frozen=True)
class StepVerdict:
    """Who took one outer step (its voters) and the state hash they agreed on, if any yet."""
    generation: int
    voters: list[str]
    agreed: str | None


def _step_verdict(conn: sqlite3.Connection, run: str, step: int) -> StepVerdict | None:
    """The verdict on ``step`` in the newest generation that took it; None when the run never
    took that step (so no step number can be invented)."""
    window = conn.execute("SELECT generation, participants FROM run_windows WHERE run = ? AND "
                          "step = ? AND closed_at IS NOT NULL ORDER BY generation DESC LIMIT 1",
                          (run, step)).fetchone()
    if window is not None:
        generation = window["generation"]
        return StepVerdict(generation, [p for p, _ in json.loads(window["participants"])],
                           votes.step_majority(conn, run, generation, step))
    # A step taken while this coordinator was down has no window, only queued reports; it was
    # taken by the participants of the last window before it (diloco/mesh.py:
    # offline_rendezvous), so they are its voters, and more than half of their weight must back
    # the hash (the first report in cannot decide alone).
    row = conn.execute("SELECT MAX(generation) FROM run_reports WHERE run = ? AND step = ?",
                       (run, step)).fetchone()
    if row is None or row[0] is None:
        return None
    generation = row[0]
    prev = conn.execute("SELECT participants FROM run_windows WHERE run = ? AND generation = ? "
                        "AND step < ? AND closed_at IS NOT NULL ORDER BY step DESC LIMIT 1",
                        (run, generation, step)).fetchone()
    if prev is None:
        return None
    voters = [p for p, _ in json.loads(prev["participants"])]
    winner = votes.report_majority(conn, run, generation, step, decided=True, voters=voters)
    return StepVerdict(generation, voters, winner)


def _run_known(conn: sqlite3.Connection, run: str) -> bool:
    return conn.execute("SELECT 1 FROM runs WHERE name = ?", (run,)).fetchone() is not None


async def _run_member(request: web.Request, run: str) -> str:
    """The uploader's peer id, once it is known to take part in ``run``."""
    peer_id = require_role(request, "train").peer_id
    await request.app[RUNS].store.run(_check_uploader, run, peer_id, RECENT_WINDOWS)
    return peer_id


async def trusted_latest(runs: RunService, store: CheckpointStore) -> int | None:
    """The newest stored step whose manifest holds the state its step's voters agreed on (of
    the newest ``TRUST_SCAN``); for a run this coordinator does not know, the newest step."""
    steps = await _call(store.list)
    if not await runs.store.run(_run_known, store.run):
        return steps[-1] if steps else None
    for step in reversed(steps[-TRUST_SCAN:]):
        verdict = await runs.store.run(_step_verdict, store.run, step)
        majority = verdict.agreed if verdict is not None else None
        if majority is None:
            continue
        try:
            manifest = await _call(store.load_manifest, step)
        except ApiError:  # unreadable: not trusted, and not a reason to hide the others
            continue
        if manifest.meta.get("global_state_hash") == majority:
            return step
    return None


def checkpoint_store_info(app: web.Application) -> dict | None:
    """The /api/status view of the store: backend kind, retention settings, last prune."""
    retention = app.get(RETENTION)
    if retention is None:
        return None
    p = retention.policy
    return {"backend": "local" if isinstance(app[CHECKPOINTS], LocalBackend) else "s3",
            "keep_last": p.keep_last, "keep_every": p.keep_every, "gc_grace_s": p.grace_s,
            "quota_bytes": p.quota_bytes, "last_prune": retention.last}


def _error(e: CheckpointError) -> ApiError:
    if isinstance(e, InvalidName):
        return ApiError(400, "invalid_name", str(e))
    if isinstance(e, CorruptChunk):
        return ApiError(400, "hash_mismatch", str(e))
    if isinstance(e, ManifestError):
        return ApiError(400, "bad_manifest", str(e))
    if isinstance(e, MissingChunk):
        return ApiError(409, "missing_chunks", str(e))
    if isinstance(e, CheckpointConflict):
        return ApiError(409, "conflict", str(e))
    if isinstance(e, CheckpointNotFound):
        return ApiError(404, "no_checkpoint", str(e))
    if isinstance(e, BackendError):
        return ApiError(503, "storage_error", str(e))
    return ApiError(400, "checkpoint_error", str(e))


async def _call(fn, *args):
    """Run a blocking store call off the event loop, mapping its errors to 4xx/503 answers."""
    try:
        return await asyncio.to_thread(fn, *args)
    except CheckpointError as e:
        raise _error(e) from None


def _store(request: web.Request) -> CheckpointStore:
    require_role(request)
    try:
        return CheckpointStore(request.app[CHECKPOINTS], request.match_info["run"])
    except InvalidName as e:
        raise bad(str(e), "bad_run_name") from None


async def read_bytes(request: web.Request, max_bytes: int) -> bytes:
    """The raw body, at most ``max_bytes``, received within BODY_TIMEOUT_S."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "body_too_large", f"body of {request.content_length} bytes exceeds "
                                              f"the {max_bytes} byte limit")

    async def read() -> bytes:
        buf = bytearray()
        while chunk := await request.content.read(256 * 1024):
            buf += chunk
            if len(buf) > max_bytes:
                raise ApiError(413, "body_too_large", f"body exceeds the {max_bytes} byte limit")
        return bytes(buf)

    try:
        data = await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"body not received within {BODY_TIMEOUT_S:g}s") from None
    except ConnectionError:  # the client went away mid-body: its fault, not a server error
        raise ApiError(400, "incomplete_body", "connection lost while receiving the body") from None
    check_body(request, data)
    return data


async def list_checkpoints(request: web.Request) -> web.Response:
    store = _store(request)
    steps = await _call(store.list)
    return web.json_response({"run": store.run, "steps": steps,
                              "latest": await trusted_latest(request.app[RUNS], store)})


async def missing(request: web.Request) -> web.Response:
    store = _store(request)
    await _run_member(request, store.run)  # its claims hold chunks back from collection
    body = await read_json_object(request, 80 * MAX_QUERY_SHAS)
    shas = body.get("shas")
    if not isinstance(shas, list) or len(shas) > MAX_QUERY_SHAS:
        raise bad(f"field 'shas' must be a list of at most {MAX_QUERY_SHAS} sha256 hex digests")
    absent = await _call(store.missing, shas)
    request.app[RETENTION].claim(store.run, set(shas).difference(absent))  # the uploader skips these
    return web.json_response({"missing": absent})


async def _make_room(request: web.Request, store: CheckpointStore, peer_id: str, charge: int) -> None:
    """Charge a new chunk of ``charge`` bytes to the run's quota and the uploader's pending
    bytes (call under the ledger's run lock), or refuse it with 507."""
    retention: Retention = request.app[RETENTION]
    ledger: UploadLedger = request.app[LEDGER]
    policy = retention.policy
    limit = policy.pending_limit
    held = ledger.pending(store.run, peer_id)
    if limit is not None and held + charge > limit:
        raise ApiError(507, "pending_quota",
                       f"peer {peer_id} holds {held} bytes of run {store.run!r} chunks that no "
                       f"published checkpoint uses (limit {limit}); publish a manifest first, "
                       f"or they expire after {policy.grace_s:g}s")
    if policy.quota_bytes is None:
        return
    used = await ledger.used(store)
    if used + charge > policy.quota_bytes:
        async with retention.lock(store.run):  # no manifest is published while gc decides
            removed = await _call(retention.collect, store)
        if removed:
            log.info("run %s at its checkpoint quota: collected %d unreferenced chunks",
                     store.run, removed)
            ledger.forget_usage(store.run)
            used = await ledger.used(store)
    if used + charge > policy.quota_bytes:
        raise ApiError(507, "quota_exceeded",
                       f"run {store.run!r} checkpoints use {used} of their {policy.quota_bytes} "
                       f"byte quota; a {charge} byte chunk does not fit (unreferenced chunks are "
                       f"collected {policy.grace_s:g}s after their upload)")


async def put_chunk(request: web.Request) -> web.Response:
    store = _store(request)
    sha = request.match_info["sha"]
    try:
        check_sha(sha)
    except InvalidName as e:
        raise bad(str(e), "invalid_name") from None
    peer_id = await _run_member(request, store.run)
    data = await read_bytes(request, request.app[MAX_CHUNK])
    ledger: UploadLedger = request.app[LEDGER]
    charge = max(len(data), MIN_CHUNK_CHARGE)
    async with ledger.lock(store.run):
        new = not await _call(store.has_chunk, sha)
        if new:
            await _make_room(request, store, peer_id, charge)
            ledger.add(store.run, peer_id, sha, charge)  # reserved before the write: no overshoot
    try:
        await _call(store.put_chunk, data, sha)
    except ApiError:
        if new:
            ledger.unadd(store.run, sha)
        raise
    request.app[RETENTION].claim(store.run, (sha,))  # an old chunk is not rewritten: keep its mtime
    return web.json_response({"sha": sha, "size": len(data)})


async def get_chunk(request: web.Request) -> web.Response:
    store = _store(request)
    try:
        data = await _call(store.get_chunk, request.match_info["sha"])
    except ApiError as e:
        if e.code == "missing_chunks":  # reading an absent chunk: not found, not a conflict
            raise ApiError(404, "no_chunk", e.message) from None
        raise
    return web.Response(body=data, content_type="application/octet-stream")


def _step(raw: str) -> int:
    try:
        return check_step(int(raw))
    except (ValueError, InvalidName):
        raise bad(f"step must be a non-negative integer or 'latest', got {raw!r}",
                  "invalid_name") from None


async def _agreed_hash(request: web.Request, run: str, step: int, peer_id: str) -> str:
    """The state hash step ``step``'s voters agreed on, if ``peer_id`` is one of them."""
    verdict = await request.app[RUNS].store.run(_step_verdict, run, step)
    if verdict is None:
        raise ApiError(409, "step_not_taken", f"run {run!r} has not taken step {step}; only a step "
                                              f"the run completed can be checkpointed")
    if peer_id not in verdict.voters:
        raise ApiError(403, "not_a_participant", f"peer {peer_id} did not take part in step {step} "
                                                 f"of run {run!r}")
    if verdict.agreed is None:
        raise ApiError(409, "step_not_agreed",
                       f"the {len(verdict.voters)} participants of step {step} have not agreed on "
                       f"its state yet (too few reports); try again shortly")
    return verdict.agreed


async def put_manifest(request: web.Request) -> web.Response:
    store = _store(request)
    step = _step(request.match_info["step"])
    peer_id = await _run_member(request, store.run)
    body = await read_json_object(request, MAX_MANIFEST_BYTES)
    try:
        m = Manifest.from_dict(body)
    except ManifestError as e:
        raise _error(e) from None
    if m.step != step or m.run != store.run:
        raise bad(f"manifest is for {m.run}@{m.step}, not {store.run}@{step}", "bad_manifest")
    majority = await _agreed_hash(request, store.run, step, peer_id)
    claimed = m.meta.get("global_state_hash")
    if claimed != majority:
        raise ApiError(409, "not_majority", f"checkpoint {store.run}@{step} claims state "
                                            f"{str(claimed)[:16]!r}; step {step}'s participants "
                                            f"agreed on {majority[:16]}")
    retention: Retention = request.app[RETENTION]
    async with retention.lock(store.run):
        absent = await _call(store.missing, m.chunk_shas())
        if absent:
            raise _error(MissingChunk(absent, f"cannot publish {store.run}@{step}"))
        actual = await _call(trainer_state_hash, m, store.get_chunk)
        if actual != majority:
            raise ApiError(409, "state_mismatch",
                           f"the tensors of checkpoint {store.run}@{step} hash to {actual[:16]}, "
                           f"not to the agreed {majority[:16]} its manifest claims")
        m = await _call(store.put_manifest, step, m)
        retention.release(store.run, m.chunk_shas())
        ledger: UploadLedger = request.app[LEDGER]
        ledger.settle(store.run, m.chunk_shas())
        trusted = await trusted_latest(request.app[RUNS], store)
        await retention.apply(store, m.step, () if trusted is None else (trusted,))
        ledger.forget_usage(store.run)
    log.info("run %s: checkpoint %d (state %s) published by %s", store.run, step, majority[:12],
             peer_id[:12])
    return web.json_response({"run": m.run, "step": m.step, "state_hash": m.state_hash})


async def get_manifest(request: web.Request) -> web.Response:
    store = _store(request)
    raw = request.match_info["step"]
    if raw == "latest":
        step = await trusted_latest(request.app[RUNS], store)
        if step is None:
            raise ApiError(404, "no_checkpoint", f"run {store.run} has no checkpoint that holds "
                                                 f"the state its peers agreed on")
    else:
        step = _step(raw)
    m = await _call(store.load_manifest, step)
    return web.Response(body=m.to_json(), content_type="application/json")


def setup_checkpoint_routes(app: web.Application, backend: Backend, *,
                            retention: RetentionPolicy = RetentionPolicy(),
                            max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
    """Register the checkpoint routes (after setup_runs: writes are checked against the run)."""
    app[CHECKPOINTS] = backend
    app[RETENTION] = Retention(retention)
    app[LEDGER] = UploadLedger(retention)
    app[MAX_CHUNK] = max_chunk_bytes
    app.router.add_get("/api/runs/{run}/checkpoints", list_checkpoints)
    app.router.add_post("/api/runs/{run}/checkpoints/missing", missing)
    app.router.add_put("/api/runs/{run}/chunks/{sha}", put_chunk)
    app.router.add_get("/api/runs/{run}/chunks/{sha}", get_chunk)
    app.router.add_put("/api/runs/{run}/checkpoints/{step}", put_manifest)
    app.router.add_get("/api/runs/{run}/checkpoints/{step}", get_manifest)
