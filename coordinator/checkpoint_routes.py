"""HTTP routes over the checkpoint store (coordinator/checkpoints.py), one per store method.
All need the swarm token; bodies are size-capped and every chunk is verified against its name.

- ``GET  /api/runs/{run}/checkpoints``                  -> {"steps": [...], "latest": N|null}
- ``POST /api/runs/{run}/checkpoints/missing``  {"shas": [...]} -> {"missing": [...]} (resume:
  an uploader sends only these; a downloader asks the same of its local store)
- ``PUT  /api/runs/{run}/chunks/{sha}``  raw bytes   -> {"sha", "size"} (409-free: idempotent)
- ``GET  /api/runs/{run}/chunks/{sha}``              -> raw bytes (verified before sending)
- ``PUT  /api/runs/{run}/checkpoints/{step}``  manifest JSON -> {"step", "state_hash"}; refused
  (409) while chunks are missing or when another state holds the step
- ``GET  /api/runs/{run}/checkpoints/{step|latest}`` -> the manifest JSON

After each committed manifest the coordinator applies its :class:`RetentionPolicy`
(``CheckpointStore.prune``), so the store does not grow without bound.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from aiohttp import web

from coordinator.checkpoints import (DEFAULT_GRACE_S, Backend, BackendError, CheckpointConflict,
                                     CheckpointError, CheckpointNotFound, CheckpointStore,
                                     CorruptChunk, LocalBackend, ManifestError, MissingChunk)
from coordinator.membership import TOKEN
from coordinator.validation import ApiError, bad, check_token, read_json_object
from peer.blobs import InvalidName, check_sha, check_step

DEFAULT_MAX_CHUNK_BYTES = 8 * 1024 * 1024   # peers upload 4 MiB chunks (peer.blobs.CHUNK_SIZE)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_QUERY_SHAS = 100_000
BODY_TIMEOUT_S = 60.0  # a chunk over a slow link still arrives; a stalled client is cut off

CHECKPOINTS = web.AppKey("checkpoint_backend", object)
MAX_CHUNK = web.AppKey("checkpoint_max_chunk", int)
RETENTION = web.AppKey("checkpoint_retention", object)

log = logging.getLogger("lowband.coordinator.checkpoints")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints survive a commit: the ``keep_last`` newest steps of the run (None: keep
    everything) plus every step divisible by ``keep_every``. An unreferenced chunk is deleted
    only once older than ``grace_s``, so an upload in flight keeps its chunks."""
    keep_last: int | None = 5
    keep_every: int | None = None
    grace_s: float = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be at least 1, got {self.keep_every}")
        if not self.grace_s >= 0:
            raise ValueError(f"the chunk grace period must be >= 0 seconds, got {self.grace_s}")


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
        if self.policy.keep_last is None or self.policy.grace_s <= 0:
            return  # nothing is ever collected, or the operator chose no grace at all
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

    def _protect(self, run: str) -> Callable[[str], bool]:
        claims = self._claims.setdefault(run, {})
        # Called from the prune's worker thread; dict.get is atomic under the GIL.
        return lambda sha: claims.get(sha, 0.0) > time.time() - self.policy.grace_s

    async def apply(self, store: CheckpointStore, committed: int) -> None:
        """Prune ``store``'s run after step ``committed`` was published (never deleting it).
        A failure is logged, not raised: the commit itself succeeded."""
        p = self.policy
        if p.keep_last is None:
            return
        try:
            result = await asyncio.to_thread(store.prune, p.keep_last, p.keep_every, p.grace_s,
                                             keep_steps=(committed,), protect=self._protect(store.run))
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


def checkpoint_store_info(app: web.Application) -> dict | None:
    """The /api/status view of the store: backend kind, retention settings, last prune."""
    retention = app.get(RETENTION)
    if retention is None:
        return None
    p = retention.policy
    return {"backend": "local" if isinstance(app[CHECKPOINTS], LocalBackend) else "s3",
            "keep_last": p.keep_last, "keep_every": p.keep_every, "gc_grace_s": p.grace_s,
            "last_prune": retention.last}


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
    check_token(request, request.app[TOKEN])
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
        return await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"body not received within {BODY_TIMEOUT_S:g}s") from None
    except ConnectionError:  # the client went away mid-body: its fault, not a server error
        raise ApiError(400, "incomplete_body", "connection lost while receiving the body") from None


async def list_checkpoints(request: web.Request) -> web.Response:
    store = _store(request)
    steps = await _call(store.list)
    return web.json_response({"run": store.run, "steps": steps,
                              "latest": steps[-1] if steps else None})


async def missing(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json_object(request, 80 * MAX_QUERY_SHAS)
    shas = body.get("shas")
    if not isinstance(shas, list) or len(shas) > MAX_QUERY_SHAS:
        raise bad(f"field 'shas' must be a list of at most {MAX_QUERY_SHAS} sha256 hex digests")
    absent = await _call(store.missing, shas)
    request.app[RETENTION].claim(store.run, set(shas).difference(absent))  # the uploader skips these
    return web.json_response({"missing": absent})


async def put_chunk(request: web.Request) -> web.Response:
    store = _store(request)
    sha = request.match_info["sha"]
    try:
        check_sha(sha)
    except InvalidName as e:
        raise bad(str(e), "invalid_name") from None
    data = await read_bytes(request, request.app[MAX_CHUNK])
    await _call(store.put_chunk, data, sha)
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


async def put_manifest(request: web.Request) -> web.Response:
    store = _store(request)
    step = _step(request.match_info["step"])
    body = await read_json_object(request, MAX_MANIFEST_BYTES)
    retention = request.app[RETENTION]
    async with retention.lock(store.run):
        m = await _call(store.put_manifest, step, body)
        retention.release(store.run, m.chunk_shas())
        await retention.apply(store, m.step)
    return web.json_response({"run": m.run, "step": m.step, "state_hash": m.state_hash})


async def get_manifest(request: web.Request) -> web.Response:
    store = _store(request)
    raw = request.match_info["step"]
    m = await _call(store.load_manifest, None if raw == "latest" else _step(raw))
    return web.Response(body=m.to_json(), content_type="application/json")


def setup_checkpoint_routes(app: web.Application, backend: Backend, *,
                            retention: RetentionPolicy = RetentionPolicy(),
                            max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
    """Register the checkpoint routes (after setup_membership: they share its swarm token)."""
    app[CHECKPOINTS] = backend
    app[RETENTION] = Retention(retention)
    app[MAX_CHUNK] = max_chunk_bytes
    app.router.add_get("/api/runs/{run}/checkpoints", list_checkpoints)
    app.router.add_post("/api/runs/{run}/checkpoints/missing", missing)
    app.router.add_put("/api/runs/{run}/chunks/{sha}", put_chunk)
    app.router.add_get("/api/runs/{run}/chunks/{sha}", get_chunk)
    app.router.add_put("/api/runs/{run}/checkpoints/{step}", put_manifest)
    app.router.add_get("/api/runs/{run}/checkpoints/{step}", get_manifest)
