"""Checkpoint store: content-addressed chunks plus manifests, on local disk or S3. The chunk and
manifest format itself lives in ``peer.blobs`` (shared with the peers that write checkpoints).

Layout (the same keys on every backend)::

    runs/<run>/chunks/<sha[:2]>/<sha>        raw bytes; sha = sha256(bytes), 64 lowercase hex
    runs/<run>/manifests/<step:012d>.json    written last, so a checkpoint exists only when all
                                              of its chunks do

Why content addressing: an upload or download is resumable by construction (ask which hashes
the other side lacks, send only those), every read is verified against its name so a corrupt or
truncated copy is caught and refetched instead of loaded, and tensors that did not change between
steps are stored once.

torch is imported only by the tensor helpers (``save_state``, ``load_state``, ``export_hf``), so
the coordinator's chunk/manifest routes do not pay for it. Everything here is synchronous file / boto3 I/O; aiohttp handlers should call it through
``asyncio.to_thread``. HTTP routes map one-to-one onto ``CheckpointStore`` methods:
``missing`` (which of these hashes are absent), ``put_chunk(body, expected_sha=...)``,
``get_chunk``, ``put_manifest``, ``load_manifest``, ``list``/``latest``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from coordinator.defaults import DEFAULT_GRACE_S
from peer.progress import Progress
from peer.blobs import (CHUNK_SIZE, MAX_CHUNK_BYTES, BlobError, InvalidName, Manifest,
                        ManifestError, TensorEntry, check_run, check_sha, check_step, sha256_hex,
                        split_chunks)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lowband.checkpoints")

CHECKPOINT_DIR = "checkpoints"  # LocalBackend root under the coordinator's --data-dir
# Quotas charge a chunk at least one filesystem block, so a flood of tiny chunks costs what it
# takes on disk (and inodes), not its byte count.
MIN_CHUNK_CHARGE = 4096
# How a train peer lays out its global state (diloco/state_io.py:global_tensors, which must use
# the same prefix): parameters in model order, then each one's outer momentum under this prefix.
MOMENTUM_PREFIX = "outer_momentum."

# A key segment may not start with "." so "..", "." and our own ".tmp" staging dir are unreachable.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}\Z")
_MANIFEST_NAME_RE = re.compile(r"(\d{12})\.json\Z")


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---------------------------------------------------------------------------------------- errors

# CheckpointError, the base of every error this module raises, is the blob format's base error,
# so InvalidName and ManifestError (raised by peer.blobs) are CheckpointErrors too.
CheckpointError = BlobError


class BlobNotFound(CheckpointError):
    """A backend key does not exist."""


class BackendError(CheckpointError):
    """The storage backend failed (I/O, S3 error other than not-found)."""


class CorruptChunk(CheckpointError):
    """Chunk bytes do not hash to the chunk's name. The bad copy has been removed."""


class MissingChunk(CheckpointError):
    """Chunks a manifest references are absent."""

    def __init__(self, shas: Sequence[str], context: str) -> None:
        self.shas = list(shas)
        shown = ", ".join(s[:12] for s in self.shas[:5]) + (" ..." if len(self.shas) > 5 else "")
        super().__init__(f"{context}: {len(self.shas)} chunk(s) missing: {shown}")


class CheckpointNotFound(CheckpointError):
    """No checkpoint at the requested step."""


class CheckpointConflict(CheckpointError):
    """A different state was already stored under this step."""


class InvalidConfig(CheckpointError, ValueError):
    """A model config that cannot be turned into a Hugging Face Llama config."""


# ----------------------------------------------------------------------------------- validation

# ------------------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    mtime: float  # unix seconds of the last write


class Backend(Protocol):
    """Flat key -> bytes store. Keys are "/"-separated segments matching ``_SEGMENT_RE``.

    ``put`` must be atomic: a reader sees either no object or the whole object.
    """

    def put(self, key: str, data: bytes | memoryview) -> None: ...
    def get(self, key: str) -> bytes: ...  # raises BlobNotFound
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...  # idempotent
    def list(self, prefix: str) -> list[BlobInfo]: ...  # every key starting with prefix + "/"
    def check(self) -> None: ...  # raises BackendError when the store is unusable (start-up probe)


def _check_key(key: str) -> list[str]:
    parts = key.split("/") if isinstance(key, str) else []
    if not parts or not all(_SEGMENT_RE.match(p) for p in parts):
        raise InvalidName(f"invalid storage key {key!r}")
    return parts


