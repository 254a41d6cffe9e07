"""Checkpoint store: local + S3 (a real moto server over HTTP) round-trips, kill -9 resume,
corruption / truncation detection and refetch, path safety, retention, HF export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from coordinator.checkpoints import (
    CheckpointConflict, CheckpointNotFound, CheckpointStore, CorruptChunk, InvalidConfig,
    InvalidName, LocalBackend, ManifestError, MissingChunk, S3Backend, cli_export, cli_list,
    load_state, open_backend, save_state, sha256_hex, sync,
)
from peer.identity import Identity
from testing.api import operator_api
from tests.harness import free_port

SMALL_CHUNK = 16 * 1024  # many chunks from small tensors, so tests stay fast


def make_state() -> dict[str, torch.Tensor]:
    """Deterministic multi-chunk state with every kind of tensor the store must keep bit-exact."""
    g = torch.Generator().manual_seed(1234)
    return {
        "embed.weight": torch.randn(64, 256, generator=g),  # 64 KiB -> 4 chunks
        "layers.0.w": torch.randn(40_000, generator=g).to(torch.bfloat16),  # 80 000 B -> 5 chunks
        "layers.0.h": torch.randn(8, 8, generator=g).half(),
        "step_count": torch.tensor(17, dtype=torch.int64),  # 0-dim
        "mask": torch.rand(33, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "ids": torch.arange(1000, dtype=torch.int32),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def chunk_path(root: Path, run: str, sha: str) -> Path:
    return root / "runs" / run / "chunks" / sha[:2] / sha


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_endpoint):
    client = s3_client(s3_endpoint)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return CheckpointStore(S3Backend(bucket, "lowband/test", client=client), "run-s3")


@pytest.fixture
def local_root(tmp_path) -> Path:
    return tmp_path / "store"


# --------------------------------------------------------------------------------- round trips

def test_local_round_trip_dedup_and_conflict(local_root):
    store = CheckpointStore(LocalBackend(local_root), "run-a")
    state = make_state()
    first = save_state(store, 10, state, {"outer_step": 10, "lr": 0.7},
                       config={"dim": 256}, chunk_size=SMALL_CHUNK)
    assert first.chunks_sent == len(first.manifest.chunk_shas()) > 10
    loaded, meta = load_state(store, 10)
    assert_same(state, loaded)
    assert meta == {"outer_step": 10, "lr": 0.7}
    assert store.load_manifest(10).config == {"dim": 256}

    again = save_state(store, 10, state, {"outer_step": 10}, chunk_size=SMALL_CHUNK)
    assert again.chunks_sent == 0 and again.manifest.state_hash == first.manifest.state_hash

    changed = dict(state, **{"layers.0.h": state["layers.0.h"] + 1})
    with pytest.raises(CheckpointConflict):
        save_state(store, 10, changed, chunk_size=SMALL_CHUNK)
    # The refused attempt had already uploaded its one new chunk; step 11 reuses it.
    assert save_state(store, 11, changed, chunk_size=SMALL_CHUNK).chunks_sent == 0
    changed2 = dict(state, ids=state["ids"] * 2)
    nxt = save_state(store, 12, changed2, chunk_size=SMALL_CHUNK)
    assert (nxt.chunks_sent, nxt.bytes_sent) == (1, 4000)  # only the changed tensor's chunk is new
    assert store.list() == [10, 11, 12] and store.latest() == 12
    assert_same(load_state(store)[0], changed2)  # None -> latest
    with pytest.raises(CheckpointNotFound):
        store.load_manifest(13)


def test_s3_round_trip_and_resumable_download(s3_store, local_root):
    state = make_state()
    save_state(s3_store, 3, state, {"who": "s3"}, chunk_size=SMALL_CHUNK)
    assert s3_store.list() == [3]
    loaded, meta = load_state(s3_store, 3)
    assert_same(state, loaded)
    assert meta == {"who": "s3"}

    # Download into a local store that already holds some chunks (an interrupted earlier download).
    local = CheckpointStore(LocalBackend(local_root), "run-s3")
    shas = s3_store.load_manifest(3).chunk_shas()
    for sha in shas[:4]:
        local.put_chunk(s3_store.get_chunk(sha))
    got = sync(s3_store, local, 3)
    assert (got.chunks_sent, got.chunks_skipped) == (len(shas) - 4, 4)
    assert_same(state, load_state(local, 3)[0])

    # Upload direction, and S3-side corruption is caught the same way as on disk.
    s3_store.delete(3)
    assert s3_store.list() == [] and s3_store.gc(grace_s=0) == len(shas)
    assert sync(local, s3_store).chunks_sent == len(shas)
    backend = s3_store.backend
    key = f"runs/run-s3/chunks/{shas[0][:2]}/{shas[0]}"
    backend.put(key, b"not the chunk")
    with pytest.raises(CorruptChunk):
        s3_store.get_chunk(shas[0])
    assert s3_store.missing(shas) == [shas[0]]
    assert_same(state, load_state(s3_store, 3, sources=[local])[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_round_trip_bit_identical_to_cpu(tmp_path):
    cpu_state = make_state()
    gpu_state = {k: v.cuda() for k, v in cpu_state.items()}
    gpu_store = CheckpointStore(LocalBackend(tmp_path / "gpu"), "run-cuda")
    cpu_store = CheckpointStore(LocalBackend(tmp_path / "cpu"), "run-cuda")
    from_gpu = save_state(gpu_store, 1, gpu_state, chunk_size=SMALL_CHUNK).manifest
    from_cpu = save_state(cpu_store, 1, cpu_state, chunk_size=SMALL_CHUNK).manifest
    assert from_gpu.state_hash == from_cpu.state_hash  # same bytes whichever device saved them
    loaded, _ = load_state(gpu_store, 1, device="cuda")
    assert all(t.is_cuda for t in loaded.values())
    assert_same(gpu_state, loaded)


# --------------------------------------------------------------------------------- kill -9

CHILD = r"""
import sys, time
from tests.test_checkpoints import SMALL_CHUNK, make_state, s3_client
from coordinator.checkpoints import CheckpointStore, LocalBackend, S3Backend, save_state

