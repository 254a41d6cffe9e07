"""Hostile-input fuzz bench: every parser a remote party can reach, fed mutated and random input.

    .venv/bin/python bench/fuzz.py [--wire 100000] [--http 10000] [--seed 1] [--tcp 2000] [--files 600]

Targets and their oracles (docs/architecture.md §Wire layers, "Every bad input -> a clear, typed error"):

- wire: mutated valid frames (bit flips, truncation, lying length fields, msgpack garbage headers,
  random bytes), fed in random splits into ``FrameDecoder``; live handshakes whose flights are
  tampered with in flight; AEAD record streams (tampered, reordered, replayed) and records that
  authenticate but carry garbage frames, into ``SecureChannel``. Only ``ProtocolError`` /
  ``AuthError`` may escape; decoded frames must respect the limits; untampered input must round
  trip; a tampered handshake must never finish with the two sides disagreeing on the transcript.
- tcp: random bytes, tampered handshakes and authenticated garbage records sent to a real
  ``PeerHost`` process; it must drop those connections, never log an internal error, and keep
  serving a legitimate peer.
- http: requests against a real coordinator process on 127.0.0.1 (malformed JSON, deep nesting,
  huge bodies, wrong types, missing fields, bad and valid signatures over hostile bodies, path
  traversal in run names / steps / chunk names, odd methods, bad content types, random paths and
  raw malformed HTTP). No 5xx, the coordinator stays up, nothing is written outside its data dir.
- files: truncated and malformed GGUF files (and well-formed ones with hostile metadata),
  safetensors folders and checkpoint manifests/chunks, into ``pipeline.loading`` (only
  ``ModelLoadError``) and ``coordinator.checkpoints`` (only ``CheckpointError``), under an
  address-space limit so a memory bomb shows as a crash.
- serve: hostile ``serve.step`` headers and payloads into a ``StageServer`` (only
  ``ServingError``); its session and KV-slot limits must hold throughout.

Any other exception, a 5xx, a dead process or a stray file is a crash, recorded with a
reproducer. Writes bench/results/fuzz.json and fuzz.md; exits 1 if anything crashed.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peer.errors import AuthError, ProtocolError  # noqa: E402
from peer.handshake import Handshake, State  # noqa: E402
from peer import messages as msgs  # noqa: E402
from peer.identity import Identity  # noqa: E402
from peer.secure import SecureChannel  # noqa: E402
from peer.wire import DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD, FrameType, decode_frame  # noqa: E402
# Generators and oracles shared with tests/test_hostile_input.py.
from testing.fuzzgen import (U32_EDGES, U64_EDGES, mutate, mutate_json, pieces, random_frame,  # noqa: E402
                             split_points)
from testing.hostile import (TOKEN, Coordinator, filesystem_problems, legit_check, signed_headers,  # noqa: E402
                             start_coordinator, tcp_case)
from testing.tiny_model import write_tiny_gguf, write_tiny_hf  # noqa: E402
from testing.wire_oracles import (check_channel, check_decode_frame, check_decoder,  # noqa: E402
                                  check_handshake_outcome, check_roundtrip, run_handshake, seal_raw)

RESULTS = Path(__file__).resolve().parent / "results"
# handshake tokens: raw bytes tokens must be >= 16 bytes (peer/handshake.py)
WIRE_TOKEN = b"wire-token-3c9e0f6a1b2d4e58"
OTHER_TOKEN = b"other-token-7d2a9c4e1f0b3a66"
MAX_REPRO = 2048  # bytes of a reproducer kept in the report (hex)


# ------------------------------------------------------------------------------- bookkeeping

@dataclass
class Tally:
    """Counts of fuzzed inputs per target and every crash with its reproducer."""

    cases: Counter = field(default_factory=Counter)
    typed: Counter = field(default_factory=Counter)  # outcomes: typed errors by class, HTTP statuses
    crashes: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def crash(self, target: str, problem: str, reproducer: Any) -> None:
        if isinstance(reproducer, (bytes, bytearray, memoryview)):
            reproducer = {"hex": bytes(reproducer[:MAX_REPRO]).hex(), "len": len(reproducer)}
        self.crashes.append({"target": target, "problem": problem[:2000], "reproducer": reproducer})
        print(f"CRASH [{target}] {problem.splitlines()[0][:300]}", flush=True)

    def guard(self, target: str, fn: Callable[[], object], allowed: tuple[type, ...],
              reproducer: Callable[[], Any]) -> None:
        """Run one case: an ``allowed`` exception is the expected typed error; anything else
        (including a failed oracle assertion) is a crash."""
        self.cases[target] += 1
        try:
            fn()
        except allowed as e:
            self.typed[type(e).__name__] += 1
        except Exception as e:  # the point of the bench: anything untyped is a finding
            self.crash(target, "".join(traceback.format_exception_only(type(e), e)).strip()
                       + "\n" + "".join(traceback.format_tb(e.__traceback__)[-3:]), reproducer())


# ----------------------------------------------------------------------------- wire target

def fuzz_wire(tally: Tally, rng: random.Random, n: int) -> None:
    """Frame decoder (one-shot and incremental), handshake state machines, AEAD records."""
    t0 = time.perf_counter()
    idents = [Identity.generate() for _ in range(4)]
    token = WIRE_TOKEN
    corpus = [random_frame(rng) for _ in range(200)]
    # real handshake flights to mutate (responder side, initiator side)
    flights: list[bytes] = []
    run_handshake(idents[0], idents[1], token, token, tamper=lambda k, d: (flights.append(d), d)[1])
    n_hs = n // 10
    n_ch = n // 8
    n_msg = n // 10
    n_dec = n - n_hs - n_ch - n_msg
    for _ in range(n_dec):
        frames = [rng.choice(corpus) if rng.random() < 0.5 else random_frame(rng) for _ in range(rng.randint(1, 3))]
        stream = b"".join(frames)
        splits = split_points(rng, len(stream))
        mode = rng.random()
        if mode < 0.1:
            tally.guard("wire.decoder.roundtrip", lambda: check_roundtrip(frames, splits), (),
                        lambda: {"frames": [f.hex() for f in frames], "splits": splits})
            continue
        data = mutate(rng, stream) if mode < 0.9 else rng.randbytes(rng.randrange(0, 300))
        splits = split_points(rng, len(data))
        small = rng.random() < 0.2  # tight limits, as the handshake decoder uses
        limits = (4096, 0) if small else (DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD)
        tally.guard("wire.decoder", lambda: check_decoder(data, splits, *limits), (),
                    lambda: {"data": data.hex(), "splits": splits, "limits": limits})
        if rng.random() < 0.2:
            tally.guard("wire.decode_frame", lambda: check_decode_frame(data), (), lambda: data)

    for _ in range(n_hs):
        fuzz_handshake_case(tally, rng, idents, flights)
    for _ in range(n_ch):
        fuzz_channel_case(tally, rng, corpus)
    for _ in range(n_msg):
        fuzz_message_case(tally, rng)
    tally.seconds["wire"] = time.perf_counter() - t0


def fuzz_handshake_case(tally: Tally, rng: random.Random, idents: list[Identity], flights: list[bytes]) -> None:
    token = WIRE_TOKEN
    same_token = rng.random() < 0.85
    target_flight = rng.randrange(5)
    mode = rng.randrange(5)
    record: dict = {"flight": target_flight, "mode": mode, "same_token": same_token}

    def tamper(k: int, data: bytes) -> bytes:
        if k != target_flight:
            return data
        if mode == 0:
            out = mutate(rng, data)
        elif mode == 1:
            out = rng.choice(flights)  # replay from another session
        elif mode == 2:
            out = rng.randbytes(rng.randrange(1, 300))
        elif mode == 3:
            out = mutate(rng, rng.choice(flights))
        else:
            out = data  # untampered; split into pieces below
        record["sent"] = out.hex()
        record["original"] = data.hex()
        return out

    def splitter(data: bytes) -> list[bytes]:
        return pieces(data, split_points(rng, len(data)))

    def case() -> None:
        i, r = run_handshake(idents[0], rng.choice(idents[1:]), token, token if same_token else OTHER_TOKEN,
                             tamper, splitter if rng.random() < 0.3 else None)
        tampered = "sent" in record and record["sent"] != record["original"]
        check_handshake_outcome(i, r, tampered=tampered, same_token=same_token)

    tally.guard("wire.handshake", case, (), lambda: record)
    if rng.random() < 0.3:  # a fresh state machine fed garbage as its very first input
        data = mutate(rng, rng.choice(flights)) if rng.random() < 0.7 else rng.randbytes(rng.randrange(300))
        initiator = rng.random() < 0.5

        def first() -> None:
            hs = Handshake(idents[0], token, initiator=initiator)
            try:
                hs.receive_data(data)
            except (AuthError, ProtocolError):
                assert hs.state is State.FAILED and not hs.done

        tally.guard("wire.handshake.first", first, (), lambda: {"data": data.hex(), "initiator": initiator})


def fuzz_channel_case(tally: Tally, rng: random.Random, corpus: list[bytes]) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    sender, receiver = SecureChannel(k1, k2), SecureChannel(k2, k1)
    mode = rng.randrange(6)
    if mode == 5:  # records that authenticate but carry garbage plaintext
        plains = [mutate(rng, rng.choice(corpus)) for _ in range(rng.randint(1, 3))]
        stream = b"".join(seal_raw(k1, c, p) for c, p in enumerate(plains))
        splits = split_points(rng, len(stream))
        tally.guard("wire.secure.sealed-garbage", lambda: check_channel(receiver, stream, splits), (),
                    lambda: {"key": k1.hex(), "plaintexts": [p.hex() for p in plains]})
        return
    frames = [decode_frame(rng.choice(corpus)) for _ in range(rng.randint(1, 4))]
    records = [bytes(sender.seal_frame(f.type, f.header, f.payload, f.flags)) for f in frames]
    if mode == 0:  # untampered: every frame comes back
        stream = b"".join(records)
        splits = split_points(rng, len(stream))

        def clean() -> None:
            got = check_channel(receiver, stream, splits)
            assert [(g.type, g.header, bytes(g.payload)) for g in got] == \
                   [(f.type, f.header, bytes(f.payload)) for f in frames], "clean records did not round trip"

        tally.guard("wire.secure.roundtrip", clean, (), lambda: {"records": [r.hex() for r in records]})
        return
    if mode == 1:
        stream = mutate(rng, b"".join(records))
    elif mode == 2:  # reorder / replay / drop records
        recs = list(records)
        op = rng.randrange(3)
        if op == 0 and len(recs) > 1:
            rng.shuffle(recs)
        elif op == 1:
            recs.insert(rng.randrange(len(recs) + 1), rng.choice(recs))
        else:
            recs.pop(rng.randrange(len(recs)))
        stream = b"".join(recs)
    elif mode == 3:  # lying record header
        rec = bytearray(records[0])
        struct.pack_into("!I", rec, 0, rng.choice(U32_EDGES))
        stream = bytes(rec) + b"".join(records[1:])
    else:
        stream = rng.randbytes(rng.randrange(0, 400))
    splits = split_points(rng, len(stream))
    tally.guard("wire.secure", lambda: check_channel(receiver, stream, splits), (),
                lambda: {"key": k1.hex(), "stream": stream[:MAX_REPRO].hex(), "splits": splits})


def fuzz_message_case(tally: Tally, rng: random.Random) -> None:
    """peer.messages through SecureChannel, as a PeerHost receives them: one message chunked over
    1-3 lanes (one channel each), lanes interleaved at random; clean ones must come back exactly,
    tampered chunk headers or duplicated chunks may only raise ProtocolError."""
    cid, text = rng.randrange(2**40), rng.randbytes(rng.randrange(8)).hex()
    msg = rng.choice([msgs.Mail(text, {"a": cid}), msgs.Request(cid, text, {}), msgs.Response(cid, {"b": text}, 0.5),
                      msgs.Error(cid, rng.choice(list(msgs.ErrorCode)), text, "KeyError")])
    payload = rng.randbytes(rng.randrange(0, 6000))
    out = msgs.OutgoingMessage(rng.randrange(2**32), msg, payload, rng.randint(1, 2048), striped=rng.random() < 0.5)
    lanes = min(rng.randint(1, 3), len(out.offsets))
    chunks = [(k, h, bytes(c)) for k in range(lanes) for h, c in out.lane(k, lanes)]
    order = rng.sample(range(len(chunks)), len(chunks))  # sealed as delivered: any order is a valid stream
    mode = rng.randrange(3)  # 0 clean, 1 tampered header field, 2 duplicated / dropped chunk
    if mode == 1:
        victim = chunks[rng.randrange(len(chunks))][1]
        victim[rng.choice([*victim, "zz"])] = rng.choice([-1, 0, 2**64 - 1, rng.choice(U32_EDGES), "x", [1], {}, None,
                                                         rng.choice("mqre")])
    elif mode == 2 and rng.random() < 0.5:
        order.insert(rng.randrange(len(order) + 1), rng.choice(order))
    elif mode == 2:
        order.pop()
    record = {"message": repr(msg), "chunks": [(k, h, len(c)) for k, h, c in chunks], "order": order}

    def case() -> None:
        pairs = {k: (SecureChannel(b"\x05" * 32, b"\x06" * 32), SecureChannel(b"\x06" * 32, b"\x05" * 32))
                 for k in range(lanes)}
        asm, got = msgs.Reassembler(1 << 16, 1 << 17, 8), []
        for i in order:
            k, h, c = chunks[i]
            tx, rx = pairs[k]
            for frame in rx.receive_data(tx.seal_frame(FrameType.DATA, h, c, out.flags)):
                d = asm.add_chunk("p", k, frame.header, frame.payload, frame.flags)
                if d is not None:
                    got.append(d)
        if mode == 0:
            assert len(got) == 1 and got[0].message == msg and got[0].payload == payload, "clean message lost"
        for d in got:
            assert isinstance(d.payload, bytearray) and len(d.payload) <= 1 << 16

    tally.guard("wire.messages", case, (ProtocolError,) if mode else (), lambda: record)


# ---------------------------------------------------------------------------- files target

def mutate_file(rng: random.Random, data: bytes, hot: int) -> bytes:
    """Truncation, bit flips, edge-valued u32/u64 fields and zeroed ranges, biased to the first
    ``hot`` bytes (the metadata region, where lengths and counts live)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        pos = rng.randrange(min(hot, len(buf))) if buf and rng.random() < 0.8 else rng.randrange(max(1, len(buf)))
        if op == 0:
            del buf[rng.randrange(hot) if rng.random() < 0.6 else rng.randrange(len(buf) + 1):]
        elif op == 1 and buf:
            for _ in range(rng.randint(1, 6)):
                i = rng.randrange(min(hot, len(buf))) if rng.random() < 0.8 else rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 2 and len(buf) >= pos + 8:
            struct.pack_into("<Q", buf, pos & ~7, rng.choice(U64_EDGES + [2**40, 10**6, 0xFFFFFFFF]))
        elif op == 3 and len(buf) >= pos + 4:
            struct.pack_into("<I", buf, pos & ~3, rng.choice(U32_EDGES + [30, 31, 8, 12]))
        elif op == 4:
            buf[pos:pos + rng.randrange(1, 64)] = bytes(rng.randrange(1, 64))
        else:
            buf = bytearray(data[:4] + rng.randbytes(rng.randrange(8, 4096)))
    return bytes(buf)


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    (hlen,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + hlen])
    body = data[8 + hlen:]
    op = rng.randrange(4)
    if op == 0:  # self-consistent file with a hostile header
        raw = json.dumps(mutate_json(rng, header)).encode()
        return struct.pack("<Q", len(raw)) + raw + body
    if op == 1:  # lying header length
        return struct.pack("<Q", rng.choice(U64_EDGES + [hlen - 1, hlen + 1, len(data)])) + data[8:]
    if op == 2:  # a tensor's offsets moved out of range / overlapping
        name = rng.choice([k for k in header if k != "__metadata__"])
        a, b = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[b, a], [a, len(body) + 8], [0, 2**62], [a, a], [-1, b]])
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + body
    return mutate_file(rng, data, 8 + hlen)


