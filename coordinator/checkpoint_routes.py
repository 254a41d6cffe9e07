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
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from coordinator.checkpoints import (Backend, BackendError, CheckpointConflict, CheckpointError,
                                     CheckpointNotFound, CheckpointStore, CorruptChunk,
                                     ManifestError, MissingChunk)
from coordinator.membership import TOKEN
from coordinator.validation import ApiError, bad, check_token, read_json_object
from peer.blobs import InvalidName, check_sha, check_step

DEFAULT_MAX_CHUNK_BYTES = 8 * 1024 * 1024   # peers upload 4 MiB chunks (peer.blobs.CHUNK_SIZE)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_QUERY_SHAS = 100_000
BODY_TIMEOUT_S = 60.0  # a chunk over a slow link still arrives; a stalled client is cut off

CHECKPOINTS = web.AppKey("checkpoint_backend", object)
MAX_CHUNK = web.AppKey("checkpoint_max_chunk", int)


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
    return web.json_response({"missing": await _call(store.missing, shas)})


async def put_chunk(request: web.Request) -> web.Response:
    store = _store(request)
    sha = request.match_info["sha"]
    try:
        check_sha(sha)
    except InvalidName as e:
        raise bad(str(e), "invalid_name") from None
    data = await read_bytes(request, request.app[MAX_CHUNK])
    await _call(store.put_chunk, data, sha)
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
    m = await _call(store.put_manifest, step, body)
    return web.json_response({"run": m.run, "step": m.step, "state_hash": m.state_hash})


async def get_manifest(request: web.Request) -> web.Response:
    store = _store(request)
    raw = request.match_info["step"]
    m = await _call(store.load_manifest, None if raw == "latest" else _step(raw))
    return web.Response(body=m.to_json(), content_type="application/json")


def setup_checkpoint_routes(app: web.Application, backend: Backend, *,
                            max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
    """Register the checkpoint routes (after setup_membership: they share its swarm token)."""
    app[CHECKPOINTS] = backend
    app[MAX_CHUNK] = max_chunk_bytes
    app.router.add_get("/api/runs/{run}/checkpoints", list_checkpoints)
    app.router.add_post("/api/runs/{run}/checkpoints/missing", missing)
    app.router.add_put("/api/runs/{run}/chunks/{sha}", put_chunk)
    app.router.add_get("/api/runs/{run}/chunks/{sha}", get_chunk)
    app.router.add_put("/api/runs/{run}/checkpoints/{step}", put_manifest)
    app.router.add_get("/api/runs/{run}/checkpoints/{step}", get_manifest)