kind, where, bucket = sys.argv[1:4]
if kind == "local":
    backend = LocalBackend(where)
else:
    backend = S3Backend(bucket, "p", client=s3_client(where))
store = CheckpointStore(backend, "run-k")
state = make_state()
print("READY {\"phase\": \"upload\"}", flush=True)

def progress(done, todo):
    print(f"WROTE {done}/{todo}", flush=True)
    time.sleep(0.5)  # slow enough that the parent's SIGKILL lands mid-upload

save_state(store, 5, state, {"resumed": False}, chunk_size=SMALL_CHUNK, progress=progress)
print("DONE", flush=True)
"""


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kill9_mid_upload_then_resume(kind, procs, local_root, s3_endpoint):
    if kind == "local":
        store = CheckpointStore(LocalBackend(local_root), "run-k")
        args = ["local", str(local_root), "-"]
    else:
        bucket = f"kill-{uuid.uuid4().hex[:12]}"
        s3_client(s3_endpoint).create_bucket(Bucket=bucket)
        store = CheckpointStore(S3Backend(bucket, "p", client=s3_client(s3_endpoint)), "run-k")
        args = ["s3", s3_endpoint, bucket]
    child = procs.python("-c", CHILD, *args, ready_timeout=60)
    child.wait_for_line("WROTE 3/", timeout=60)
    child.kill()  # SIGKILL
    child.wait()
    assert not any("DONE" in line for line in child.lines)

    state = make_state()
    assert store.list() == []  # manifest is written last: no checkpoint yet
    present = [info.key.rsplit("/", 1)[1] for info in store.backend.list("runs/run-k/chunks")]
    assert len(present) >= 3
    assert store.verify(present) == []  # every chunk under its final name is whole

    result = save_state(store, 5, state, {"resumed": True}, chunk_size=SMALL_CHUNK)
    n = len(result.manifest.chunk_shas())
    assert len(present) < n
    assert (result.chunks_skipped, result.chunks_sent) == (len(present), n - len(present))
    loaded, meta = load_state(store, 5)
    assert_same(state, loaded)
    assert meta == {"resumed": True}
    if kind == "local":
        store.gc(grace_s=0)  # also sweeps staging files a killed writer may leave
        assert list((local_root / ".tmp").iterdir()) == []


# ------------------------------------------------------------------------ corruption / missing

def test_flipped_byte_detected_and_refetched(local_root, tmp_path):
    store = CheckpointStore(LocalBackend(local_root), "run-c")
    state = make_state()
    m = save_state(store, 1, state, chunk_size=SMALL_CHUNK).manifest
    sha = m.tensors[0].chunks[1]
    path = chunk_path(local_root, "run-c", sha)
    good = path.read_bytes()
    raw = bytearray(good)
    raw[100] ^= 0x01
    path.write_bytes(raw)

    with pytest.raises(CorruptChunk, match=sha[:12]):
        load_state(store, 1)
    assert not path.exists()  # the bad copy is gone, never to be loaded
    assert store.missing(m.chunk_shas()) == [sha]
    with pytest.raises(MissingChunk):
        load_state(store, 1)
    assert save_state(store, 1, state, chunk_size=SMALL_CHUNK).chunks_sent == 1  # re-put refetches
    assert_same(state, load_state(store, 1)[0])

    # Refetch from another replica during load.
    mirror = CheckpointStore(LocalBackend(tmp_path / "mirror"), "run-c")
    sync(store, mirror, 1)
    path.write_bytes(raw)
    assert store.verify() == [sha]
    assert_same(state, load_state(store, 1, sources=[mirror])[0])
    assert path.read_bytes() == good  # repaired in place from the mirror


def test_truncated_chunk_detected(local_root):
    store = CheckpointStore(LocalBackend(local_root), "run-t")
    sha = store.put_chunk(os.urandom(10_000))
    path = chunk_path(local_root, "run-t", sha)
    path.write_bytes(path.read_bytes()[:5_000])
    with pytest.raises(CorruptChunk, match="5000 bytes"):
        store.get_chunk(sha)
    assert not store.has_chunk(sha)


def test_missing_chunk_is_a_clear_error(local_root):
    store = CheckpointStore(LocalBackend(local_root), "run-m")
    m = save_state(store, 2, make_state(), chunk_size=SMALL_CHUNK).manifest
    gone = m.tensors[1].chunks[0]
    chunk_path(local_root, "run-m", gone).unlink()
    with pytest.raises(MissingChunk, match=r"run-m@2: 1 chunk\(s\) missing: " + gone[:12]) as e:
        load_state(store, 2)
    assert e.value.shas == [gone]
    with pytest.raises(MissingChunk, match="cannot publish"):
        store.put_manifest(3, m.__class__.build("run-m", 3, m.tensors))
    with pytest.raises(CorruptChunk, match="expected"):  # upload body that is not what it claims
        store.put_chunk(b"hello", expected_sha=gone)


def test_manifest_tampering_rejected(local_root):
    store = CheckpointStore(LocalBackend(local_root), "run-j")
    save_state(store, 4, {"w": torch.ones(3)})
    mpath = local_root / "runs" / "run-j" / "manifests" / f"{4:012d}.json"
    doc = json.loads(mpath.read_text())
    doc["tensors"][0]["shape"] = [4]
    mpath.write_text(json.dumps(doc))
    with pytest.raises(ManifestError):
        load_state(store, 4)
    mpath.write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        store.load_manifest(4)
    with pytest.raises(ManifestError):
        save_state(store, 5, {"w": torch.ones(1)}, {"bad": object()})


# ------------------------------------------------------------------------------- path safety

@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", ".tmp/x", "", "a/./b",
                                 "a\\..\\b", "runs/r/chunks/ab/..", "c:/x"])
def test_backend_rejects_unsafe_keys(local_root, key):
    backend = LocalBackend(local_root)
    with pytest.raises(InvalidName):
        backend.put(key, b"x")
    with pytest.raises(InvalidName):
        backend.get(key)


def test_store_rejects_bad_names(local_root, tmp_path):
    backend = LocalBackend(local_root)
    for run in ["../evil", "", "a/b", ".hidden", "x" * 200, None]:
        with pytest.raises(InvalidName):
            CheckpointStore(backend, run)
    store = CheckpointStore(backend, "ok")
    for sha in ["../../etc/passwd", "A" * 64, "0" * 63, 123]:
        with pytest.raises(InvalidName):
            store.get_chunk(sha)
    for step in [-1, True, "3", 10**12, 1.5]:
        with pytest.raises(InvalidName):
            store.load_manifest(step)
    # A symlink planted inside the root cannot carry writes outside it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (local_root / "runs").mkdir(parents=True)
    try:
        os.symlink(outside, local_root / "runs" / "ok")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available")
    with pytest.raises(InvalidName):
        store.put_chunk(b"data")
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------------- retention

def test_prune_keeps_right_steps_and_collects_chunks(local_root):
    store = CheckpointStore(LocalBackend(local_root), "run-p")
    shared = torch.arange(100, dtype=torch.float32)
    unique = {}
    for step in range(11):
        m = save_state(store, step, {"shared": shared, "w": torch.full((50,), float(step))}).manifest
        unique[step] = m.tensors[1].chunks[0]
    assert store.prune(keep_last=3, keep_every=5).chunks_removed == 0  # grace protects young chunks
    assert store.list() == [0, 5, 8, 9, 10]

    result = store.prune(keep_last=2, keep_every=5, grace_s=0)
    assert result.deleted_steps == [8]
    # unreferenced: the 6 unique chunks from steps pruned above plus step 8's
    assert result.chunks_removed == 7
    assert store.list() == [0, 5, 9, 10]
    for step in range(11):
        assert store.has_chunk(unique[step]) == (step in (0, 5, 9, 10))
    for step in store.list():
        tensors, _ = load_state(store, step)
        assert torch.equal(tensors["shared"], shared) and tensors["w"][0].item() == step
    with pytest.raises(ValueError):
        store.prune(keep_last=0)


def test_chunk_name_is_its_hash(local_root):
    store = CheckpointStore(LocalBackend(local_root), "run-h")
    data = b"lowband" * 1000
    sha = store.put_chunk(data)
    assert sha == sha256_hex(data) and store.put_chunk(data) == sha
    assert chunk_path(local_root, "run-h", sha).read_bytes() == data
    assert store.get_chunk(sha) == data


def test_store_import_does_not_load_torch():
    """The coordinator's chunk/manifest routes must not pay torch's import time."""
    code = "import sys, coordinator.checkpoints; assert 'torch' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------- `coordinator start` store + retention

TOKEN = "ckpt-test-token-f78e329d1223607c07de22c61603ae988735d934"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
TINY_CONFIG = {"vocab_size": 16, "dim": 8, "hidden_dim": 16, "n_layers": 1, "n_heads": 2}


def trainer_checkpoint(run: str, step: int):
    """(manifest, chunks) of a small trainer state (a parameter and its outer momentum, as the
    train role stores them) whose meta names its trainer hash; the momentum (zeros) is shared by
    every step, the parameter unique to it."""
    from coordinator.checkpoints import MOMENTUM_PREFIX, trainer_state_hash
    from diloco.state_io import build_manifest

    tensors = {"w": torch.full((32,), float(step)), MOMENTUM_PREFIX + "w": torch.zeros(32)}
    bare, chunks = build_manifest(run, step, tensors, config=TINY_CONFIG, chunk_size=128)
    h = trainer_state_hash(bare, lambda sha: bytes(chunks[sha]))
    return build_manifest(run, step, tensors, config=TINY_CONFIG, chunk_size=128,
                          meta={"global_state_hash": h, "outer_step": step})


def coordinator_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=root,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root), **(env or {})})


async def test_coordinator_start_on_s3_with_retention_then_list_and_export(procs, tmp_path,
                                                                           s3_endpoint):
    """`coordinator start --checkpoint-store s3://...`: peers' uploads (the real peer client over
    HTTP) land in the bucket, retention prunes after each commit, and `checkpoints list/export
    --s3` read the result."""
    from diloco.run_client import RunClient

    bucket = f"coord-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    store_url = f"s3://{bucket}/swarm"
    coord = procs.python("-m", "coordinator", "start", "--port", "0", "--data-dir",
                         str(tmp_path / "coord"), "--token", TOKEN, "--checkpoint-store", store_url,
                         "--endpoint-url", s3_endpoint, "--keep-last", "2", "--gc-grace", "0",
                         env=AWS_ENV)
    assert any(line.endswith(f"checkpoints: {store_url}/ (keep last 2)") for line in coord.lines)
    # The one member of run r3 (admitted with the token) averages each step, reports the agreed
    # hash and, as the designated uploader, publishes that state: the only writes allowed.
    peer = RunClient(coord.ready["url"], TOKEN, Identity.generate(), timeout=30)
    try:
        await peer.join("127.0.0.1:9", {"roles": ["train"]})
        assert not (await peer.join_run("r3", {"preset": "micro", "sync_timeout_s": 5.0}, []))["conflicts"]
        chunks_of, base = {}, "0" * 64
        for step in range(1, 5):
            manifest, chunks = trainer_checkpoint("r3", step)
            await peer.sync("r3", step, base, deadline_s=30)
            base = manifest.meta["global_state_hash"]
            await peer.report("r3", step, base, {})
            done = await peer.upload_checkpoint(manifest, chunks)
            assert done["chunks_sent"] == (len(chunks) if step == 1 else 1)  # the momentum dedups
            chunks_of[step] = set(chunks)
    finally:
        await peer.close()

    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}
    assert {k for k in keys if "/manifests/" in k} == {
        f"swarm/runs/r3/manifests/{s:012d}.json" for s in (3, 4)}
    stored_chunks = {k.rsplit("/", 1)[1] for k in keys if "/chunks/" in k}
    assert stored_chunks == chunks_of[3] | chunks_of[4]  # steps 1-2's own chunks were collected
    assert not (tmp_path / "coord" / "checkpoints").exists()  # nothing went to local disk

    status = operator_api(coord.ready["url"], tmp_path / "coord").get("/status")
    assert status["checkpoint_store"]["backend"] == "s3"
    assert status["checkpoint_store"]["last_prune"]["deleted_steps"] == [2]

    s3_args = ["--s3", store_url, "--endpoint-url", s3_endpoint]
    listing = coordinator_cli("checkpoints", "list", *s3_args, env=AWS_ENV)
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[:2] for line in listing.stdout.splitlines()[1:]] == [["r3", "3"], ["r3", "4"]]
    out = tmp_path / "export"
    export = coordinator_cli("checkpoints", "export", "latest", str(out), *s3_args, env=AWS_ENV)
    # read and verified from the bucket, then refused: "w" is no model (tests/test_export.py
    # exports real trainer states)
    assert export.returncode == 1 and "r3@4: the checkpoint's model config is not a lowband" in export.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["no_bucket", "no_boto3", "endpoint_without_store", "bad_keep_last"])
def test_coordinator_start_refuses_a_broken_checkpoint_store(case, tmp_path, s3_endpoint):
    args = ["--port", "0", "--data-dir", str(tmp_path), "--token", TOKEN]
    s3 = ["--checkpoint-store", "s3://no-such-bucket-lowband/p", "--endpoint-url", s3_endpoint]
    expect = {"no_bucket": "NoSuchBucket", "no_boto3": "needs boto3",
              "endpoint_without_store": "needs an s3:// checkpoint store",
              "bad_keep_last": "keep_last must be at least 1"}[case]
    if case == "no_boto3":  # a real process in which `import boto3` fails
        code = ("import sys; sys.modules['boto3'] = None; from coordinator.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
        root = Path(__file__).resolve().parents[1]
        r = subprocess.run([sys.executable, "-c", code, "start", *args, *s3], cwd=root,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(root), **AWS_ENV})
    else:
        extra = {"no_bucket": s3, "endpoint_without_store": ["--endpoint-url", s3_endpoint],
                 "bad_keep_last": ["--keep-last", "-1"]}[case]
        r = coordinator_cli("start", *args, *extra, env=AWS_ENV)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "READY" not in r.stdout
    [line] = r.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("coordinator: ") and expect in line, line
