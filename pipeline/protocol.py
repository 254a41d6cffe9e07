"""Messages between an InferenceClient and stage servers, carried by ``PeerHost.call``.

Tensors travel as raw bytes in the payload; the header names dtype and shape (docs/architecture.md §Wire layers).
Methods:

- ``serve.step``: run chunks of a session through blocks [start, end) of one server.
  Header: ``sid`` (client-chosen session id), ``start``/``end``, ``pos`` (tokens the session
  must already hold: a mismatch is an error, so a replay never lands at the wrong position),
  ``chunks`` (token count of each chunk, run one after another exactly as they were first
  sent — replaying a history this way is bit-identical to the original run), ``input``
  ("tokens": int64 ids, needs the embedding; "hidden": activations), ``dtype``/``shape`` of the
  payload, ``out`` ("hidden": every position's output in ``wire``; "logits": fp32 logits of the
  last position; "none": only build the KV cache), ``wire`` (activation dtype of the reply),
  ``capacity`` (KV slots to reserve when the session is opened).
  Reply: ``dtype``, ``shape``, ``length`` (tokens held after the step).
- ``serve.close``: ``sid`` -> frees the session's KV caches (every span of it on this server).
- ``serve.info``: -> what the server announces plus its live session count.
- ``serve.tokenizer``: -> the model's tokenizer (``tokenizer.json`` text in the payload).
- ``serve.tp_step`` / ``serve.tp_close``: a tensor-split group's leader hands a step (input
  already embedded; plus ``owner``, ``members``, ``nonce``, ``seq`` naming the all-reduces) or
  a session release to the group's other shards (``pipeline.tensor_split``).

Activations default to fp32 on the wire: that is what makes a pipelined greedy run identical
to a single-process one. fp16/bf16 halve the bytes and may change late digits of the logits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from peer.errors import LowbandError

STEP, CLOSE, INFO, TOKENIZER = "serve.step", "serve.close", "serve.info", "serve.tokenizer"
TP_STEP, TP_CLOSE = "serve.tp_step", "serve.tp_close"  # tensor-split leader -> its shard peers
STATS_KEY = "serve"  # daemon.report(STATS_KEY, announcement) -> heartbeat stats["serve"]

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PAYLOAD_DTYPES: dict[str, torch.dtype] = {**WIRE_DTYPES, "int64": torch.int64}
_NAMES = {v: k for k, v in _PAYLOAD_DTYPES.items()}
# Outputs: hidden states (to the next stage), the last position's fp32 logits, its argmax token
# ids (greedy decoding: B ids instead of B x vocab floats), or nothing (a replay's last stage).
INPUTS, OUTPUTS = ("tokens", "hidden"), ("hidden", "logits", "argmax", "none")
HEAD_OUTPUTS = ("logits", "argmax")


class ServingError(LowbandError):
    """Base of serving errors a caller can act on."""


class ModelNotFound(ServingError):
    """No server announces the requested model (or a server cannot find its file)."""


class NoRoute(ServingError):
    """The live servers of a model do not cover every block."""


class ContextLimitExceeded(ServingError, ValueError):
    """Prompt plus new tokens exceed the model's context length."""


class SessionError(ServingError):
    """A server cannot serve a session step (unknown session, wrong position, full)."""


class ClientQuotaExceeded(SessionError):
    """A new session would exceed the KV share a server grants one client."""


class BadRequest(ServingError, ValueError):
    """A request's header or payload is malformed."""


def pack_tensor(t: Tensor, dtype: torch.dtype | None = None) -> tuple[dict, bytes]:
    """(header fields, raw bytes) of ``t`` cast to ``dtype``; moves to CPU only to hit the wire."""
    t = t.detach().to(dtype or t.dtype)
    if t.dtype not in _NAMES:
        raise BadRequest(f"cannot send dtype {t.dtype}")
    raw = t.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return {"dtype": _NAMES[t.dtype], "shape": list(t.shape)}, raw


def unpack_tensor(header: dict, payload: bytes | bytearray, device: torch.device | str = "cpu") -> Tensor:
    """The tensor described by header ``dtype``/``shape`` from raw ``payload``; typed errors."""
    name, shape = header.get("dtype"), header.get("shape")
    dtype = _PAYLOAD_DTYPES.get(name) if isinstance(name, str) else None  # a list/dict is unhashable
    if dtype is None:
        raise BadRequest(f"unknown tensor dtype {name!r:.100}")
    if not (isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
        raise BadRequest(f"bad tensor shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(payload) != numel * itemsize:
        raise BadRequest(f"payload has {len(payload)} bytes, shape {shape} of {header['dtype']} needs "
                         f"{numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = payload if isinstance(payload, bytearray) else bytearray(payload)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape).to(device)


@dataclass(frozen=True)
class Span:
    """Blocks [start, end) of a model."""
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad block span {self.start}:{self.end} (need 0 <= start < end)")

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True)
class TensorSplitSpec:
    """Membership of a tensor-split group: shard ``rank`` of ``k`` in group ``group``."""
    group: str
    rank: int
    k: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.k:
            raise ValueError(f"tensor-split rank {self.rank} must lie in [0, {self.k})")


@dataclass(frozen=True)
class ServeSpec:
    model: str
    blocks: Span | int | None = None    # a span, a block count, or None (every block)
    tp: TensorSplitSpec | None = None


def parse_serve_argument(argument: str) -> ServeSpec:
    """``peer join --serve`` argument: ``MODEL``, then optionally ``,tp=GROUP:RANK/K`` (this peer
    is shard RANK of K of tensor-split group GROUP; rank 0 leads and faces clients), then
    optionally ``@A:B`` (blocks A..B-1) or ``@N`` (N blocks placed where the swarm has the least
    coverage). ``peer join --blocks A:B`` appends the ``@A:B`` part."""
    rest, at, blocks = argument.rpartition("@")
    if not at or blocks == "latest":  # RUN@latest: a training run's latest checkpoint is the model
        rest, blocks = argument, ""
    tp = None
    if m := re.fullmatch(r"(.*),tp=([\w.-]+):(\d+)/(\d+)", rest):
        rest, tp = m[1], TensorSplitSpec(m[2], int(m[3]), int(m[4]))
    if not rest:
        raise ValueError(f"--serve needs a model name or path, got {argument!r}")
    if not blocks:
        return ServeSpec(rest, None, tp)
    if m := re.fullmatch(r"(\d+):(\d+)", blocks):
        return ServeSpec(rest, Span(int(m[1]), int(m[2])), tp)
    if re.fullmatch(r"\d+", blocks) and int(blocks) > 0:
        return ServeSpec(rest, int(blocks), tp)
    raise ValueError(f"blocks must look like A:B (or a block count N), got {blocks!r}")


def least_covered_span(coverage: list[int], length: int) -> Span:
    """The window of ``length`` blocks whose busiest block has the fewest servers (ties: the
    smallest total coverage, then the earliest start) — new servers fill gaps first."""
    n = len(coverage)
    length = max(1, min(length, n))
    best = min(range(n - length + 1),
               key=lambda a: (max(coverage[a:a + length]), sum(coverage[a:a + length]), a))
    return Span(best, best + length)
