"""The OpenAI request bodies the gateway accepts, parsed into one typed ``CompletionRequest``
(sans-IO: no aiohttp, no torch).

Every top-level parameter of ``/v1/chat/completions`` and ``/v1/completions`` is in one of four
groups (``HONOURED``, ``IGNORED``, ``DEFAULT_ONLY``, anything else):

- honoured: ``model``, ``messages`` / ``prompt``, ``max_tokens`` / ``max_completion_tokens``
  (null or absent: the gateway's default, the remaining context; see pipeline/gateway.py),
  ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``stream``, ``stream_options``
  (``include_usage``), and for completions ``best_of`` equal to ``n``;
- accepted and ignored, because they do not change the answer: ``user``, ``metadata``,
  ``store``, ``service_tier``, ``prompt_cache_key``, ``safety_identifier``;
- accepted only at their default value (or null), else a 400 naming the parameter with code
  ``unsupported_parameter``: ``logprobs``, ``top_logprobs`` (the greedy path never sees
  logits, so they cannot be exact), penalties, ``logit_bias``, tools and functions,
  ``response_format`` other than text, ``echo``, ``suffix``, ``modalities`` other than text ...;
- anything else: 400 "Unrecognized request argument supplied: NAME", as OpenAI answers.

Chat ``content`` is a string or a list of parts; text parts are joined with "\\n" (as vLLM
does), any other part type (images, audio, files) is a 400 naming ``messages[i].content[j]``.
Completions ``prompt`` is a string or a list of strings (token-id prompts are refused).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_N = 128                 # OpenAI's own limit on n
MAX_STOPS = 16              # OpenAI takes 4; more costs nothing here
MAX_STOP_CHARS = 256
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes

HONOURED = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
                      "stream", "stream_options"})
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# name -> values that mean "not used" (None always does)
DEFAULT_ONLY: dict[str, tuple] = {
    "logprobs": (False, 0), "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (), "verbosity": (),
    "echo": (False,), "suffix": ("",),
}
CHAT_ONLY = frozenset({"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                       "function_call", "parallel_tool_calls", "response_format", "modalities", "audio",
                       "prediction", "reasoning_effort", "web_search_options", "verbosity", "store", "metadata",
                       "service_tier", "prompt_cache_key", "safety_identifier"})
TEXT_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})
MESSAGE_KEYS = frozenset({"role", "content", "name"})


class BadParam(ValueError):
    """A request the gateway answers with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class CompletionRequest:
    """One validated request. ``prompts``: one message list for a chat, the prompt strings for a
    completion; each is answered ``n`` times, choice index = prompt index x n + j."""
    chat: bool
    model: str
    prompts: tuple
    n: int
    max_tokens: int | None      # None: the gateway's default (the remaining context, clamped)
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def rows(self) -> int:
        """Sequences generated: one batched session row each."""
        return len(self.prompts) * self.n


def _integer(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise BadParam(f"'{key}' must be an integer {span}, got {v!r}", key)
    return v


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise BadParam(f"'{key}' must be a number in [{lo:g}, {hi:g}], got {v!r}", key)
    return float(v)


def _same(value: Any, default: Any) -> bool:
    """``value`` equals ``default`` as JSON means it (0 == 0.0, but false is not 0)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def _check_names(body: dict, chat: bool) -> None:
    other = TEXT_ONLY if chat else CHAT_ONLY
    for key, value in body.items():
        known = key in HONOURED or key in IGNORED or key in DEFAULT_ONLY or key in (CHAT_ONLY | TEXT_ONLY)
        if not known or key in other:
            raise BadParam(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
        if key in DEFAULT_ONLY and value is not None and not any(_same(value, d) for d in DEFAULT_ONLY[key]):
            raise BadParam(f"'{key}' is not supported by this gateway (send it unset or at its default; "
                           f"got {value!r})", key, "unsupported_parameter")


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadParam("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise BadParam(f"'stop' takes at most {MAX_STOPS} sequences of 1..{MAX_STOP_CHARS} characters", "stop")
    return tuple(dict.fromkeys(stops))


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise BadParam(f"'{where}' must be a string or a non-empty list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadParam(f"'{here}' must be an object with a 'type'", here)
        if part["type"] != "text":
            raise BadParam(f"'{here}' is a {part['type']!r} part; this gateway serves text models and takes "
                           f"only 'text' parts", here, "unsupported_content")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise BadParam(f"'{here}' must be {{'type': 'text', 'text': str}}", here)
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadParam("'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise BadParam(f"'{where}' must be an object with a string 'role'", where)
        extra = sorted(k for k, v in m.items() if k not in MESSAGE_KEYS and v is not None)
        if extra:
            raise BadParam(f"'{where}' has {extra[0]!r}, which this gateway does not support (no tools or "
                           f"audio)", f"{where}.{extra[0]}", "unsupported_parameter")
        if m["role"] in ("tool", "function"):
            raise BadParam(f"'{where}' has role {m['role']!r}; this gateway does not support tools", where,
                           "unsupported_parameter")
        msg = {"role": m["role"], "content": _content(m.get("content"), f"{where}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise BadParam(f"'{where}.name' must be a string", f"{where}.name")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _prompts(value: Any) -> tuple[str, ...]:
    prompts = [value] if isinstance(value, str) else value
    if isinstance(prompts, list) and prompts and all(isinstance(p, int) and not isinstance(p, bool)
                                                     or isinstance(p, list) for p in prompts):
        raise BadParam("token-id prompts are not supported; send the prompt as text", "prompt",
                       "unsupported_parameter")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise BadParam("'prompt' must be a non-empty string or a non-empty list of them", "prompt")
    return tuple(prompts)


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """The body of a chat (``chat``) or completions request, validated; ``BadParam`` otherwise."""
    if not isinstance(body, dict):
        raise BadParam("the request body must be a JSON object")
    _check_names(body, chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadParam("'model' is required", "model")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, 1)
    n = _integer(body, "n", 1, MAX_N) or 1
    if not chat and body.get("best_of") not in (None, n):
        raise BadParam(f"'best_of' must equal n ({n}): this gateway returns every sequence it generates",
                       "best_of", "unsupported_parameter")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not SEED_RANGE[0] <= seed < SEED_RANGE[1]):
        raise BadParam(f"'seed' must be a 64-bit integer, got {seed!r}", "seed")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadParam("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadParam("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"} or not all(
                isinstance(v, bool) or v is None for v in options.values()):
            raise BadParam("'stream_options' takes {'include_usage': bool}", "stream_options")
        include_usage = bool(options.get("include_usage"))
    prompts = (_messages(body.get("messages")),) if chat else _prompts(body.get("prompt"))
    return CompletionRequest(chat=chat, model=model, prompts=prompts, n=n, max_tokens=max_tokens,
                             temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                             top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=seed,
                             stop=_stops(body.get("stop")), stream=bool(stream), include_usage=include_usage)
