"""Hostile input (property-based, hypothesis): the frame decoder, the handshake and the AEAD record
layer see only their typed errors; a real coordinator process answers fuzzed HTTP with 4xx, keeps
serving and writes nothing outside its data dir; model loaders and the checkpoint store reject
truncated and malformed files with ModelLoadError / CheckpointError; a real PeerHost drops
connections that send garbage and keeps serving a legitimate peer.

The oracles (testing/wire_oracles.py, testing/hostile.py) are shared with the fuzz bench
(bench/fuzz.py), which runs the same checks at scale.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import math
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer import admission
from peer.errors import AuthError, ProtocolError
from peer.handshake import Handshake, State
from peer.identity import Identity
from peer.secure import SecureChannel
from peer.wire import Frame, FrameType, encode_frame
from testing import ROOT
from testing.hostile import (TOKEN, filesystem_problems, hostile_session_frames, legit_check, signed_headers,
                             start_coordinator, tcp_case)
from testing.tiny_model import write_tiny_gguf, write_tiny_hf
from testing.wire_oracles import (check_channel, check_decoder, check_handshake_outcome, check_roundtrip,
                                  run_handshake, seal_raw)

FAST = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# msgpack-able header values (bytes included: handshake fields are raw bytes)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
headers = st.dictionaries(st.text(max_size=8), values, max_size=5)
frames = st.builds(lambda t, h, p, f: encode_frame(Frame(t, h, p, f)), st.integers(0, 255), headers,
                   st.binary(max_size=300), st.integers(0, 255))
flips = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6)


def apply_flips(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, xor in edits:
        if buf:
            buf[pos % len(buf)] ^= xor
    return bytes(buf)


def cuts_for(n: int, raw: list[int]) -> list[int]:
    return sorted({c % n for c in raw if n and 0 < c % n}) if n > 1 else []


# ------------------------------------------------------------------------------- wire

@FAST
@given(st.lists(frames, min_size=1, max_size=3), st.lists(st.integers(1, 10**6), max_size=8))
def test_clean_frames_round_trip_in_any_split(encoded, raw_cuts):
    check_roundtrip(encoded, cuts_for(sum(map(len, encoded)), raw_cuts))


@FAST
@given(st.lists(frames, min_size=1, max_size=3), flips, st.integers(0, 10**6),
       st.lists(st.integers(1, 10**6), max_size=8), st.booleans())
def test_decoder_raises_only_protocol_error(encoded, edits, cut, raw_cuts, tight):
    data = apply_flips(b"".join(encoded), edits)
    data = data[:cut % (len(data) + 1)]
    check_decoder(data, cuts_for(len(data), raw_cuts), *((4096, 0) if tight else (65536, 16 << 20)))


@FAST
@given(st.binary(max_size=600), st.lists(st.integers(1, 10**6), max_size=8))
def test_decoder_on_random_bytes(data, raw_cuts):
    check_decoder(data, cuts_for(len(data), raw_cuts))
    check_decoder(b"LB\x01" + data, cuts_for(len(data) + 3, raw_cuts))


IDENTS = [Identity.generate() for _ in range(3)]
# handshake tokens: raw bytes tokens must be >= 16 bytes (peer/handshake.py)
WIRE_TOKEN = b"wire-token-3c9e0f6a1b2d4e58"
OTHER_TOKEN = b"other-token-7d2a9c4e1f0b3a66"


@FAST
@given(st.integers(0, 4), st.sampled_from(["flip", "truncate", "replace", "extend"]), flips,
       st.binary(max_size=200), st.booleans())
def test_tampered_handshake_fails_cleanly_and_never_half_agrees(flight, how, edits, junk, same_token):
    def tamper(k: int, data: bytes) -> bytes:
        if k != flight:
            return data
        return {"flip": lambda: apply_flips(data, edits), "truncate": lambda: data[:edits[0][0] % (len(data) + 1)],
                "replace": lambda: junk, "extend": lambda: data + junk}[how]()

    i, r = run_handshake(IDENTS[0], IDENTS[1], WIRE_TOKEN, WIRE_TOKEN if same_token else OTHER_TOKEN, tamper)
    check_handshake_outcome(i, r, tampered=True, same_token=same_token)


@FAST
@given(st.binary(max_size=500), st.booleans())
def test_handshake_first_message_garbage(data, initiator):
    hs = Handshake(IDENTS[0], WIRE_TOKEN, initiator=initiator)
    try:
        hs.receive_data(data)
    except (AuthError, ProtocolError):
        assert hs.state is State.FAILED
        assert hs.data_to_send()  # the REJECT with the reason is queued for the peer


def test_clean_handshake_and_wrong_token():
    i, r = run_handshake(IDENTS[0], IDENTS[1], WIRE_TOKEN, WIRE_TOKEN)
    check_handshake_outcome(i, r, tampered=False, same_token=True)
    i, r = run_handshake(IDENTS[0], IDENTS[1], WIRE_TOKEN, OTHER_TOKEN)
    check_handshake_outcome(i, r, tampered=False, same_token=False)


@FAST
@given(st.lists(st.tuples(st.integers(0, 255), headers, st.binary(max_size=200)), min_size=1, max_size=3),
       st.sampled_from(["flip", "reorder", "replay", "drop", "truncate"]), flips,
       st.lists(st.integers(1, 10**6), max_size=6))
def test_secure_channel_tampering_is_fatal_and_typed(fr, how, edits, raw_cuts):
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    sender, receiver = SecureChannel(k1, k2), SecureChannel(k2, k1)
    records = [bytes(sender.seal_frame(t, h, p)) for t, h, p in fr]
    if how == "flip":
        stream = apply_flips(b"".join(records), edits)
    elif how == "reorder":
        stream = b"".join(reversed(records)) if len(records) > 1 else apply_flips(records[0], edits)
    elif how == "replay":
        stream = b"".join(records + records[:1])
    elif how == "drop":
        stream = b"".join(records[1:]) or apply_flips(records[0], edits)
    else:
        stream = b"".join(records)[:edits[0][0] % sum(map(len, records))]
    got = check_channel(receiver, stream, cuts_for(len(stream), raw_cuts))
    assert len(got) <= len(records)


@FAST
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_authenticated_garbage_plaintext(plains):
    """A peer holding the session key can seal anything; the frame decoder still only raises
    ProtocolError."""
    key = b"\x03" * 32
    receiver = SecureChannel(b"\x04" * 32, key)
    check_channel(receiver, b"".join(seal_raw(key, c, p) for c, p in enumerate(plains)), [])


# --------------------------------------------------------------------------- coordinator HTTP

@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile-http")
    coord = start_coordinator(work / "parent", work / "coordinator.log")
    idents = [Identity.generate() for _ in range(2)]
    try:
        for ident in idents:
            admit = json.dumps({"token_proof": admission.token_proof(TOKEN, ident.public_bytes)}).encode()
            assert signed_request(coord, ident, "POST", "/api/admit", admit, with_key=True)[0] == 200
            body = json.dumps({"address": "127.0.0.1:9000", "meta": {}}).encode()
            assert signed_request(coord, ident, "POST", "/api/join", body)[0] == 200
        yield coord, idents
    finally:
        coord.stop()


def request(coord, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(coord.host, coord.port, timeout=30)
    try:
        h = {"Content-Type": "application/json"} if headers is None else headers
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in h.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def signed_request(coord, ident: Identity, method: str, path: str, body: bytes = b"",
                   rng: random.Random | None = None, *, with_key: bool = False) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **signed_headers(ident, method, path, body, rng,
                                                                     with_key=with_key)}
    return request(coord, method, path, body, headers)


CANARY = "lbfuzzcanary"
segments = st.one_of(
    st.sampled_from(["fuzzrun", "..", "%2e%2e", f"..%2F..%2F{CANARY}", f"%2F{CANARY}", f"{CANARY}%00", "a" * 300,
                     "latest", "-1", "99999999999999999999", "0" * 64, "f" * 64, f".{CANARY}", "%C3%A9", "1"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="/?#%"), min_size=1, max_size=12))
routes = st.sampled_from(["/api/admit", "/api/health", "/api/join", "/api/heartbeat", "/api/leave", "/api/runs/{a}", "/api/runs/{a}/sync",
                          "/api/runs/{a}/report", "/api/runs/{a}/reports", "/api/runs/{a}/checkpoints",
                          "/api/runs/{a}/checkpoints/{b}", "/api/runs/{a}/chunks/{b}",
                          "/api/runs/{a}/checkpoints/missing", "/api/peers", "/api/status", "/static/{a}", "/{a}/{b}"])
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                                     st.text(max_size=30)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=15)
bodies = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                   st.integers(10, 3000).map(lambda d: b"[" * d + b"]" * d),
                   st.sampled_from([b"", b"{", b'{"a": NaN}', b"\xff\xfe", b"null", b'{"x": ' + b"9" * 5000 + b"}"]))


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"]), routes, segments, segments,
       bodies, st.sampled_from(["application/json", "text/plain", "", "multipart/form-data; boundary=x"]),
       st.sampled_from(["none", "bearer", "signed", "spoiled"]), st.integers(0, 2**32))
def test_coordinator_http_fuzz_never_5xx(coordinator, method, route, a, b, body, ctype, auth, seed):
    coord, idents = coordinator
    path = route.format(a=a, b=b)
    headers = {"Content-Type": ctype}
    if auth == "bearer":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif auth != "none":
        rng = random.Random(seed) if auth == "spoiled" else None
        headers |= signed_headers(idents[seed % 2], method, path, body, rng,
                                  with_key=path == "/api/admit")
    status, _ = request(coord, method, path, body, headers)
    assert status < 500, (method, route, a, b, body[:200])


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["admit", "join", "heartbeat", "run_join", "run_sync", "run_report",
                        "inference_offense"]),
       st.dictionaries(st.sampled_from(["invite", "proof", "token_proof", "address", "meta", "stats", "config",
                                        "explicit", "step", "base_hash", "state_hash", "metrics", "offender",
                                        "detail", "x"]),
                       json_values, max_size=4), segments)
def test_coordinator_signed_bodies_with_hostile_fields(coordinator, action, fields, run):
    """Valid signatures over wrong types / missing fields reach the handlers' field checks."""
    coord, idents = coordinator
    ident = idents[0]
    body = {"address": "127.0.0.1:9000", **fields} if action == "join" else fields
    path = {"admit": "/api/admit", "join": "/api/join", "heartbeat": "/api/heartbeat",
            "run_join": f"/api/runs/{run}", "run_sync": f"/api/runs/{run}/sync",
            "run_report": f"/api/runs/{run}/report", "inference_offense": "/api/inference/offenses"}[action]
    status, answer = signed_request(coord, ident, "POST", path, json.dumps(body).encode(),
                                    with_key=action == "admit")
    assert status < 500, (action, body, answer[:300])
    # the signature held: the refusal (if any) came from the handler's own checks
    assert json.loads(answer).get("error") not in ("bad_signature", "missing_signature", "replayed",
                                                   "body_mismatch"), answer[:300]