class LocalBackend:
    """Files under ``root``. Writes go to ``root/.tmp``, are fsynced, then renamed into place,
    so a kill -9 never leaves a partial object under its final name."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.root)

    def check(self) -> None:
        if not os.access(self._tmp, os.W_OK | os.X_OK):
            raise BackendError(f"checkpoint directory {self.root} is not writable")

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(*_check_key(key))
        # A symlink planted inside root must not lead writes or reads outside it.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidName(f"key {key!r} resolves outside {self.root}")
        return path

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        tmp = self._tmp / f"{secrets.token_hex(8)}.part"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"writing {path}: {e}") from e

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(key) from None
        except OSError as e:
            raise BackendError(f"reading {path}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[BlobInfo]:
        base = self._path(prefix.rstrip("/"))
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                p = Path(dirpath, name)
                try:
                    st = p.stat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                out.append(BlobInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return out

    def sweep_temp(self, older_than_s: float) -> int:
        """Remove staging files a killed writer left behind; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for p in self._tmp.glob("*.part"):
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable on POSIX; Windows cannot open directories and needs no such step.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Backend:
    """Objects in an S3-compatible bucket under ``prefix``. PUT is atomic in S3 semantics."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 client: Any = None) -> None:
        if client is None:
            import boto3  # optional dependency: only needed for this backend
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
                connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"}))
        self.client = client
        self.bucket = bucket
        self.prefix = "/".join(_check_key(prefix.strip("/"))) + "/" if prefix.strip("/") else ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def check(self) -> None:
        """One cheap list call: fails on a missing bucket, bad credentials or no list permission."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as e:
            raise BackendError(f"s3://{self.bucket}/{self.prefix}: {e}") from e

    def _key(self, key: str) -> str:
        return self.prefix + "/".join(_check_key(key))

    def _error(self, e: Exception, full_key: str) -> CheckpointError:
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return BlobNotFound(full_key)
        return BackendError(f"s3://{self.bucket}/{full_key}: {e}")

    # botocore raises many unrelated exception classes; each method normalises them.
    def put(self, key: str, data: bytes | memoryview) -> None:
        k = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=k, Body=bytes(data))
        except Exception as e:
            raise self._error(e, k) from e

    def get(self, key: str) -> bytes:
        k = self._key(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
        except Exception as e:
            raise self._error(e, k) from e

    def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=k)
            return True
        except Exception as e:
            err = self._error(e, k)
            if isinstance(err, BlobNotFound):
                return False
            raise err from e

    def delete(self, key: str) -> None:
        k = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=k)
        except Exception as e:
            raise self._error(e, k) from e

    def list(self, prefix: str) -> list[BlobInfo]:
        full = self._key(prefix.rstrip("/")) + "/"
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out.append(BlobInfo(obj["Key"][len(self.prefix):], obj["Size"],
                                        obj["LastModified"].timestamp()))
        except Exception as e:
            raise self._error(e, full) from e
        return out


# ------------------------------------------------------------------------------------ manifests

# ----------------------------------------------------------------------------------------- store

@dataclass(frozen=True)
class PruneResult:
    deleted_steps: list[int]
    chunks_removed: int


