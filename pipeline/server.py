"""Stage server: serves a span of a model's blocks to InferenceClients over the peer mesh, and
the ``serve`` role plug-in behind ``peer join --serve MODEL [--blocks A:B]``.

Sessions (Petals-style, Borzunov et al. 2023): a client opens a session per server span; the
server keeps its KV cache, bounded in count and tokens, expired when idle, and freed on a close
message or when the client's connections are lost. Every step names the position it expects
(``pos``), so replays after a failover land exactly where they should.

Batching, two ways. A session may hold several rows (a client's batch of prompts, left-padded
as in ``pipeline.generate``: the step header's ``pad`` gives each row's padding, so pad slots get
position -1 and every row sees its own positions); its KV cache has one row each. And one worker
runs all forwards, one at a time, in a thread (the event loop keeps heartbeats and I/O going):
each time it is free it takes every queued step, and single-row, single-token steps of different
sessions over the same blocks run as one batched forward (each row attends to its own session's
cache through a padded, masked view); anything else runs alone. So concurrent sessions batch
whenever they arrive while the worker is busy, at no added latency for a lone session (which
runs exactly the single-process code path, hence bit-identical greedy output).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.loading import (ModelLoadError, gemma3_270m_path, gguf_config, hf_config, load_model, open_gguf,
                              reference_model_path)
from pipeline.model import LayerKV, Llama, LlamaConfig, StepContext
from pipeline.protocol import (CLOSE, HEAD_OUTPUTS, INFO, INPUTS, OUTPUTS, STATS_KEY, STEP, TOKENIZER, WIRE_DTYPES,
                               BadRequest, ClientQuotaExceeded, ContextLimitExceeded, ModelNotFound, SessionError, Span,
                               least_covered_span, pack_tensor, parse_serve_argument, unpack_tensor)
from pipeline.quant import check_weights, weight_stats
from pipeline.tokenizer import Tokenizer

log = logging.getLogger("lowband.pipeline.server")

# Credentials that may open sessions (clients; servers re-running a span). Not checked in
# token-only mode, and open admission grants every role: KV shares hold per identity anyway.
CALLER_ROLES = ("client", "serve")

# Gemma 3 270M serves token ids (its SentencePiece tokenizer is not read from GGUF yet).
REFERENCE_MODELS = {"smollm2-135m": reference_model_path, "gemma3-270m": gemma3_270m_path}


def resolve_model(name: str) -> Path:
    """A model name ("smollm2-135m") or a GGUF file / HF folder path -> the local path."""
    if name in REFERENCE_MODELS:
        try:
            return REFERENCE_MODELS[name]()
        except ModelLoadError as e:
            raise ModelNotFound(str(e)) from e
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(sorted(REFERENCE_MODELS))
        raise ModelNotFound(f"unknown model {name!r}: not a known name ({known}) nor an existing GGUF file "
                            f"or HF folder")
    return path


async def model_path(daemon, name: str) -> Path:
    """:func:`resolve_model`, plus ``RUN@latest``: a training run's latest trusted checkpoint as a
    Hugging Face folder, from the ``lowband.model_sources`` plug-in ``run`` (diloco/export.py;
    pipeline/ does not import diloco/)."""
    if "@" not in name or Path(name).expanduser().exists():
        return resolve_model(name)
    from importlib.metadata import entry_points

    found = entry_points(group="lowband.model_sources", name="run")
    if not found:
        raise ModelNotFound(f"{name!r}: serving a run's checkpoint needs the train plug-in (diloco)")
    try:
        return await next(iter(found)).load()(daemon, name)
    except ValueError as e:  # diloco's ExportError: no checkpoint yet, bad name, not a model
        raise ModelNotFound(str(e)) from e


def model_config(path: Path) -> LlamaConfig:
    return hf_config(path) if path.is_dir() else gguf_config(open_gguf(path))


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(path) if path.is_dir() else Tokenizer.from_gguf(path)


def torch_thread() -> ThreadPoolExecutor:
    """One thread for all of a server's torch work (loading and every forward). OpenMP gives
    each thread that runs parallel ops its own worker team, and with more team threads than
    cores libgomp stops spinning between ops and sleeps instead: a 10-block batch-8 decode step
    took 27 ms instead of 21 when the model was loaded in one thread and run in another."""
    return ThreadPoolExecutor(1, thread_name_prefix="lowband-serve")


@dataclass
class ServeConfig:
    """Limits of one stage server. KV slots are reserved when a session opens (capacity x rows)
    and charged to the client that opened it (the peer id its authenticated connection proved):
    one client may hold at most ``max_client_sessions`` sessions and ``max_client_tokens`` slots,
    about a quarter of the server by default, so one client (or one gateway request of many prompts x
    a huge max_tokens) cannot take every slot from the others."""
    max_sessions: int = 64
    max_total_tokens: int = 1 << 16     # KV slots reserved over all sessions
    idle_timeout_s: float = 300.0       # a session untouched this long is freed
    max_batch: int = 16                 # sessions in one batched decode forward
    max_rows: int = 64                  # rows (prompts) of one session
    max_client_sessions: int | None = None  # per client; None: a quarter of max_sessions, at least 4
    max_client_tokens: int | None = None    # per client; None: max_total_tokens // 4
    device: str = "cpu"
    weights: str = "fp32"               # fp32 | bf16 | q8 | q4: how the weights are held (pipeline/quant.py)

    def __post_init__(self) -> None:
        check_weights(self.weights)
        if self.max_client_sessions is None:
            self.max_client_sessions = min(self.max_sessions, max(4, self.max_sessions // 4))
        if self.max_client_tokens is None:
            self.max_client_tokens = max(1, self.max_total_tokens // 4)
        if min(self.max_sessions, self.max_total_tokens, self.max_batch, self.max_rows, self.max_client_sessions,
               self.max_client_tokens) < 1 or self.idle_timeout_s <= 0:
            raise ValueError("serve limits must be positive")


@dataclass
class Session:
    start: int
    end: int
    capacity: int
    cache: Any                          # KVCache of blocks [start, end) (or a shard's cache)
    pad: tuple[int, ...] = (0,)         # left padding of each row
    last_used: float = field(default_factory=time.monotonic)

    @property
    def slots(self) -> int:
        """KV slots reserved: capacity per row."""
        return self.capacity * len(self.pad)

    @property
    def length(self) -> int:
        return self.cache.layers[self.start].length


@dataclass
class StepRequest:
    sid: str
    start: int
    end: int
    pos: int
    chunks: list[int]
    input: str
    out: str
    wire: str
    capacity: int
    pad: tuple[int, ...]                # left padding of each row (one entry per row)
    x: Tensor                           # [B, T] ids or [B, T, dim] hidden states


@dataclass
class _Job:
    peer_id: str
    req: StepRequest
    session: Session
    future: asyncio.Future


class _StackedKV:
    """Duck-types ``LayerKV.append`` for a batch whose rows are different sessions' caches:
    appends each row to its own cache and returns keys/values zero-padded to the longest row
    (the batch mask hides the padding)."""

    def __init__(self, rows: list[LayerKV]):
        self.rows = rows

    def append(self, k: Tensor, v: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        got = [row.append(k[r:r + 1], v[r:r + 1], max_len) for r, row in enumerate(self.rows)]
        width = max(kk.shape[2] for kk, _ in got)
        pad = [(0, 0, 0, width - kk.shape[2]) for kk, _ in got]
        return (torch.cat([F.pad(kk, p) for (kk, _), p in zip(got, pad)]),
                torch.cat([F.pad(vv, p) for (_, vv), p in zip(got, pad)]))


def _run_blocks(model: Llama, h: Tensor, start: int, end: int, cache, positions: Tensor | None = None,
                ctx: StepContext | None = None, kv_of: Callable[[int], Any] | None = None,
                all_reduce=None) -> Tensor:
    """``Llama.run_blocks`` with two extension points: a ready-made context and per-layer KV
    objects (batched decode), and an all-reduce between shards (tensor split)."""
    if ctx is None and all_reduce is None:
        return model.run_blocks(h, start, end, cache, positions)
    if ctx is None:
        ctx = model.context(h, positions, cache, cache.layers[start].length)
    for i in range(start, end):
        kv = kv_of(i) if kv_of is not None else cache.layers[i]
        h = model.blocks[str(i)](h, ctx, kv, all_reduce=all_reduce)
    return h


class StageServer:
    """Serves blocks ``span`` of ``model`` (a ``Llama`` holding them) on ``host``.

    ``model`` may also be a tensor-split shard (``pipeline.tensor_split``): the group's leader
    sets ``split`` (which runs each step across the group) and the other shards use
    ``make_job`` / ``compute_one`` / ``free`` directly.
    """

    def __init__(self, host, name: str, model: Llama, span: Span, model_path: Path | None,
                 config: ServeConfig | None = None, extra_info: dict | None = None,
                 on_change: Callable[[dict], None] | None = None, executor: ThreadPoolExecutor | None = None):
        self.host, self.name, self.model, self.span = host, name, model, span
        self.cfg = model.cfg
        self.model_path = model_path    # where the tokenizer is read from, on first request
        self.tokenizer: Tokenizer | None = None
        self.config = config or ServeConfig()
        self.extra_info = extra_info or {}
        self.on_change = on_change
        self.sessions: dict[tuple[str, str, int], Session] = {}
        self.split: Any = None          # TensorSplitLeader of a tensor-split group's leader
        self.split_pending = False      # a leader whose group is not formed yet refuses steps
        self.on_free: Callable[[str, str | None], None] | None = None  # (owner, sid or None = all)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._tokens = 0
        self._busy_s = 0.0
        self.batches = 0                # forwards that batched >1 session (observability, tests)
        self.executor = executor or torch_thread()
        self.params, self.weight_bytes = weight_stats(model)  # as held: quantized codes and scales count

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, client_facing: bool = True) -> None:
        """Register the handlers and start the worker; a tensor-split follower is not
        client-facing (it takes steps from its leader only)."""
        if client_facing:
            self.host.handle(STEP, self._on_step, CALLER_ROLES)
            self.host.handle(CLOSE, self._on_close, CALLER_ROLES)
            self.host.handle(TOKENIZER, self._on_tokenizer, CALLER_ROLES)
        self.host.handle(INFO, self._on_info)
        self.host.on_peer_lost(self._on_peer_lost)
        self._tasks = [asyncio.create_task(self._worker()), asyncio.create_task(self._expiry())]
        self._changed()

    async def run_torch(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` on this server's torch thread (see ``torch_thread``)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def spawn(self, coro) -> None:
        """Run a background coroutine owned by this server (cancelled on stop; errors logged)."""
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %s", task.exception())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.executor.shutdown(wait=False)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(SessionError("server stopping"))
        self.sessions.clear()

    def announcement(self) -> dict:
        """What heartbeats carry in stats["serve"] (clients route on it; status pages map coverage)."""
        return {"model": self.name, "blocks": [self.span.start, self.span.end], "n_layers": self.cfg.n_layers,
                "max_seq_len": self.cfg.max_seq_len, "vocab_size": self.cfg.vocab_size,
                "sessions": len({(p, s) for p, s, _ in self.sessions}),
                "tokens_per_s": round(self._tokens / self._busy_s, 2) if self._busy_s else None,
                "wire": sorted(WIRE_DTYPES), "batches": self.batches, "params": self.params,
                "weight_bytes": self.weight_bytes, "weights": self.config.weights, **self.extra_info}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.announcement())

    # -- handlers ----------------------------------------------------------------------------
    async def _on_info(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        return self.announcement(), b""

    async def _on_tokenizer(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        if self.tokenizer is None:
            if self.model_path is None:
                raise ModelNotFound(f"this server of {self.name} has no tokenizer")
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_path)
        tok = self.tokenizer
        return ({"eos_id": tok.eos_id, "bos_id": tok.bos_id, "add_bos": tok.add_bos,
                 "chat_template": tok.chat_template or ""}, tok._tk.to_str().encode("utf-8"))

    async def _on_close(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        sid = header.get("sid")
        if not isinstance(sid, str):
            raise BadRequest("close needs a session id 'sid'")
        return {"freed": self.free(peer_id, sid)}, b""

    def free(self, owner: str, sid: str | None) -> int:
        """Drop ``owner``'s session ``sid`` (every span of it), or all its sessions when None."""
        gone = [k for k in self.sessions if k[0] == owner and (sid is None or k[1] == sid)]
        for k in gone:
            del self.sessions[k]
        if gone:
            if self.on_free is not None:
                self.on_free(owner, sid)
            self._changed()
        return len(gone)

    def _on_peer_lost(self, peer_id: str) -> None:
        n = self.free(peer_id, None)
        if n:
            log.info("freed %d sessions of lost client %s", n, peer_id[:12])

    async def _on_step(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        if self.split_pending and self.split is None:
            raise SessionError("this tensor-split group is still forming")
        job = self.make_job(peer_id, self.parse_step(header, payload))
        await self._queue.put(job)
        return await job.future

    def make_job(self, owner: str, req: StepRequest) -> _Job:
        return _Job(owner, req, self._session(owner, req), asyncio.get_running_loop().create_future())

    # -- requests and sessions ---------------------------------------------------------------
    def parse_step(self, h: dict, payload: bytes) -> StepRequest:
        """Validate a step header + payload against this server; BadRequest / ContextLimitExceeded."""
        def num(key: str, lo: int = 0) -> int:
            v = h.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise BadRequest(f"step header {key!r} must be an int >= {lo}, got {v!r}")
            return v

        sid = h.get("sid")
        if not isinstance(sid, str) or not 0 < len(sid) <= 64:
            raise BadRequest("step header 'sid' must be a non-empty string of <= 64 chars")
        start, end, pos, capacity = num("start"), num("end", 1), num("pos"), num("capacity", 1)
        if not (self.span.start <= start < end <= self.span.end):
            raise BadRequest(f"blocks {start}:{end} are not inside this server's span {self.span}")
        chunks = h.get("chunks")
        if not (isinstance(chunks, list) and chunks and all(isinstance(c, int) and c > 0 for c in chunks)):
            raise BadRequest("step header 'chunks' must be a non-empty list of positive ints")
        kind, out, wire = h.get("input"), h.get("out"), h.get("wire", "fp32")
        if kind not in INPUTS or out not in OUTPUTS or not isinstance(wire, str) or wire not in WIRE_DTYPES:
            raise BadRequest(f"step needs input in {INPUTS}, out in {OUTPUTS}, wire in {sorted(WIRE_DTYPES)}")
        if out in HEAD_OUTPUTS and end != self.cfg.n_layers:
            raise BadRequest(f"{out} come from the last block's server")
        pad = h.get("pad", [0])
        if not (isinstance(pad, list) and 0 < len(pad) <= self.config.max_rows
                and all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < capacity for p in pad)):
            raise BadRequest(f"step header 'pad' must list 1..{self.config.max_rows} row paddings in [0, capacity)")
        x = unpack_tensor(h, payload)
        t, b = sum(chunks), len(pad)
        if kind == "tokens":
            if start != 0 or not self.model.with_embed:
                raise BadRequest("token ids go to the server of block 0 (it holds the embedding)")
            if x.dtype != torch.int64 or tuple(x.shape) != (b, t):
                raise BadRequest(f"token input must be int64 [{b}, {t}], got {x.dtype} {list(x.shape)}")
            if t and not (0 <= int(x.min()) and int(x.max()) < self.cfg.vocab_size):
                raise BadRequest(f"token ids must lie in [0, {self.cfg.vocab_size})")
        elif x.dtype == torch.int64 or tuple(x.shape) != (b, t, self.cfg.dim):
            raise BadRequest(f"hidden input must be float [{b}, {t}, {self.cfg.dim}], got {x.dtype} "
                             f"{list(x.shape)}")
        if pos + t > self.cfg.max_seq_len or capacity > self.cfg.max_seq_len:
            raise ContextLimitExceeded(f"{pos + t} tokens exceed the context limit of {self.cfg.max_seq_len}")
        return StepRequest(sid, start, end, pos, chunks, kind, out, wire, capacity, tuple(pad),
                           x.to(self.config.device))

    def _session(self, peer_id: str, req: StepRequest) -> Session:
        key = (peer_id, req.sid, req.start)
        s = self.sessions.get(key)
        if req.pos == 0:
            if s is not None:  # a client restarting its session from scratch
                del self.sessions[key]
            self._reserve(peer_id, req.capacity * len(req.pad))
            s = Session(req.start, req.end, req.capacity, self.new_cache(req), req.pad)
            self.sessions[key] = s
            self._changed()
        elif s is None:
            raise SessionError(f"unknown session {req.sid!r} (expired, closed or never opened)")
        elif s.end != req.end or s.length != req.pos or s.pad != req.pad:
            raise SessionError(f"session {req.sid!r} holds blocks {s.start}:{s.end} at position {s.length} "
                               f"({len(s.pad)} rows), step asks for {req.start}:{req.end} at {req.pos} "
                               f"({len(req.pad)} rows)")
        # The reservation is the bound: a session never grows past the capacity it opened with.
        if req.pos + sum(req.chunks) > s.capacity:
            raise BadRequest(f"session {req.sid!r} reserved {s.capacity} positions; step would reach "
                             f"{req.pos + sum(req.chunks)}")
        s.last_used = time.monotonic()
        return s

    def _reserve(self, owner: str, slots: int) -> None:
        """Refuse a new session of ``slots`` KV slots beyond the server's or ``owner``'s share."""
        cfg = self.config
        if slots > cfg.max_client_tokens:
            raise ClientQuotaExceeded(f"client quota: a session of {slots} KV slots is more than one client may "
                                      f"hold on this server ({cfg.max_client_tokens} slots)")
        reserved = sum(x.slots for x in self.sessions.values())
        if len(self.sessions) >= cfg.max_sessions or reserved + slots > cfg.max_total_tokens:
            raise SessionError(f"server full ({len(self.sessions)} sessions, {reserved} KV slots reserved)")
        mine = [x for k, x in self.sessions.items() if k[0] == owner]
        held = sum(x.slots for x in mine)
        if len(mine) >= cfg.max_client_sessions or held + slots > cfg.max_client_tokens:
            raise ClientQuotaExceeded(
                f"client quota: {len(mine)} sessions and {held} KV slots held, a new session of {slots} slots "
                f"exceeds this client's share ({cfg.max_client_sessions} sessions, {cfg.max_client_tokens} slots)")

    def new_cache(self, req: StepRequest):
        cache = self.model.new_cache(len(req.pad), capacity=req.capacity)
        cache.layers = {i: cache.layers[i] for i in range(req.start, req.end)}
        return cache

    async def _expiry(self) -> None:
        period = min(self.config.idle_timeout_s / 4, 5.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            old = [k for k, s in self.sessions.items() if now - s.last_used > self.config.idle_timeout_s]
            for k in old:
                del self.sessions[k]
            if old:
                log.info("expired %d idle sessions", len(old))
            self._changed()

    # -- compute -----------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            for group in self._groups(jobs):
                t0 = time.perf_counter()
                try:
                    results = [await self.split.run(group[0])] if self.split is not None else \
                        await self.run_torch(self._compute, group)
                except Exception as e:  # reported to each caller as RemoteError with the type name
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                busy = time.perf_counter() - t0
                self._busy_s += busy
                self._tokens += sum(sum(j.req.chunks) for j in group)
                for job, res in zip(group, results):
                    job.session.last_used = time.monotonic()
                    res[0]["compute_ms"] = busy * 1e3  # the forward this step shared (observability)
                    if not job.future.done():
                        job.future.set_result(res)

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Single-token steps with the same shape of work batch together (different sessions)."""
        groups: dict[tuple, list[_Job]] = {}
        singles: list[list[_Job]] = []
        for job in jobs:
            r = job.req
            if r.chunks == [1] and len(r.pad) == 1 and self.split is None:
                key = (r.start, r.end, r.input, r.out, r.wire)
                group = groups.setdefault(key, [])
                if len(group) < self.config.max_batch and all(j.session is not job.session for j in group):
                    group.append(job)
                    continue
            singles.append([job])
        return [*groups.values(), *singles]

    @torch.inference_mode()
    def _compute(self, group: list[_Job]) -> list[tuple[dict, bytes]]:
        if len(group) == 1:
            return [self.compute_one(group[0])]
        self.batches += 1
        return self._compute_batch(group)

    @torch.inference_mode()
    def compute_one(self, job: _Job, all_reduce=None) -> tuple[dict, bytes]:
        """Run one step's chunks in order; ``all_reduce`` sums a tensor-split group's partials
        (embedding, each block's attention and MLP, head)."""
        r, m, x = job.req, self.model, job.req.x
        # Rows of a batch (or a padded row) need explicit positions; a lone unpadded row takes
        # the single-process path (positions = slots).
        pad = None if r.pad == (0,) else torch.tensor(r.pad, device=x.device)[:, None]
        outs, off = [], 0
        for t in r.chunks:
            part = x[:, off:off + t]
            off += t
            if part.dtype != torch.int64:
                h = part.to(m.rope_cos.dtype)
            else:
                h = m.embed(part) if all_reduce is None else all_reduce(m.embed(part))
            positions = None
            if pad is not None:
                slot = job.session.length
                positions = (torch.arange(slot, slot + t, device=x.device)[None] - pad).clamp_min(-1)
            outs.append(_run_blocks(m, h, r.start, r.end, job.session.cache, positions, all_reduce=all_reduce))
        return self._reply(r, torch.cat(outs, dim=1), job.session.length, all_reduce)

    def _compute_batch(self, group: list[_Job]) -> list[tuple[dict, bytes]]:
        m, r0 = self.model, group[0].req
        x = torch.cat([j.req.x for j in group])
        h = m.embed(x) if r0.input == "tokens" else x.to(m.rope_cos.dtype)
        caches = [j.session.cache for j in group]
        slots = [c.layers[r0.start].length for c in caches]
        positions = torch.tensor(slots, device=h.device)[:, None]
        for c, p in zip(caches, positions):
            c.context(int(p), p[None])  # records each row's position in its own cache
        width = max(slots) + 1
        keys = torch.arange(width, device=h.device)[None, :].expand(len(group), width)
        # Slots beyond a row's own length are other rows' padding: key position -1 (masked).
        keys = keys.masked_fill(keys > positions, -1)
        ctx = m.step_context(positions, (keys >= 0)[:, None, None, :], False, keys, h.dtype)
        h = _run_blocks(m, h, r0.start, r0.end, None, ctx=ctx,
                        kv_of=lambda i: _StackedKV([c.layers[i] for c in caches]))
        return [self._reply(j.req, h[row:row + 1], j.session.length) for row, j in enumerate(group)]

    def _reply(self, r: StepRequest, h: Tensor, length: int, all_reduce=None) -> tuple[dict, bytes]:
        if r.out == "none":
            return {"length": length}, b""
        if r.out in HEAD_OUTPUTS:
            logits = self.model.head(h[:, -1])
            logits = (logits if all_reduce is None else all_reduce(logits)).float()
            meta, raw = pack_tensor(logits if r.out == "logits" else logits.argmax(dim=-1))
        else:
            meta, raw = pack_tensor(h, WIRE_DTYPES[r.wire])
        return {**meta, "length": length}, raw


# ---------------------------------------------------------------------------------- the role
class ServeRole:
    """``peer join --serve MODEL[,tp=GROUP:RANK/K][@A:B|@N]``: load blocks A..B-1 (or N blocks
    where the swarm has the least coverage; default: every block) and serve them; announce the
    span, session count and measured tokens/s in heartbeat stats["serve"]. With ``tp=``, this
    peer is shard RANK of a K-way tensor-split group serving the span as one stage: rank 0
    faces clients once it has found the other K-1 shards' announcements."""

    def __init__(self, argument: str, config: ServeConfig | dict | None = None):
        """``config``: a ServeConfig, or the parsed `peer join` serve options
        (``pipeline.serve_options``; the device is the daemon's)."""
        from pipeline.serve_options import config_values

        self.spec = parse_serve_argument(argument)
        self.config = config if isinstance(config, ServeConfig) or config is None else None
        self.limits = config_values(config) if isinstance(config, dict) else {}
        if self.limits:
            ServeConfig(**self.limits)  # a bad value fails here, at start, with a clear ValueError
        self.server: StageServer | None = None

    async def start(self, daemon) -> None:
        spec = self.spec
        path = await model_path(daemon, spec.model)
        # An explicit span loads at once (opening a GGUF costs seconds); otherwise read the
        # shape first to place the span.
        span = spec.blocks if isinstance(spec.blocks, Span) else \
            await self._choose_span(daemon, await asyncio.to_thread(model_config, path))
        config = self.config or ServeConfig(device=daemon.device, **self.limits)
        executor = torch_thread()
        loop = asyncio.get_running_loop()
        try:
            if spec.tp is None:
                model = await loop.run_in_executor(executor, functools.partial(
                    load_model, path, range(span.start, span.end), device=config.device, weights=config.weights))
            elif config.weights != "fp32":
                raise BadRequest("a tensor-split shard holds fp32 weights only (drop --serve-weights)")
            else:
                from pipeline.tensor_split import load_shard
                model = await loop.run_in_executor(executor, load_shard, path, span, spec.tp, config.device)
        except ValueError as e:  # blocks outside the model, K not dividing the heads
            raise BadRequest(f"cannot serve blocks {span} of {spec.model}: {e}") from e
        extra = {} if spec.tp is None else {"tp": {"group": spec.tp.group, "rank": spec.tp.rank, "k": spec.tp.k},
                                            "serving": False}
        self.server = StageServer(daemon.host, spec.model, model, span, path, config, extra,
                                  on_change=lambda info: daemon.report(STATS_KEY, info), executor=executor)
        if spec.tp is None:
            await self.server.start()
        elif spec.tp.rank == 0:
            self.server.split_pending = True
            await self.server.start()
            self.server.spawn(self._form_group(daemon))
        else:
            from pipeline.tensor_split import TensorSplitFollower, named_group

            async def lookup():
                return named_group(await daemon.client.peers(), spec.tp, spec.model, span, daemon.peer_id)

            await self.server.start(client_facing=False)
            TensorSplitFollower(self.server, lookup).install()
        log.info("serving %s blocks %s%s", spec.model, span, f" as tensor shard {spec.tp}" if spec.tp else "")

    async def _form_group(self, daemon) -> None:
        """Leader: wait for the group's other shards to announce the same model and span."""
        from pipeline.tensor_split import TensorSplitLeader, group_ranks

        tp, server = self.spec.tp, self.server
        warned = False
        while True:
            found: dict[int, str] = {}
            try:
                peers = await daemon.client.peers()
                address = {p.peer_id: p.address for p in peers}
                for rank, (peer_id, _) in group_ranks(peers, tp, self.spec.model, server.span).items():
                    found[rank] = peer_id
                    if peer_id not in daemon.routes:  # keep the daemon's route (a NATed shard's relays)
                        daemon.host.add_route(peer_id, address[peer_id])
            except Exception as e:  # coordinator away: keep waiting
                log.debug("tensor-split discovery: %s", e)
            followers = [found.get(r) for r in range(1, tp.k)]
            if found.get(0) not in (None, daemon.peer_id):
                if not warned:
                    log.warning("tensor-split group %s: rank 0 is held by %s, which joined first; not leading",
                                tp.group, found[0][:12])
                warned = True
            elif all(followers):
                server.split = TensorSplitLeader(server, followers)
                server.extra_info["serving"] = True
                server.extra_info["tp"]["members"] = server.split.members
                server._changed()
                log.info("tensor-split group %s formed: %s", tp.group, [m[:12] for m in server.split.members])
                return
            await asyncio.sleep(0.5)

    async def _choose_span(self, daemon, cfg: LlamaConfig) -> Span:
        length = cfg.n_layers if self.spec.blocks is None else self.spec.blocks
        coverage = [0] * cfg.n_layers
        try:
            peers = await daemon.client.peers()
        except Exception as e:  # no coverage map: still serve, from block 0
            log.warning("cannot read coverage from the coordinator (%s); placing blocks at 0", e)
            peers = []
        for p in peers:
            info = p.stats.get(STATS_KEY) if isinstance(p.stats, dict) else None
            if p.peer_id != daemon.peer_id and isinstance(info, dict) and info.get("model") == self.spec.model:
                a, b = info.get("blocks", [0, 0])
                for i in range(max(0, a), min(b, cfg.n_layers)):
                    coverage[i] += 1
        return least_covered_span(coverage, length)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