def test_coordinator_survived_and_wrote_nothing_outside(coordinator):
    """Runs after the fuzz tests above (file order): still serving, clean log, clean disk."""
    coord, _ = coordinator
    assert signed_request(coord, coordinator[1][0], "POST", "/api/join", b"x" * (2 << 20))[0] == 413
    assert request(coord, "GET", "/static/" + "a" * 300)[0] == 404  # was a 500 (ENAMETOOLONG)
    assert request(coord, "GET", "/static/status.js")[0] == 200
    status, answer = request(coord, "GET", "/api/status")
    assert status == 200 and json.loads(answer)["section_errors"] == {}
    assert coord.alive()
    problems, _ = coord.log_problems()
    assert not problems, problems[:3]
    assert filesystem_problems(coord.parent, CANARY, (ROOT,)) == []


# ----------------------------------------------------------------------------- model files

@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile-files")
    write_tiny_gguf(work / "tiny.gguf")
    write_tiny_hf(work / "hf", work / "tiny.gguf")
    return work


FILES = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FILES
@given(st.floats(0, 1), flips, st.booleans())
def test_truncated_or_flipped_gguf_raises_model_load_error(model_files, frac, edits, flip):
    from pipeline.loading import ModelLoadError, load_model

    data = (model_files / "tiny.gguf").read_bytes()
    bad = apply_flips(data[:2048], edits) + data[2048:] if flip else data[:int(frac * (len(data) - 1))]
    path = model_files / "case.gguf"
    path.write_bytes(bad)
    try:
        load_model(path)
    except ModelLoadError:
        pass