def fuzz_files(tally: Tally, rng: random.Random, n: int, workdir: Path) -> None:
    """GGUF files, HF safetensors folders and checkpoint manifests/chunks (run this in a child
    process under an address-space limit: see ``files_worker``)."""
    from pipeline.loading import ModelLoadError, load_model

    t0 = time.perf_counter()
    src_gguf = workdir / "tiny.gguf"
    write_tiny_gguf(src_gguf)
    load_model(src_gguf)  # sanity: the untampered file loads
    import gguf

    data_offset = gguf.GGUFReader(src_gguf).data_offset
    gguf_bytes = src_gguf.read_bytes()
    hf_src = workdir / "hf"
    write_tiny_hf(hf_src, src_gguf)
    load_model(hf_src)
    st_bytes = (hf_src / "model.safetensors").read_bytes()
    config = json.loads((hf_src / "config.json").read_text())
    case_path = workdir / "case.gguf"
    case_dir = workdir / "case-hf"
    shutil.copytree(hf_src, case_dir)

    n_ckpt = n // 3
    for k in range(n - n_ckpt):
        which = k % 4
        if which == 3:  # a well-formed file whose metadata describes a hostile model
            meta = {key: rng.choice([0, 1, -1, 3, 2**31, 2**32 + 5, 2**40, 2**63, 1e30, -0.0, float("nan"),
                                     "12", "", [1, 2], True, None])
                    for key in rng.sample(["block_count", "context_length", "embedding_length",
                                           "feed_forward_length", "attention.head_count",
                                           "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                                           "rope.freq_base", "vocab_size", "rope.dimension_count"], rng.randint(1, 3))}
            write_tiny_gguf(case_path, meta)
            tally.guard("files.gguf-meta", lambda: load_model(case_path), (ModelLoadError,), lambda: repr(meta))
        elif which == 0:
            data = mutate_file(rng, gguf_bytes, data_offset)
            case_path.write_bytes(data)
            tally.guard("files.gguf", lambda: load_model(case_path), (ModelLoadError,), lambda: data)
        elif which == 1:
            data = mutate_safetensors(rng, st_bytes)
            (case_dir / "model.safetensors").write_bytes(data)
            (case_dir / "config.json").write_text(json.dumps(config))
            tally.guard("files.safetensors", lambda: load_model(case_dir), (ModelLoadError,), lambda: data)
        else:
            raw = json.dumps(mutate_json(rng, config)).encode() if rng.random() < 0.8 else \
                mutate_file(rng, json.dumps(config).encode(), 400)
            (case_dir / "config.json").write_bytes(raw)
            (case_dir / "model.safetensors").write_bytes(st_bytes)
            tally.guard("files.hf-config", lambda: load_model(case_dir), (ModelLoadError,),
                        lambda: {"config.json": raw.decode("utf-8", "replace")[:MAX_REPRO]})
    fuzz_checkpoints(tally, rng, n_ckpt, workdir / "ckpt-parent")
    tally.seconds["files"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fuzz_serve_steps(tally, rng, n // 2, load_model(src_gguf))
    tally.seconds["serve"] = time.perf_counter() - t0


def fuzz_serve_steps(tally: Tally, rng: random.Random, n: int, model) -> None:
    """``serve.step`` requests (header + payload, what any authenticated peer can send a stage
    server) with hostile fields; only ServingError may escape, and the server's session and KV
    limits hold throughout."""
    import numpy as np

    from pipeline.protocol import ServingError, Span
    from pipeline.server import ServeConfig, StageServer

    config = ServeConfig(max_sessions=8, max_total_tokens=256)
    server = StageServer(None, "tiny", model, Span(0, model.cfg.n_layers), None, config)
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    good = {"sid": "s", "start": 0, "end": model.cfg.n_layers, "pos": 0, "chunks": [3], "input": "tokens",
            "out": "logits", "wire": "fp32", "capacity": 16, "dtype": "int64", "shape": [1, 3]}
    for k in range(n):
        h: Any = dict(good, sid=f"s{rng.randrange(40)}", capacity=rng.choice([1, 16, 64, 65, 2**40]))
        for _ in range(rng.randint(0, 2)):
            h = mutate_json(rng, h)
        if not isinstance(h, dict):
            h = {"x": h}
        payload = ids.tobytes()
        r = rng.random()
        if r < 0.2:
            payload = mutate_file(rng, payload, len(payload))
        elif r < 0.3:
            payload = rng.randbytes(rng.choice([0, 8, 24, 4 * 3 * model.cfg.dim]))

        def step(h=h, payload=payload) -> None:
            req = server.parse_step(h, payload)
            server._session(f"peer{rng.randrange(3)}", req)
            assert len(server.sessions) <= config.max_sessions, "session limit exceeded"
            assert sum(s.capacity for s in server.sessions.values()) <= config.max_total_tokens, "KV limit exceeded"

        tally.guard("serve.step", step, (ServingError,), lambda: {"header": repr(h)[:MAX_REPRO],
                                                                         "payload": payload.hex()[:MAX_REPRO]})


def fuzz_checkpoints(tally: Tally, rng: random.Random, n: int, parent: Path) -> None:
    """Hostile manifests (raw, JSON-mutated, and self-consistent with a recomputed state hash),
    corrupted chunks and manifests on disk, and path-traversal names, against a LocalBackend."""
    import torch

    from coordinator.checkpoints import (CheckpointError, CheckpointStore, LocalBackend, load_state,
                                         save_state)
    from peer.blobs import Manifest, TensorEntry, state_hash

    parent.mkdir(parents=True, exist_ok=True)
    backend = LocalBackend(parent / "data")
    store = CheckpointStore(backend, "fuzzrun")
    state = {"w": torch.arange(300, dtype=torch.float32).reshape(20, 15), "b": torch.ones(7, dtype=torch.float16),
             "i": torch.arange(5, dtype=torch.int64)}
    good = save_state(store, 1, state, {"note": "fuzz"}, config={"dim": 4}, chunk_size=256).manifest
    good_dict = good.to_dict()
    shas = good.chunk_shas()
    names = ["..", "../x", "a/../../lbfuzz-canary", "/etc/passwd", ".tmp", "", "x" * 300, "a\x00b", "ok-run",
             "%2e%2e", "con", "-x", "é", "a/b", ".hidden"]

    def consistent(d: dict) -> dict:
        """Re-hash a mutated manifest so it passes the state-hash check (what an attacker would do)."""
        try:
            entries = [TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), tuple(t["chunks"]), t["nbytes"])
                       for t in d["tensors"]]
            d["state_hash"] = state_hash(entries)
        except Exception:  # not re-hashable: leave it as it is
            pass
        return d

    step = 2
    for k in range(n):
        op = k % 7
        if op == 0:
            raw = mutate_file(rng, good.to_json(), len(good.to_json()))
            tally.guard("files.manifest.json", lambda: Manifest.from_json(raw), (CheckpointError,), lambda: raw)
        elif op == 1:
            d = mutate_json(rng, good_dict)
            tally.guard("files.manifest.dict", lambda: Manifest.from_dict(d), (CheckpointError,), lambda: d)
        elif op == 2:  # self-consistent hostile manifest published, then loaded
            d = mutate_json(rng, good_dict)
            if isinstance(d, dict) and isinstance(d.get("tensors"), list) and rng.random() < 0.5:
                t = rng.choice(good_dict["tensors"])
                huge = rng.choice([[2**40], [2**20, 2**20], [10**6], [0], [len(shas) * 1000]])
                item = {"name": "huge", "dtype": "U8", "shape": huge, "chunks": [rng.choice(shas)],
                        "nbytes": math.prod(huge)}
                d["tensors"] = [x for x in d["tensors"] if x != t] + [item]
            step += 1
            if isinstance(d, dict) and rng.random() < 0.8:  # a fresh step: no conflict with step 1
                d["step"] = step
            d = consistent(d) if isinstance(d, dict) else d
            use = step

            def publish_and_load(d=d, use=use) -> None:
                store.put_manifest(use, d)
                tensors, _ = load_state(store, use)
                m = store.load_manifest(use)
                for e in m.tensors:
                    assert tuple(tensors[e.name].shape) == e.shape

            tally.guard("files.manifest.publish", publish_and_load, (CheckpointError,), lambda: d)
        elif op == 3:  # a corrupted manifest file on disk
            raw = mutate_file(rng, good.to_json(), len(good.to_json()))
            backend.put(f"runs/fuzzrun/manifests/{1:012d}.json", raw)

            def read_back() -> None:
                store.list()
                store.load_manifest(1)
                load_state(store, 1)

            tally.guard("files.manifest.on-disk", read_back, (CheckpointError,), lambda: raw)
            backend.put(f"runs/fuzzrun/manifests/{1:012d}.json", good.to_json())
        elif op == 4:  # a corrupted chunk on disk is detected, removed, never returned
            sha = rng.choice(shas)
            key = f"runs/fuzzrun/chunks/{sha[:2]}/{sha}"
            orig = backend.get(key)
            bad = mutate_file(rng, orig, len(orig))

            def corrupt_chunk() -> None:
                backend.put(key, bad)
                try:
                    load_state(store, 1)
                    assert bad == orig, "a corrupt chunk was loaded"
                except CheckpointError:
                    assert not backend.exists(key), "corrupt chunk kept"
                    raise
                finally:
                    backend.put(key, orig)

            tally.guard("files.chunk.corrupt", corrupt_chunk, (CheckpointError,), lambda: bad)
        elif op == 5:  # hostile names everywhere a name goes
            name = rng.choice(names + ["lbfuzz-" + rng.randbytes(3).hex()])
            fn = rng.choice([
                lambda: CheckpointStore(backend, name),
                lambda: store.get_chunk(name),
                lambda: store.put_chunk(b"data", expected_sha=name),
                lambda: store.missing([name]),
                lambda: store.load_manifest(name),  # type: ignore[arg-type]
                lambda: backend.put(name, b"x"),
                lambda: backend.get(name),
                lambda: backend.list(name),
            ])
            tally.guard("files.names", fn, (CheckpointError,), lambda: name)
        else:  # chunk bodies that do not match their claimed hash
            body = rng.randbytes(rng.randrange(0, 3000))
            claim = rng.choice(shas + [hashlib.sha256(body).hexdigest(), "0" * 64])
            tally.guard("files.chunk.put", lambda: store.put_chunk(body, expected_sha=claim),
                        (CheckpointError,), lambda: {"claim": claim, "body": body.hex()})
    stray = [p.name for p in parent.iterdir() if p.name != "data"]
    if stray:
        tally.crash("files.fs-check", f"files written outside the data dir: {stray}", stray)
    tally.cases["files.fs-check"] += 1


def files_worker(args: argparse.Namespace) -> int:
    """Child process for ``fuzz_files``: caps the address space (so a memory bomb in a hostile
    file fails an allocation instead of taking the machine down), prints the tally as JSON."""
    try:
        import resource

        limit = args.mem_limit_gb << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # no rlimits on this platform: run uncapped
    import torch

    torch.set_num_threads(1)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="lbfuzz-files-") as tmp:
        fuzz_files(tally, random.Random(args.seed), args.files, Path(tmp))
    print("TALLY " + json.dumps({"cases": tally.cases, "typed": tally.typed, "crashes": tally.crashes,
                                 "seconds": tally.seconds}, default=str), flush=True)
    return 0


# ----------------------------------------------------------------------------- http target

def hostile_segment(rng: random.Random, canary: str, valid: list[str]) -> str:
    """One URL path segment, already percent-encoded as it goes on the wire."""
    if valid and rng.random() < 0.6:
        return rng.choice(valid)
    return rng.choice([
        "..", ".", "%2e%2e", "%2E%2E%2F%2E%2E%2F" + canary, "..%2F..%2F" + canary, "..%5C..%5C" + canary,
        "%2F" + canary, canary + "%00", canary + "%00.json", "a" * 300, "%C3%A9t%C3%A9", "." + canary,
        "-" + canary, canary + "%20x", "%252e%252e%252f" + canary, "..;", canary + "%0d%0aX:1", "~",
        canary, canary + ".json", "".join(f"%{b:02X}" for b in rng.randbytes(rng.randrange(1, 12))),
        "latest", "0", "-1", "1e3", "99999999999999999999", "%20%31", "%D9%A3", "0x1", "1.0", "null",
        "A" * 64, "0" * 63, "f" * 64, "F" * 64, "%u002e%u002e",
    ])


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
                 "application/octet-stream", "application/json; charset=latin-1", "*/*; q=0", "\x7f"]


@dataclass
class HttpCase:
    method: str
    path: str  # percent-encoded as sent
    headers: dict
    body: bytes | None = None
    raw: bytes | None = None  # sent verbatim over a socket instead
    label: str = ""

    def to_raw(self) -> bytes:
        head = f"{self.method} {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in self.headers.items()) + f"Content-Length: {len(self.body or b'')}\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + (self.body or b"")

    def reproducer(self) -> dict:
        if self.raw is not None:
            return {"raw": self.raw[:MAX_REPRO].decode("latin-1"), "len": len(self.raw), "label": self.label}
        body = self.body or b""
        return {"method": self.method, "path": self.path[:500], "headers": self.headers, "label": self.label,
                "body": body[:MAX_REPRO].decode("utf-8", "replace"), "body_len": len(body)}


class HttpFuzzer:
    """Builds hostile requests with enough valid state behind them (admitted and joined peers,
    runs, chunks, a published checkpoint) that mutations reach the handlers' field checks, not
    just authentication. Most requests are signed correctly over exactly the bytes sent (some
    signatures spoiled, some bearer tokens, some unsigned: all must get a 4xx)."""

    def __init__(self, rng: random.Random, canary: str) -> None:
        self.rng = rng
        self.canary = canary
        self.idents = [Identity.generate() for _ in range(6)]
        self.runs = ["fuzzrun", "fuzzrun2", "fuzz.run-3"]
        self.shas: list[str] = []
        self.chunks: dict[str, bytes] = {}
        self.manifest: dict = {}
        self.steps = ["1", "latest"]

    # -- valid bodies ---------------------------------------------------------------------------
    def body_for(self, action: str, ident: Identity) -> dict:
        rng = self.rng
        body: dict = {}
        if action == "admit":
            from peer.admission import token_proof
            body.update(token_proof=token_proof(TOKEN, ident.public_bytes))
        elif action == "join":
            body.update(address=f"127.0.0.1:{rng.randrange(1024, 65535)}",
                        meta={"device": "cpu", "memory": 1 << 30, "roles": ["train", "serve"], "throughput": 1e9})
        elif action == "heartbeat":
            other = rng.choice(self.idents).peer_id
            body["stats"] = {"serve": {"model": "m", "n_blocks": 30, "blocks": [0, 15], "sessions": 2,
                                       "tokens_per_s": 41.5},
                             "links": {other: {"rtt_s": 0.01, "bandwidth_Bps": 1e8, "ping_rtt_s": 0.01}}}
        elif action == "run_join":
            body.update(config={"sync_timeout_s": 0.2, "data_shards": 4, "checkpoint_every": 2}, explicit=["data_shards"])
        elif action == "run_sync":
            body.update(step=rng.randrange(1, 6), base_hash=rng.choice(["a", "b"]) * 64)
        elif action == "run_report":
            body.update(step=rng.randrange(0, 6), state_hash="c" * 64,
                        metrics={"loss": 2.5, "tokens": 1000, "data_position": rng.randrange(100)})
        return body

    def signed_case(self, action: str, path: str, mutate_it: bool = True) -> HttpCase:
        rng = self.rng
        ident = rng.choice(self.idents)
        body: Any = self.body_for(action, ident)
        if mutate_it and rng.random() < 0.75:
            for _ in range(rng.randint(1, 2)):
                body = mutate_json(rng, body)
        data = self.encode(body)
        headers = self.headers("POST", path, data, ident=ident, spoil=mutate_it)
        return HttpCase("POST", path, headers, data, label=f"signed {action}")

    # -- pieces ---------------------------------------------------------------------------------
    def headers(self, method: str, path: str, body: bytes | None, *, ident: Identity | None = None,
                spoil: bool = True) -> dict:
        """Mostly a valid signature over exactly this request (sometimes spoiled); otherwise a
        bearer token (never accepted) or nothing."""
        rng = self.rng
        h = {"Content-Type": "application/json"}
        r = rng.random() if spoil else 0.0
        if r < 0.85:
            h |= signed_headers(ident or rng.choice(self.idents), method, path, body or b"",
                                rng if spoil else None, with_key=path == "/api/admit")
        elif r < 0.9:
            h["Authorization"] = rng.choice(["Bearer " + TOKEN, "Bearer wrong", "Bearer", "Basic Zm9vOmJhcg==",
                                             "bearer  " + TOKEN, "Bearer " + "é".encode().decode("latin-1")])
        if rng.random() < 0.1 and spoil:
            h["Content-Type"] = rng.choice(CONTENT_TYPES)
        return h

    def encode(self, body: Any) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.85:
            return json.dumps(body).encode()
        if r < 0.9:
            return json.dumps(body).encode()[:rng.randrange(0, 200)]  # truncated JSON
        return self.garbage_body()

    def garbage_body(self) -> bytes:
        rng = self.rng
        depth = rng.choice([100, 1000, 100_000])
        return rng.choice([
            lambda: b"", lambda: b"null", lambda: b"[]", lambda: b"42", lambda: b'"str"', lambda: b"{",
            lambda: b'{"a": NaN}', lambda: b'{"a": Infinity}', lambda: b'{"a": -Infinity}',
            lambda: b"\xff\xfe{}", lambda: b'{"a": "\xed\xa0\x80"}', lambda: b"[" * depth + b"]" * depth,
            lambda: b'{"a":' * depth + b"1" + b"}" * depth, lambda: b'{"peer_id": 1e999}',
            lambda: b'{"x": ' + b"9" * 5000 + b"}", lambda: b'{"a":1,"a":2}', lambda: rng.randbytes(rng.randrange(1, 2000)),
            lambda: b"\x00" * 100, lambda: b'{"k": "' + b"\\u0000" * 1000 + b'"}',
            lambda: mutate(rng, json.dumps(self.body_for("join", self.idents[0])).encode()),
        ])()

    def huge_body(self) -> bytes:
        size = self.rng.choice([1_100_000, 2_000_000, 9_000_000, 17_000_000])
        return b'{"address": "' + b"a" * size + b'"}'

    # -- cases ----------------------------------------------------------------------------------
    def case(self) -> HttpCase:
        rng = self.rng
        seg = lambda valid: hostile_segment(rng, self.canary, valid)  # noqa: E731
        k = rng.random()
        if k < 0.30:
            action = rng.choice(["admit", "join", "heartbeat", "heartbeat", "leave", "run_join", "run_sync",
                                 "run_report"])
            run = seg(self.runs)
            path = {"admit": "/api/admit", "join": "/api/join", "heartbeat": "/api/heartbeat", "leave": "/api/leave",
                    "run_join": f"/api/runs/{run}", "run_sync": f"/api/runs/{run}/sync",
                    "run_report": f"/api/runs/{run}/report"}[action]
            if action == "leave" and rng.random() < 0.7:
                action, path = "heartbeat", "/api/heartbeat"  # keep most peers registered
            return self.signed_case(action, path)
        if k < 0.40:  # garbage or huge bodies to every POST route
            path = rng.choice(["/api/admit", "/api/join", "/api/heartbeat", "/api/leave", f"/api/runs/{seg(self.runs)}",
                               f"/api/runs/{seg(self.runs)}/sync", f"/api/runs/{seg(self.runs)}/report",
                               f"/api/runs/{seg(self.runs)}/checkpoints/missing", "/api/inference/offenses"])
            body = self.huge_body() if rng.random() < 0.02 else self.garbage_body()
            return HttpCase("POST", path, self.headers("POST", path, body), body, label="garbage body")
        if k < 0.55:  # GETs with hostile path parameters and queries
            run = seg(self.runs)
            path = rng.choice([
                f"/api/runs/{run}", f"/api/runs/{run}/reports", f"/api/runs/{run}/checkpoints",
                f"/api/runs/{run}/checkpoints/{seg(self.steps)}", f"/api/runs/{run}/chunks/{seg(self.shas)}",
                "/api/peers", "/api/runs", "/api/status", "/api/health", "/metrics", "/", f"/static/{seg(['status.js', 'style.css'])}",
                f"/static/..%2F..%2F{self.canary}", "/static/../../../etc/passwd", "/static/%2e%2e/%2e%2e/pyproject.toml"])
            if rng.random() < 0.4:
                q = rng.choice(["state", "since", "limit", "generation", "steps", "x"])
                path += f"?{q}={rng.choice(['', '-1', '0', '1', '1e9', '99999999999999999999', 'active,dead', 'zz', '%00', 'a' * 5000, '1&' + q + '=2'])}"
            return HttpCase("GET", path, self.headers("GET", path, None), None, label="get")
        if k < 0.75:
            return self.checkpoint_case(seg)
        if k < 0.85:  # odd methods and random paths
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "PROPFIND"])
            path = "/" + "/".join(seg([]) for _ in range(rng.randrange(0, 5)))
            if rng.random() < 0.5:
                path = "/api" + path
            body = self.garbage_body() if method not in ("GET", "HEAD", "TRACE") and rng.random() < 0.5 else None
            return HttpCase(method, path, self.headers(method, path, body), body, label="odd method / path")
        return self.raw_case()

    def checkpoint_case(self, seg: Callable[[list[str]], str]) -> HttpCase:
        rng = self.rng
        run = seg(self.runs[:1])
        op = rng.randrange(4)
        if op == 0:  # chunk upload: right, wrong or hostile name
            data = rng.randbytes(rng.randrange(0, 5000))
            sha = hashlib.sha256(data).hexdigest() if rng.random() < 0.5 else seg(self.shas)
            path = f"/api/runs/{run}/chunks/{sha}"
            return HttpCase("PUT", path, self.headers("PUT", path, data), data, label="put chunk")
        if op == 1:  # hostile manifests (some self-consistent, some not)
            m: Any = self.manifest
            for _ in range(rng.randint(0, 2)):
                m = mutate_json(rng, m)
            step = seg(self.steps + ["2", "3", "4"])
            if isinstance(m, dict) and rng.random() < 0.5 and step.isdigit():
                m["step"] = int(step)
            path, data = f"/api/runs/{run}/checkpoints/{step}", self.encode(m)
            return HttpCase("PUT", path, self.headers("PUT", path, data), data, label="put manifest")
        if op == 2:
            shas: Any = rng.choice([self.shas, self.shas + ["../../" + self.canary], [1, None], "x" * 64,
                                    [rng.randbytes(32).hex() for _ in range(rng.randrange(0, 200))],
                                    ["A" * 64], [self.canary] * 3])
            body: Any = {"shas": shas} if rng.random() < 0.8 else mutate_json(rng, {"shas": self.shas})
            path, data = f"/api/runs/{run}/checkpoints/missing", self.encode(body)
            return HttpCase("POST", path, self.headers("POST", path, data), data, label="missing")
        path = f"/api/runs/{run}/chunks/{seg(self.shas)}"
        return HttpCase("GET", path, self.headers("GET", path, None), None, label="get chunk")

    def raw_case(self) -> HttpCase:
        rng = self.rng
        c = self.canary
        signed = "".join(f"{k}: {v}\r\n" for k, v in
                         signed_headers(rng.choice(self.idents), "POST", "/api/heartbeat", b"{}").items())
        valid = (f"POST /api/heartbeat HTTP/1.1\r\nHost: x\r\n{signed}"
                 f"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").encode()
        raw = rng.choice([
            lambda: b"GARBAGE\r\n\r\n", lambda: rng.randbytes(rng.randrange(1, 3000)),
            lambda: b"GET /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            lambda: b"POST /api/join HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}{}{}{",
            lambda: b"POST /api/join HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            lambda: b"POST /api/join HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            lambda: b"POST /api/join HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            lambda: b"POST /api/join HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n",
            lambda: b"POST /api/join HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            lambda: b"GET /api/status HTTP/1.1\r\nHost: x\r\nNoColonHeader\r\n\r\n",
            lambda: b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            lambda: b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"GET /api/runs/" + c.encode() + b"\x00/checkpoints HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"GET /\r\n", lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            lambda: b"GET http://evil.example/api/status HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"get /api/status HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"GET /api/status HTTP/9.9\r\nHost: x\r\n\r\n",
            lambda: b"GET /api/status HTTP/1.1\r\n" + b"X-A: b\r\n" * 500 + b"\r\n",
            lambda: b"GET /../../../" + c.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"GET /static/../../" + c.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: (f"PUT /api/runs/fuzzrun/checkpoints/1 HTTP/1.1\r\nHost: x\r\n{signed}"
                     f"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n").encode(),
            lambda: b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\nGET /api/status HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: mutate(rng, valid), lambda: mutate(rng, valid), lambda: mutate(rng, valid),
        ])()
        return HttpCase("RAW", "", {}, raw=raw, label="raw")