class CheckpointStore:
    """Checkpoints of one run on one backend."""

    def __init__(self, backend: Backend, run: str) -> None:
        self.backend = backend
        self.run = check_run(run)
        self._base = f"runs/{self.run}"

    def __repr__(self) -> str:
        return f"CheckpointStore({type(self.backend).__name__}, run={self.run!r})"

    def _chunk_key(self, sha: str) -> str:
        return f"{self._base}/chunks/{sha[:2]}/{sha}"

    def _manifest_key(self, step: int) -> str:
        return f"{self._base}/manifests/{step:012d}.json"

    # chunks --------------------------------------------------------------------------------
    def put_chunk(self, data: bytes | memoryview, expected_sha: str | None = None) -> str:
        """Store ``data`` under its sha256 and return it. Idempotent: an existing chunk is kept.

        ``expected_sha`` (what an uploader claims) is checked before anything is written."""
        if len(data) > MAX_CHUNK_BYTES:
            raise CheckpointError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
        sha = sha256_hex(data)
        if expected_sha is not None and check_sha(expected_sha) != sha:
            raise CorruptChunk(f"chunk body hashes to {sha[:12]}, expected {expected_sha[:12]}")
        key = self._chunk_key(sha)
        if not self.backend.exists(key):
            self.backend.put(key, data)
        return sha

    def has_chunk(self, sha: str) -> bool:
        return self.backend.exists(self._chunk_key(check_sha(sha)))

    def missing(self, shas: Iterable[str]) -> list[str]:
        """The hashes among ``shas`` that this store lacks (deduplicated, order kept)."""
        return [s for s in dict.fromkeys(check_sha(s) for s in shas) if not self.has_chunk(s)]

    def get_chunk(self, sha: str, sources: Sequence[CheckpointStore] = ()) -> bytes:
        """Verified chunk bytes. A copy that fails its hash is deleted (so ``missing`` reports
        it and it gets refetched) and never returned; it is refetched from ``sources`` in order
        (any objects with ``get_chunk``, e.g. another store or an HTTP client) when given."""
        key = self._chunk_key(check_sha(sha))
        problem: CheckpointError
        try:
            data = self.backend.get(key)
            if sha256_hex(data) == sha:
                return data
            self.backend.delete(key)
            problem = CorruptChunk(
                f"run {self.run}: chunk {sha[:12]} is corrupt ({len(data)} bytes hash to "
                f"{sha256_hex(data)[:12]}); removed it so it is refetched")
        except BlobNotFound:
            problem = MissingChunk([sha], f"run {self.run}")
        for src in sources:
            try:
                data = src.get_chunk(sha)
            except (MissingChunk, CorruptChunk, BackendError):
                continue
            if sha256_hex(data) != sha:  # a source we do not control may send anything
                continue
            self.put_chunk(data)
            return data
        raise problem

    def verify(self, shas: Iterable[str] | None = None) -> list[str]:
        """Check stored chunks (all when ``shas`` is None); delete and return the corrupt ones."""
        if shas is None:
            shas = [info.key.rsplit("/", 1)[1] for info in self.backend.list(f"{self._base}/chunks")]
        bad = []
        for sha in shas:
            try:
                self.get_chunk(sha)
            except CorruptChunk:
                bad.append(sha)
            except MissingChunk:
                continue
        return bad

    # manifests -----------------------------------------------------------------------------
    def put_manifest(self, step: int, manifest: Manifest | Mapping) -> Manifest:
        """Publish a checkpoint. Refused unless every referenced chunk is present. Re-publishing
        the same state is a no-op; a different state under an existing step is a conflict."""
        m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(
            dict(manifest) if isinstance(manifest, Mapping) else manifest)  # a non-object -> ManifestError
        if m.step != check_step(step) or m.run != self.run:
            raise ManifestError(f"manifest is for {m.run}@{m.step}, not {self.run}@{step}")
        absent = self.missing(m.chunk_shas())
        if absent:
            raise MissingChunk(absent, f"cannot publish {self.run}@{step}")
        try:
            old = self.load_manifest(step)
        except CheckpointNotFound:
            self.backend.put(self._manifest_key(step), m.to_json())
            return m
        if old.state_hash != m.state_hash:
            raise CheckpointConflict(f"{self.run}@{step} already holds state {old.state_hash[:12]}, "
                                     f"not {m.state_hash[:12]}")
        return old

    def load_manifest(self, step: int | None = None) -> Manifest:
        """The manifest at ``step`` (the latest when None)."""
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFound(f"run {self.run} has no checkpoints")
        try:
            data = self.backend.get(self._manifest_key(check_step(step)))
        except BlobNotFound:
            raise CheckpointNotFound(f"run {self.run} has no checkpoint at step {step} "
                                     f"(have: {self.list()[-10:]})") from None
        m = Manifest.from_json(data)
        if m.run != self.run or m.step != step:
            raise ManifestError(f"manifest stored as {self.run}@{step} claims {m.run}@{m.step}")
        return m

    def list(self) -> list[int]:
        """Published steps, ascending."""
        steps = []
        for info in self.backend.list(f"{self._base}/manifests"):
            match = _MANIFEST_NAME_RE.match(info.key.rsplit("/", 1)[1])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.list()
        return steps[-1] if steps else None

    def delete(self, step: int) -> None:
        """Unpublish a step; its chunks go at the next ``gc``."""
        self.backend.delete(self._manifest_key(check_step(step)))

    def usage(self, min_charge: int = MIN_CHUNK_CHARGE) -> int:
        """Bytes the run's chunks occupy, each charged at least ``min_charge`` (one listing)."""
        return sum(max(info.size, min_charge) for info in self.backend.list(f"{self._base}/chunks"))

    # retention -----------------------------------------------------------------------------
    def gc(self, grace_s: float = DEFAULT_GRACE_S,
           protect: Callable[[str], bool] | None = None) -> int:
        """Delete chunks no manifest references and older than ``grace_s`` (younger ones may
        belong to an upload whose manifest is not published yet). ``protect(sha)``, asked just
        before each deletion, spares more: e.g. old chunks an uploader was just told it may
        skip (dedup). Returns how many were deleted."""
        referenced: set[str] = set()
        for step in self.list():
            referenced.update(self.load_manifest(step).chunk_shas())  # unreadable => raise, keep all
        cutoff = time.time() - grace_s
        removed = 0
        for info in self.backend.list(f"{self._base}/chunks"):
            sha = info.key.rsplit("/", 1)[1]
            if sha not in referenced and info.mtime <= cutoff and not (protect and protect(sha)):
                self.backend.delete(info.key)
                removed += 1
        sweep = getattr(self.backend, "sweep_temp", None)  # backends that stage writes
        if sweep is not None:
            sweep(grace_s)
        return removed

    def prune(self, keep_last: int, keep_every: int | None = None,
              grace_s: float = DEFAULT_GRACE_S, *, keep_steps: Iterable[int] = (),
              protect: Callable[[str], bool] | None = None) -> PruneResult:
        """Retention: keep the ``keep_last`` newest steps, every step divisible by
        ``keep_every`` and ``keep_steps`` (e.g. the one just committed, even when a restarted
        run committed it below newer steps); delete the other manifests, then ``gc``."""
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ValueError(f"keep_every must be None or an int >= 1, got {keep_every!r}")
        steps = self.list()
        keep = set(steps[-keep_last:]) | set(keep_steps)
        if keep_every is not None:
            keep.update(s for s in steps if s % keep_every == 0)
        doomed = [s for s in steps if s not in keep]
        for s in doomed:
            self.delete(s)
        return PruneResult(doomed, self.gc(grace_s, protect))