@FILES
@given(st.floats(0, 1), json_values, st.sampled_from(["truncate", "config", "header-length"]),
       st.integers(0, 2**64 - 1))
def test_malformed_safetensors_folder_raises_model_load_error(model_files, frac, value, how, header_len):
    from pipeline.loading import ModelLoadError, load_model

    case = model_files / "case-hf"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(model_files / "hf", case)
    weights = (case / "model.safetensors").read_bytes()
    if how == "truncate":
        (case / "model.safetensors").write_bytes(weights[:int(frac * (len(weights) - 1))])
    elif how == "config":
        config = json.loads((case / "config.json").read_text())
        key = sorted(config)[int(frac * (len(config) - 1))]
        (case / "config.json").write_text(json.dumps(value if frac < 0.1 else config | {key: value}))
    else:
        (case / "model.safetensors").write_bytes(header_len.to_bytes(8, "little") + weights[8:])
    try:
        load_model(case)
    except ModelLoadError:
        pass


def test_hostile_gguf_metadata(model_files):
    from pipeline.loading import ModelLoadError, load_model

    for meta in ({"attention.head_count": 0}, {"context_length": 2**40}, {"block_count": 2**31},
                 {"embedding_length": "12"}, {"attention.head_count": 12}, {"vocab_size": 2**63},
                 {"feed_forward_length": None}, {"attention.layer_norm_rms_epsilon": -1.0}):
        write_tiny_gguf(model_files / "meta.gguf", meta)
        with pytest.raises(ModelLoadError):
            load_model(model_files / "meta.gguf")