async def send_case(session, base: str, case: HttpCase, host: str, port: int) -> int | str:
    """The response status, or why there was none (the client-side exception's name)."""
    import aiohttp
    from yarl import URL

    if case.raw is not None:
        return await send_raw(host, port, case.raw)
    try:
        async with session.request(case.method, URL(base + case.path, encoded=True), headers=case.headers,
                                   data=case.body, skip_auto_headers=("Content-Type",),
                                   timeout=aiohttp.ClientTimeout(total=45)) as r:
            await r.read()
            return r.status
    except ValueError:  # aiohttp refuses to send it (e.g. a control character in a header): send it raw
        return await send_raw(host, port, case.to_raw())
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return type(e).__name__  # e.g. the server answered 413 and closed while we were still sending


async def send_raw(host: str, port: int, raw: bytes, timeout: float = 3.0) -> int | str:
    """Send bytes verbatim and read the status line (or say why there was none, e.g. the
    server still waits for the rest of an incomplete request, or closed without answering)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        return f"connect failed: {type(e).__name__}"
    try:
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return "no answer yet"
    except (OSError, ValueError) as e:
        return type(e).__name__
    finally:
        writer.close()
    m = re.match(rb"HTTP/\d\.\d (\d{3})", line)
    return int(m.group(1)) if m else "closed without a status line"


async def http_setup(session, coord: Coordinator, fz: HttpFuzzer, tally: Tally) -> None:
    """Admit and join the fuzzer's peers, create its runs, complete step 1 of ``fuzzrun``, upload
    its chunks and publish one checkpoint (uploads come from a participant of an agreed step)."""
    from coordinator.checkpoints import trainer_state_hash
    from peer.blobs import Manifest, TensorEntry

    async def ok(ident: Identity, method: str, path: str, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} | signed_headers(
            ident, method, path, data, with_key=path == "/api/admit")
        await check_response(session, coord, HttpCase(method, path, headers, data), tally, expect=200)

    for ident in fz.idents:
        await ok(ident, "POST", "/api/admit", fz.body_for("admit", ident))
        await ok(ident, "POST", "/api/join", fz.body_for("join", ident))
        for run in fz.runs:
            await ok(ident, "POST", f"/api/runs/{run}", fz.body_for("run_join", ident))
    for _ in range(6):
        data = fz.rng.randbytes(1024)
        sha = hashlib.sha256(data).hexdigest()
        fz.shas.append(sha)
        fz.chunks[sha] = data
    entries = [TensorEntry("w", "F32", (768,), tuple(fz.shas[:3]), 3072),
               TensorEntry("outer_momentum.w", "F32", (768,), tuple(fz.shas[3:]), 3072)]
    state = trainer_state_hash(Manifest.build("fuzzrun", 1, entries, {"dim": 4}, {}), fz.chunks.__getitem__)
    m = Manifest.build("fuzzrun", 1, entries, {"dim": 4}, {"global_state_hash": state})
    fz.manifest = m.to_dict()
    uploader = fz.idents[0]
    # step 1 of fuzzrun: every member arrives, so the window closes at once; all agree on `state`
    await asyncio.gather(*(ok(i, "POST", "/api/runs/fuzzrun/sync", {"step": 1, "base_hash": "a" * 64})
                           for i in fz.idents))
    for ident in fz.idents:
        await ok(ident, "POST", "/api/runs/fuzzrun/report", {"step": 1, "state_hash": state})
    for sha in fz.shas:
        await ok(uploader, "PUT", f"/api/runs/fuzzrun/chunks/{sha}", fz.chunks[sha])
    await ok(uploader, "PUT", "/api/runs/fuzzrun/checkpoints/1", m.to_json())


async def check_response(session, coord: Coordinator, case: HttpCase, tally: Tally,
                         expect: int | None = None) -> int | str:
    tally.cases["http"] += 1
    status = await send_case(session, coord.url, case, coord.host, coord.port)
    if isinstance(status, str):
        tally.typed[f"http.no status ({case.label}: {status})"] += 1
    else:
        tally.typed[f"http.{status}"] += 1
        if status >= 500:
            tally.crash("http", f"{status} answer to {case.label}", case.reproducer())
    if expect is not None and status != expect:
        tally.crash("http.setup", f"setup request answered {status}, expected {expect}", case.reproducer())
    return status


async def probe(session, coord: Coordinator) -> bool:
    status = await send_case(session, coord.url, HttpCase("GET", "/api/status", {}), coord.host, coord.port)
    return status == 200


async def fuzz_http_async(tally: Tally, rng: random.Random, n: int, coord: Coordinator, canary: str,
                          workers: int = 24) -> dict:
    import aiohttp

    fz = HttpFuzzer(rng, canary)
    info: dict = {"probes_failed": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await http_setup(session, coord, fz, tally)
        # slow clients: a declared body that never arrives must time out, not pin the server
        def slow_head() -> str:
            signed = signed_headers(fz.idents[0], "POST", "/api/heartbeat", b"{" + b" " * 999)
            return "".join(f"{k}: {v}\r\n" for k, v in signed.items())
        slow = [asyncio.ensure_future(send_raw(coord.host, coord.port, (
            f"POST /api/heartbeat HTTP/1.1\r\nHost: x\r\n{slow_head()}"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").encode(), timeout=30))
            for _ in range(3)]
        remaining = n - tally.cases["http"]
        lock = asyncio.Lock()
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while True:
                async with lock:
                    if sent >= remaining:
                        return
                    sent += 1
                    k = sent
                    case = fz.case()
                await check_response(session, coord, case, tally)
                if k % 500 == 0:
                    if not await probe(session, coord):
                        info["probes_failed"] += 1
                        tally.crash("http", f"GET /api/status failed after {k} fuzzed requests "
                                    f"(coordinator {'alive' if coord.alive() else 'dead'})", case.reproducer())

        await asyncio.gather(*(worker() for _ in range(workers)))
        slow_status = await asyncio.gather(*slow)
        info["slow_client_status"] = slow_status
        tally.cases["http"] += len(slow)
        for s in slow_status:
            if not isinstance(s, int) or s >= 500:
                tally.crash("http", f"slow client answered {s}", "declared 1000 bytes, sent 1")
        status_ok = await probe(session, coord)
        info["status_after"] = status_ok
        async with session.get(coord.url + "/api/status") as r:
            final = await r.json()
        info["section_errors"] = final.get("section_errors")
    return info


def fuzz_http(tally: Tally, rng: random.Random, n: int, workdir: Path) -> dict:
    """>= n requests against a real coordinator; then liveness, log and filesystem checks."""
    t0 = time.perf_counter()
    canary = "lbfuzz" + rng.randbytes(4).hex()
    parent = workdir / "coord-parent"
    log = workdir / "coordinator.log"
    coord = start_coordinator(parent, log)
    try:
        info = asyncio.run(fuzz_http_async(tally, rng, n, coord, canary))
        if not info["status_after"] or not coord.alive():
            tally.crash("http", "coordinator not serving GET /api/status after the fuzz", info)
        if info.get("section_errors"):
            tally.crash("http", f"status sections broken by fuzzed input: {info['section_errors']}", info)
    finally:
        alive = coord.alive()
        coord.stop()
    if not alive:
        tally.crash("http", "coordinator process died", log.read_text(errors="replace")[-3000:])
    problems, info["aiohttp_internal_tracebacks"] = coord.log_problems()
    for text in problems:
        tally.crash("http.log", text, "coordinator log record")
    roots = (ROOT, Path(tempfile.gettempdir()))
    for problem in filesystem_problems(parent, canary, roots):
        tally.crash("http.fs", problem, problem)
    tally.cases["http.fs-check"] += 1
    info["canary"] = canary
    tally.seconds["http"] = time.perf_counter() - t0
    return info


# ------------------------------------------------------------------------------ tcp target

async def serve_peer(token: str) -> None:
    """Child process: a PeerHost with an echo handler; logs go to stdout for the parent."""
    from peer.transport import PeerHost

    host = PeerHost(Identity.generate(), token.encode(), handshake_timeout=5.0)
    await host.start("127.0.0.1", 0)

    async def echo(peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        return {"echo": header}, payload

    host.handle("echo", echo)
    print("READY " + json.dumps({"address": host.address, "peer_id": host.peer_id}), flush=True)
    await asyncio.Event().wait()


def start_peer(log: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-peer", TOKEN],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return proc, json.loads(line[6:])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"peer did not start:\n{log.read_text(errors='replace')[-3000:]}")


def peer_log_problems(log: Path) -> list[str]:
    """Server log lines that show an input reached code that did not expect it (the transport
    logs expected rejections as plain warnings, bugs with 'internal error' or a traceback)."""
    text = log.read_text(errors="replace")
    return [line for line in text.splitlines()
            if "internal error" in line or "Traceback" in line or "transport task failed" in line
            or " ERROR " in line or "CRITICAL" in line]


def fuzz_tcp(tally: Tally, rng: random.Random, n: int, workdir: Path, concurrency: int = 16) -> dict:
    """``n`` hostile connections to a real PeerHost process, a legitimate peer checked between
    batches; the server must never log an internal error and must keep serving."""
    from peer.transport import PeerHost

    t0 = time.perf_counter()
    log = workdir / "peer.log"
    proc, server = start_peer(log)
    info: dict = {"kinds": Counter(), "legit_ok": 0, "legit_failed": 0}
    idents = [Identity.generate() for _ in range(4)]
    flights: list[bytes] = []
    run_handshake(idents[0], idents[1], WIRE_TOKEN, WIRE_TOKEN, tamper=lambda k, d: (flights.append(d), d)[1])
    corpus = [random_frame(rng) for _ in range(50)]

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                tally.cases["tcp"] += 1
                try:
                    info["kinds"][await tcp_case(server["address"], rng, idents, flights, corpus)] += 1
                except (OSError, asyncio.TimeoutError) as e:
                    tally.crash("tcp", f"could not open a connection to the peer: {e!r}", server)

        batch = max(1, n // 10)
        for start in range(0, n, batch):
            await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
            client = PeerHost(Identity.generate(), TOKEN.encode())
            await client.start("127.0.0.1", 0)
            try:
                ok = await legit_check(client, server)
            finally:
                await client.close()
            info["legit_ok" if ok else "legit_failed"] += 1
            if not ok:
                tally.crash("tcp", f"legitimate peer could not call the server after {start + batch} hostile "
                                   f"connections (server {'alive' if proc.poll() is None else 'dead'})", server)

    try:
        asyncio.run(main())
    finally:
        alive = proc.poll() is None
        proc.kill()
        proc.wait(timeout=10)
    if not alive:
        tally.crash("tcp", "peer process died", log.read_text(errors="replace")[-3000:])
    for line in peer_log_problems(log):
        tally.crash("tcp.log", line, "peer log line")
    info["kinds"] = dict(info["kinds"])
    info["rejections_logged"] = sum("rejected inbound" in line or "dropping connection" in line
                                    for line in log.read_text(errors="replace").splitlines())
    tally.seconds["tcp"] = time.perf_counter() - t0
    return info


def _serve_peer_main(token: str) -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_peer(token))


# ------------------------------------------------------------------ coverage-guided (atheris)

def atheris_one_input(data: bytes) -> None:
    """One libFuzzer input: a selector byte, cut points, then bytes for the frame decoder, a
    fresh handshake responder, or the plaintext of an authenticated AEAD record. The oracles
    raise on anything but the typed errors, which atheris reports as a crash."""
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 2)
    cuts = [fdp.ConsumeIntInRange(1, 4096) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    if target == 0:
        check_decoder(body, sorted({c for c in cuts if c < len(body)}))
    elif target == 1:
        hs = Handshake(_ATHERIS_IDENT, WIRE_TOKEN, initiator=False)
        try:
            for piece in pieces(body, sorted({c for c in cuts if c < len(body)})):
                hs.receive_data(piece)
        except (AuthError, ProtocolError):
            assert hs.state is State.FAILED
    else:
        key = b"\x05" * 32
        check_channel(SecureChannel(b"\x06" * 32, key), seal_raw(key, 0, body), [])


_ATHERIS_IDENT: Identity | None = None  # set by atheris_worker


def atheris_worker(runs: int, workdir: str) -> int:
    """Coverage-guided fuzzing of the sans-IO wire code with atheris (libFuzzer), seeded with
    real frames and handshake flights; prints the number of executed inputs."""
    import atheris

    global _ATHERIS_IDENT
    _ATHERIS_IDENT = Identity.generate()
    corpus = Path(workdir) / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    seeds = [random_frame(rng) for _ in range(30)]
    run_handshake(Identity.generate(), Identity.generate(), WIRE_TOKEN, WIRE_TOKEN,
                  tamper=lambda k, d: (seeds.append(d), d)[1])
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(bytes([i % 3, 0]) + seed)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=8192", f"-artifact_prefix={workdir}/",
                   "-print_final_stats=1", str(corpus)], atheris_one_input)
    atheris.Fuzz()
    return 0


# The child instruments only the peer modules (imported first, inside instrument_imports), so
# coverage feedback comes from the code under test and start-up stays fast.
_ATHERIS_CHILD = """
import sys, atheris
with atheris.instrument_imports(include=["peer"]):
    import peer.errors, peer.identity, peer.wire, peer.handshake, peer.secure