# ----------------------------------------------------------------------- trainer state hash

def trainer_state_hash(manifest: Manifest, read_chunk: Callable[[str], bytes]) -> str:
    """The hash a train peer reports for this state (``diloco/base.py:
    OuterTrainer.global_state_hash``), recomputed from the stored bytes without torch: sha256
    over each parameter's name and raw fp32 bytes in model order, then over each parameter's
    name and its momentum's bytes in the same order. The manifest lists parameters in model
    order, as ``diloco/state_io.py:build_manifest`` writes them.

    This binds a checkpoint's tensors to the hash the run's peers agreed on, so a manifest whose
    ``meta`` claims the majority hash over other tensors is caught. ``read_chunk(sha)`` returns
    verified bytes (``CheckpointStore.get_chunk``). ManifestError when the manifest is not a
    trainer's state (not fp32, momenta not matching the parameters, chunks not adding up)."""
    params = [t for t in manifest.tensors if not t.name.startswith(MOMENTUM_PREFIX)]
    momenta = {t.name[len(MOMENTUM_PREFIX):]: t for t in manifest.tensors
               if t.name.startswith(MOMENTUM_PREFIX)}
    if set(momenta) != {t.name for t in params}:
        raise ManifestError("not a trainer state: the outer momenta do not match the parameters")
    odd = [t.name for t in manifest.tensors if t.dtype != "F32"]
    if odd:
        raise ManifestError(f"not a trainer state: {odd[:3]} are not F32")
    h = hashlib.sha256()
    for name, entry in [(t.name, t) for t in params] + [(t.name, momenta[t.name]) for t in params]:
        h.update(name.encode())
        size = 0
        for sha in entry.chunks:
            data = read_chunk(sha)
            size += len(data)
            h.update(data)
        if size != entry.nbytes:
            raise ManifestError(f"tensor {entry.name}: chunks hold {size} of its {entry.nbytes} bytes")
    return h.hexdigest()


# ------------------------------------------------------------------------------ tensor state

@dataclass(frozen=True)
class TransferResult:
    manifest: Manifest
    chunks_sent: int  # chunks actually transferred
    chunks_skipped: int  # already present on the destination (dedup or resumed transfer)
    bytes_sent: int


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # the numpy view keeps the tensor alive