@pytest.fixture(scope="module")
def stage_server(model_files):
    from pipeline.loading import load_model
    from pipeline.protocol import Span
    from pipeline.server import ServeConfig, StageServer

    model = load_model(model_files / "tiny.gguf")
    return StageServer(None, "tiny", model, Span(0, model.cfg.n_layers), None,
                       ServeConfig(max_sessions=4, max_total_tokens=100))


STEP_KEYS = ["sid", "start", "end", "pos", "chunks", "input", "out", "wire", "capacity", "dtype", "shape"]


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(STEP_KEYS), json_values, max_size=3), st.binary(max_size=64),
       st.booleans(), st.integers(0, 50))
def test_serve_step_hostile_headers(stage_server, edits, payload, keep_payload, sid):
    """What any authenticated peer can send a stage server: only ServingError, limits hold."""
    import numpy as np

    from pipeline.protocol import ServingError

    server = stage_server
    h = {"sid": f"s{sid}", "start": 0, "end": server.cfg.n_layers, "pos": 0, "chunks": [3], "input": "tokens",
         "out": "logits", "wire": "fp32", "capacity": 30, "dtype": "int64", "shape": [1, 3]} | edits
    body = np.array([[1, 2, 3]], dtype=np.int64).tobytes() if keep_payload else payload
    try:
        server._session("peer", server.parse_step(h, body))
    except ServingError:
        pass
    assert len(server.sessions) <= server.config.max_sessions
    assert sum(x.capacity for x in server.sessions.values()) <= server.config.max_total_tokens


