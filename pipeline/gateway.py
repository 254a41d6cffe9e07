"""OpenAI-compatible HTTP gateway (aiohttp) in front of the serving swarm.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``; ``"stream": true``
answers with server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``); a list of
prompts to ``/v1/completions`` is one batched session (choice i answers prompt i). Requests are
validated up front; errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 bad parameters / prompt over the context limit, 404 unknown model, 503 when the swarm cannot
serve (a span without a server, coordinator unreachable), 401 with a wrong API key. A client that disconnects mid-stream
ends the generation, which frees the servers' sessions.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import time
from typing import Any

from aiohttp import web

from peer.errors import LowbandError
from pipeline.client import InferenceClient
from pipeline.protocol import ContextLimitExceeded, ModelNotFound

log = logging.getLogger("lowband.pipeline.gateway")

CLIENT: web.AppKey[InferenceClient] = web.AppKey("client", InferenceClient)
API_KEY: web.AppKey[str] = web.AppKey("api_key", str)
MAX_BODY = 1 << 20


class _BadParam(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _BadParam(f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", key)
    return float(v)


def _params(body: dict) -> dict[str, Any]:
    """Sampling parameters shared by both endpoints (OpenAI names and defaults)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadParam("'model' is required", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _BadParam(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadParam(f"'seed' must be an integer, got {seed!r}", "seed")
    n = body.get("n", 1)
    if n not in (1, None):
        raise _BadParam("only n=1 is supported", "n")
    if body.get("stop") not in (None, [], ""):
        raise _BadParam("'stop' sequences are not supported; generation stops at the model's end token", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _BadParam("'stream' must be a boolean", "stream")
    return {"model": model, "max_new_tokens": max_tokens, "seed": seed, "stream": stream,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0)}


def _prompt(body: dict, chat: bool):
    if chat:
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise _BadParam("'messages' must be a non-empty list of {role, content} with string content", "messages")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) and p for p in prompt):
        if body.get("stream"):
            raise _BadParam("streaming takes one prompt; send a batch of prompts without 'stream'", "stream")
        return prompt  # a batch: one session of len(prompt) rows
    if not isinstance(prompt, str) or not prompt:
        raise _BadParam("'prompt' must be a non-empty string or a list of them", "prompt")
    return prompt


async def _models(request: web.Request) -> web.Response:
    try:
        models = await request.app[CLIENT].models()
    except LowbandError as e:  # coordinator unreachable
        return _error(503, str(e), "server_error")
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "lowband", "context_length": m["max_seq_len"],
         "servers": m["servers"], "ready": m["covered"]} for name, m in sorted(models.items())]})


def _chunk(kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None,
           first: bool = False) -> dict:
    if kind == "chat":
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    key = request.app[API_KEY]
    if key and request.headers.get("Authorization") != f"Bearer {key}":
        return _error(401, "missing or wrong API key", "invalid_request_error", code="invalid_api_key")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the request body must be a JSON object", "invalid_request_error")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object", "invalid_request_error")
    try:
        p = _params(body)
        prompt = _prompt(body, chat)
    except _BadParam as e:
        return _error(400, str(e), "invalid_request_error", e.param)
    client, model = request.app[CLIENT], p["model"]
    if not chat and isinstance(prompt, list):
        return await _complete_batch(client, p, prompt)
    usage: dict[str, Any] = {}
    pieces = client.astream(model, prompt, p["max_new_tokens"], p["temperature"], p["top_p"], p["seed"],
                            usage=usage)
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created, kind = int(time.time()), "chat" if chat else "text"
    response: web.StreamResponse | None = None
    try:
        # The first piece is awaited before any byte is sent, so request errors (unknown model,
        # context limit, missing span) still get a proper status code when streaming.
        first = await anext(pieces, None)
        if p["stream"]:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)

            async def emit(obj: Any) -> None:
                await response.write(f"data: {json.dumps(obj)}\n\n".encode())

            await emit(_chunk(kind, rid, model, created, first if first is not None else "", None, first=True))
            async for piece in pieces:
                await emit(_chunk(kind, rid, model, created, piece, None))
            await emit(_chunk(kind, rid, model, created, None, usage.get("finish_reason", "stop")))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        text = (first or "") + "".join([piece async for piece in pieces])
    except (ValueError, LowbandError) as e:
        if response is not None:  # mid-stream: the status is sent; end the event stream with an error
            await response.write(f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                                 .encode())
            return response
        return _swarm_error(e)
    finally:
        await pieces.aclose()
    finish = usage.get("finish_reason", "stop")
    counts = _counts([usage])
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return web.json_response({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                              "usage": counts})


def _swarm_error(e: Exception) -> web.Response:
    """The HTTP answer to an error of the swarm or of the request it found."""
    if isinstance(e, ModelNotFound):
        return _error(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, (ValueError, ContextLimitExceeded)):  # BadRequest, context limit, sampler parameters
        return _error(400, str(e), "invalid_request_error")
    return _error(503, str(e), "server_error")  # no route, servers gone, coordinator unreachable


def _counts(usage: list[dict]) -> dict[str, int]:
    counts = {k: sum(u.get(k, 0) for u in usage) for k in ("prompt_tokens", "completion_tokens")}
    counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    return counts


async def _complete_batch(client: InferenceClient, p: dict[str, Any], prompts: list[str]) -> web.Response:
    """``/v1/completions`` with a list of prompts: one batched session, choice i answers prompt i."""
    usage: list[dict] = []
    try:
        texts = await client.agenerate(p["model"], prompts, p["max_new_tokens"], p["temperature"], p["top_p"],
                                       p["seed"], usage=usage)
    except (ValueError, LowbandError) as e:
        return _swarm_error(e)
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": u["finish_reason"]}
               for i, (text, u) in enumerate(zip(texts, usage))]
    return web.json_response({"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
                              "created": int(time.time()), "model": p["model"], "choices": choices,
                              "usage": _counts(usage)})


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


def gateway_app(client: InferenceClient, api_key: str | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[CLIENT], app[API_KEY] = client, api_key or ""
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)

    async def close_client(app: web.Application) -> None:
        await app[CLIENT].aclose()

    app.on_cleanup.append(close_client)
    return app


async def start_gateway(coordinator: str, token: str, host: str = "127.0.0.1", port: int = 8000, *,
                        wire: str = "fp32", api_key: str | None = None) -> tuple[web.AppRunner, str]:
    """Serve the gateway on host:port (0 = any free port); returns (runner, base URL)."""
    app = gateway_app(InferenceClient(coordinator, token, wire=wire), api_key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"