def save_state(store: CheckpointStore, step: int, tensors: Mapping[str, torch.Tensor],
               meta: Mapping | None = None, *, config: Mapping | None = None,
               chunk_size: int = CHUNK_SIZE,
               progress: Callable[[int, int], None] | None = None) -> TransferResult:
    """Chunk ``tensors`` (any device), upload the chunks ``store`` lacks, then publish the
    manifest. Re-running after a crash resumes: present chunks are skipped.

    ``meta`` is JSON extra state returned by ``load_state``; ``config`` is the model config
    (``export_hf`` reads it). ``progress(done, todo)`` is called after each uploaded chunk."""
    import torch

    dtype_names = {v: k for k, v in torch_dtypes().items()}
    entries: list[TensorEntry] = []
    pieces: dict[str, memoryview] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{name!r}] is {type(t).__name__}, not a Tensor")
        if t.dtype not in dtype_names:
            raise TypeError(f"state[{name!r}] has dtype {t.dtype}, not storable in safetensors")
        buf = _tensor_bytes(t)
        chunks = split_chunks(buf, chunk_size)
        for sha, piece in chunks:
            pieces.setdefault(sha, piece)
        shas = [sha for sha, _ in chunks]
        entries.append(TensorEntry(name, dtype_names[t.dtype], tuple(t.shape), tuple(shas), len(buf)))
    manifest = Manifest.build(store.run, step, entries, config, meta)
    todo = store.missing(pieces)
    sent = 0
    for i, sha in enumerate(todo, 1):
        store.put_chunk(pieces[sha], expected_sha=sha)
        sent += len(pieces[sha])
        if progress is not None:
            progress(i, len(todo))
    published = store.put_manifest(step, manifest)
    return TransferResult(published, len(todo), len(pieces) - len(todo), sent)