# ------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from coordinator.checkpoints import CheckpointStore, LocalBackend, save_state

    parent = tmp_path_factory.mktemp("hostile-ckpt")
    store = CheckpointStore(LocalBackend(parent / "data"), "fuzzrun")
    m = save_state(store, 1, {"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)},
                   chunk_size=64).manifest
    return parent, store, m


@FILES
@given(json_values, st.sampled_from(["tensors", "step", "run", "state_hash", "config", "root", "shape",
                                     "nbytes", "chunks", "dtype"]), st.booleans())
def test_checkpoint_manifest_fuzz(ckpt, value, where, rehash):
    from coordinator.checkpoints import CheckpointError, load_state
    from peer.blobs import Manifest, TensorEntry, state_hash

    parent, store, good = ckpt
    d = good.to_dict() | {"step": 7}
    if where == "root":
        d = value
    elif where in ("shape", "nbytes", "chunks", "dtype"):
        d["tensors"][0][where] = value
    else:
        d[where] = value
    if rehash and isinstance(d, dict):  # a self-consistent hostile manifest
        try:
            d["state_hash"] = state_hash([TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), tuple(t["chunks"]),
                                                      t["nbytes"]) for t in d["tensors"]])
        except Exception:
            pass
    with pytest.raises(CheckpointError) if not isinstance(d, dict) else _maybe_raises(CheckpointError):
        Manifest.from_dict(d)
    try:
        store.put_manifest(7, d)
        tensors, _ = load_state(store, 7)
        assert all(tuple(t.shape) == e.shape for e, t in zip(store.load_manifest(7).tensors, tensors.values()))
        store.delete(7)
    except CheckpointError:
        pass
    assert sorted(p.name for p in parent.iterdir()) == ["data"]


def test_manifest_claiming_more_bytes_than_its_chunks_is_rejected(ckpt):
    from coordinator.checkpoints import ManifestError
    from peer.blobs import MAX_CHUNK_BYTES, TensorEntry, state_hash

    _, store, good = ckpt
    shape = [2 * MAX_CHUNK_BYTES]
    t = {"name": "huge", "dtype": "U8", "shape": shape, "chunks": [good.chunk_shas()[0]], "nbytes": math.prod(shape)}
    d = good.to_dict() | {"step": 9, "tensors": [t]}
    d["state_hash"] = state_hash([TensorEntry("huge", "U8", tuple(shape), tuple(t["chunks"]), t["nbytes"])])
    with pytest.raises(ManifestError, match="cannot hold"):
        store.put_manifest(9, d)


class _maybe_raises:
    """Context manager that accepts either no exception or ``exc``."""

    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, value, tb) -> bool:
        return typ is None or issubclass(typ, self.exc)


# ------------------------------------------------------------------------------ PeerHost TCP

def test_peer_host_drops_garbage_and_keeps_serving(procs):
    from peer.transport import PeerHost

    server = procs.python(str(ROOT / "bench" / "fuzz.py"), "--serve-peer", TOKEN)
    rng = random.Random(7)
    idents = [Identity.generate() for _ in range(2)]
    flights: list[bytes] = []
    run_handshake(idents[0], idents[1], WIRE_TOKEN, WIRE_TOKEN, tamper=lambda k, d: (flights.append(d), d)[1])
    corpus = [encode_frame(Frame(int(FrameType.DATA), h, b"x")) for _, h, _, _ in hostile_session_frames(rng)]

    async def main() -> None:
        kinds = await asyncio.gather(*(tcp_case(server.ready["address"], rng, idents, flights, corpus)
                                       for _ in range(150)))
        assert len(set(kinds)) >= 3
        client = PeerHost(Identity.generate(), TOKEN.encode())
        await client.start("127.0.0.1", 0)
        try:
            assert await legit_check(client, server.ready)
        finally:
            await client.close()

    asyncio.run(main())
    assert server.proc.poll() is None
    bad = [line for line in server.lines if "internal error" in line or "Traceback" in line or " ERROR " in line]
    assert not bad, bad[:5]
    assert any("rejected inbound" in line or "dropping connection" in line for line in server.lines)