from bench.fuzz import atheris_worker
sys.exit(atheris_worker(int(sys.argv[1]), sys.argv[2]))
"""


def run_atheris_child(tally: Tally, runs: int) -> None:
    """The atheris pass in a child process (libFuzzer owns the process and exits it); skipped,
    and said so, when atheris is not installed (it is optional)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        tally.typed["wire.atheris skipped (not installed)"] += 1
        return
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="lbfuzz-atheris-") as tmp:
        proc = subprocess.run([sys.executable, "-c", _ATHERIS_CHILD, str(runs), tmp],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        done = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
        tally.cases["wire.atheris"] += int(done[-1]) if done else 0
        if proc.returncode != 0:
            artifacts = [p.name for p in Path(tmp).iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
            repro = (Path(tmp) / artifacts[0]).read_bytes() if artifacts else out[-3000:]
            tally.crash("wire.atheris", f"atheris exited {proc.returncode}: {out[-1500:]}", repro)
    tally.seconds["wire.atheris"] = time.perf_counter() - t0


# ------------------------------------------------------------------------------------ main

def run_files_child(tally: Tally, seed: int, n: int, mem_limit_gb: int) -> None:
    """``fuzz_files`` in a child process under an address-space cap; its tally is merged here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--files-worker", "--seed", str(seed),
                           "--files", str(n), "--mem-limit-gb", str(mem_limit_gb)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TALLY ")), None)
    if line is None:
        tally.crash("files", f"files worker exited {proc.returncode} without a tally",
                    (proc.stdout + proc.stderr)[-3000:])
        return
    child = json.loads(line[6:])
    tally.cases.update(child["cases"])
    tally.typed.update(child["typed"])
    tally.crashes += child["crashes"]
    tally.seconds.update(child["seconds"])


def summarize(tally: Tally, args: argparse.Namespace, info: dict, total_s: float) -> tuple[dict, dict, list[str]]:
    wire = sum(v for k, v in tally.cases.items() if k.startswith("wire"))
    http = tally.cases["http"]
    crashes_by_target = Counter(c["target"].split(".")[0] for c in tally.crashes)
    rows = []
    required = {"wire": args.wire, "tcp": args.tcp, "http": args.http, "files": args.files, "serve": args.files // 2}
    for target, goal in required.items():
        count = sum(v for k, v in tally.cases.items() if k.split(".")[0] == target and not k.endswith("fs-check"))
        rows.append({"target": target, "fuzzed inputs": count, "required": goal,
                     "crashes": crashes_by_target.get(target, 0), "seconds": round(tally.seconds.get(target, 0.0), 1),
                     "result": "pass" if count >= goal and not crashes_by_target.get(target) else "FAIL"})
    detail = [{"case kind": k, "inputs": v} for k, v in sorted(tally.cases.items())]
    outcomes = [{"outcome": k, "count": v} for k, v in sorted(tally.typed.items())]
    data = {"seed": args.seed, "total_seconds": round(total_s, 1), "wire_inputs": wire, "http_requests": http,
            "crashes": tally.crashes, "crash_count": len(tally.crashes), "cases": dict(tally.cases),
            "outcomes": dict(tally.typed), "http_info": info.get("http", {}), "tcp_info": info.get("tcp", {})}
    notes = [f"Seed {args.seed}; total {total_s:.0f} s. A crash is any exception other than the target's "
             "typed error, a failed oracle assertion, a 5xx answer, a dead or unresponsive server, an error "
             "or traceback from our code in a server log, or a file outside the documented data-dir layout.",
             "wire: FrameDecoder (incremental, random splits, tight and default limits), decode_frame, "
             "live Handshake pairs with one flight tampered (mutated, replayed, random, split), and "
             "SecureChannel streams (tampered, reordered, replayed, lying lengths, authenticated garbage).",
             "http: a real coordinator process on 127.0.0.1, working directory = a scratch parent whose "
             "only allowed entry is the data dir; path-traversal attempts carry a canary name searched "
             "for afterwards under that parent, the repository and the temp dir."]
    http_info = info.get("http", {})
    if http_info:
        notes.append(f"http: slow clients answered {http_info.get('slow_client_status')}; /api/status after "
                     f"the run: {'200' if http_info.get('status_after') else 'FAILED'}; aiohttp logged "
                     f"{http_info.get('aiohttp_internal_tracebacks', 0)} tracebacks from its own code "
                     "(parser 400s, writes to departed clients): log noise a client can cause.")
    tcp_info = info.get("tcp", {})
    if tcp_info:
        notes.append(f"tcp: hostile connection kinds {tcp_info.get('kinds')}; legitimate peer checks "
                     f"{tcp_info.get('legit_ok')} ok / {tcp_info.get('legit_failed')} failed.")
    for c in tally.crashes[:20]:
        notes.append(f"CRASH [{c['target']}] {c['problem'].splitlines()[0][:300]}")
    return data, {"Summary": rows, "Outcomes": outcomes, "Inputs by case kind": detail}, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wire", type=int, default=100_000, help="fuzzed wire inputs (sans-IO)")
    parser.add_argument("--http", type=int, default=10_000, help="fuzzed HTTP requests")
    parser.add_argument("--tcp", type=int, default=2_000, help="hostile TCP connections to a PeerHost")
    parser.add_argument("--files", type=int, default=1_200, help="malformed model files and checkpoints")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mem-limit-gb", type=int, default=8, help="address-space cap of the files worker")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--atheris-runs", type=int, default=30_000,
                        help="coverage-guided wire inputs when atheris is installed (0: skip)")
    parser.add_argument("--files-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-peer", metavar="TOKEN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_peer:
        _serve_peer_main(args.serve_peer)
        return 0
    if args.files_worker:
        return files_worker(args)

    from bench.common import write_results

    t0 = time.perf_counter()
    tally = Tally()
    info: dict = {}
    rng = random.Random(args.seed)
    print(f"fuzz: {args.wire} wire inputs", flush=True)
    fuzz_wire(tally, random.Random(rng.random()), args.wire)
    if args.atheris_runs:
        print(f"fuzz: {args.atheris_runs} coverage-guided wire inputs (atheris)", flush=True)
        run_atheris_child(tally, args.atheris_runs)
    with tempfile.TemporaryDirectory(prefix="lbfuzz-") as tmp:
        print(f"fuzz: {args.tcp} hostile TCP connections", flush=True)
        info["tcp"] = fuzz_tcp(tally, random.Random(rng.random()), args.tcp, Path(tmp))
        print(f"fuzz: {args.http} HTTP requests", flush=True)
        info["http"] = fuzz_http(tally, random.Random(rng.random()), args.http, Path(tmp))
    print(f"fuzz: {args.files} malformed files and checkpoints, {args.files // 2} serve steps", flush=True)
    run_files_child(tally, rng.randrange(2**31), args.files, args.mem_limit_gb)
    total = time.perf_counter() - t0
    data, tables, notes = summarize(tally, args, info, total)
    write_results("fuzz", data, tables, notes, results_dir=args.out)
    from bench.common import markdown_table

    print(markdown_table(tables["Summary"]))
    print(f"fuzz: {len(tally.crashes)} crashes in {total:.0f}s; wrote {args.out / 'fuzz.json'} and fuzz.md")
    ok = not tally.crashes and all(r["result"] == "pass" for r in tables["Summary"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