def load_state(store: CheckpointStore, step: int | None = None, *, device: str | torch.device = "cpu",
               sources: Sequence[CheckpointStore] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of the checkpoint at ``step`` (latest when None). Every chunk is
    hash-verified; bad or absent ones are refetched from ``sources`` or raise."""
    import torch

    m = store.load_manifest(step)
    if not sources:
        absent = store.missing(m.chunk_shas())
        if absent:
            raise MissingChunk(absent, f"checkpoint {store.run}@{m.step}")
    out: dict[str, torch.Tensor] = {}
    with Progress(f"checkpoint {store.run}@{m.step} read", m.nbytes, logger=log) as progress:
        for e in m.tensors:
            buf = bytearray(e.nbytes)
            off = 0
            for sha in e.chunks:
                data = store.get_chunk(sha, sources)
                if off + len(data) > e.nbytes:
                    raise ManifestError(f"tensor {e.name}: chunks exceed its {e.nbytes} bytes")
                buf[off:off + len(data)] = data
                off += len(data)
                progress.update(len(data))
            if off != e.nbytes:
                raise ManifestError(f"tensor {e.name}: chunks hold {off} of its {e.nbytes} bytes")
            raw = torch.frombuffer(buf, dtype=torch.uint8) if e.nbytes else torch.empty(0, dtype=torch.uint8)
            out[e.name] = raw.view(torch_dtypes()[e.dtype]).reshape(e.shape).to(device)
    return out, dict(m.meta)


def sync(src: CheckpointStore, dst: CheckpointStore, step: int | None = None, *,
         progress: Callable[[int, int], None] | None = None) -> TransferResult:
    """Copy one checkpoint (latest when ``step`` is None) from ``src`` to ``dst``: only the
    chunks ``dst`` lacks, each verified, then the manifest. Serves as both resumable upload and
    resumable download; ``src`` may be any object with ``load_manifest`` and ``get_chunk``."""
    m = src.load_manifest(step)
    if m.run != dst.run:
        raise ManifestError(f"cannot sync run {m.run} into a store for run {dst.run}")
    todo = dst.missing(m.chunk_shas())
    sent = 0
    for i, sha in enumerate(todo, 1):
        data = src.get_chunk(sha)
        dst.put_chunk(data, expected_sha=sha)
        sent += len(data)
        if progress is not None:
            progress(i, len(todo))
    published = dst.put_manifest(m.step, m)
    return TransferResult(published, len(todo), len(m.chunk_shas()) - len(todo), sent)


# ------------------------------------------------------------------------------ HF export

def export_hf(store: CheckpointStore, step: int | None, out_dir: str | os.PathLike, *,
              dtype: torch.dtype | None = None) -> Path:
    """Write a train run's checkpoint (latest when ``step`` is None) as a Hugging Face folder
    that transformers' ``from_pretrained`` and ``peer join --serve`` load: HF tensor names,
    ``config.json``, the run's tokenizer (``diloco/export.py``). ``dtype`` casts the weights
    (e.g. bf16 for serving from the fp32 master copy).

    The folder format is the model's and the run's, so ``diloco.export`` writes it; it is
    imported here, lazily, by the operator's ``coordinator checkpoints export`` only, never by
    the server (docs/architecture.md §Layers and imports, deviations). Every chunk is verified
    on read; a state that is not a lowband model is an ``InvalidConfig``."""
    from diloco.export import export_hf as write_folder
    from pipeline.hf_export import ExportError

    m = store.load_manifest(step)
    tensors, meta = load_state(store, m.step)
    try:
        return write_folder(tensors, m.config, meta, out_dir, dtype=dtype, metadata={
            "lowband_run": m.run, "lowband_step": str(m.step), "lowband_state_hash": m.state_hash})
    except ExportError as e:
        raise InvalidConfig(f"checkpoint {m.run}@{m.step}: {e}") from e


# ----------------------------------------------------------------------------------- CLI glue

def open_backend(data_dir: str | os.PathLike, s3_url: str | None = None,
                 endpoint_url: str | None = None) -> Backend:
    """The coordinator's backend: ``<data_dir>/checkpoints`` or ``s3://bucket/prefix``."""
    if s3_url is None:
        return LocalBackend(Path(data_dir) / CHECKPOINT_DIR)
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    if not s3_url.startswith("s3://") or not bucket:
        raise InvalidName(f"expected s3://bucket[/prefix], got {s3_url!r}")
    try:
        return S3Backend(bucket, prefix, endpoint_url=endpoint_url)
    except ImportError:
        raise CheckpointError("an S3 checkpoint store needs boto3: pip install 'lowband[s3]'") from None
    except CheckpointError:  # InvalidName (a bad prefix) is a ValueError too
        raise
    except ValueError as e:  # botocore: "Invalid endpoint: ..."
        raise BackendError(f"S3 endpoint {endpoint_url!r}: {e}") from None


def list_runs(backend: Backend) -> list[str]:
    runs = set()
    for info in backend.list("runs"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[2] == "manifests":
            runs.add(parts[1])
    return sorted(runs)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cli_list(data_dir: str | os.PathLike, run: str | None = None, *, s3_url: str | None = None,
             endpoint_url: str | None = None) -> str:
    """Text for ``coordinator checkpoints list [RUN]``: one line per checkpoint."""
    backend = open_backend(data_dir, s3_url, endpoint_url)
    runs = [check_run(run)] if run is not None else list_runs(backend)
    lines = [f"{'RUN':<20} {'STEP':>8}  {'CREATED (UTC)':<19}  {'TENSORS':>7}  {'SIZE':>10}  STATE"]
    for r in runs:
        store = CheckpointStore(backend, r)
        for step in store.list():
            m = store.load_manifest(step)
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.created))
            lines.append(f"{r:<20} {step:>8}  {created:<19}  {len(m.tensors):>7}  "
                         f"{_human(m.nbytes):>10}  {m.state_hash[:12]}")
    if len(lines) == 1:
        return f"no checkpoints{f' for run {run}' if run else ''}"
    return "\n".join(lines)


def cli_export(data_dir: str | os.PathLike, run: str, step: int | str, out: str | os.PathLike, *,
               s3_url: str | None = None, endpoint_url: str | None = None,
               dtype: torch.dtype | None = None) -> str:
    """``coordinator checkpoints export [--run RUN] STEP DIR``; STEP may be ``latest``."""
    if step == "latest":
        step_n = None
    else:
        try:
            step_n = int(step)
        except ValueError:
            raise InvalidName(f"STEP must be an integer or 'latest', got {step!r}") from None
    store = CheckpointStore(open_backend(data_dir, s3_url, endpoint_url), run)
    m = store.load_manifest(step_n)
    path = export_hf(store, m.step, out, dtype=dtype)
    return (f"exported {run}@{m.step} ({len(m.tensors)} tensors, {_human(m.nbytes)}, "
            f"state {m.state_hash[:12]}) to {path}")
