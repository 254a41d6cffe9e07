"""OpenAI-compatible HTTP gateway (aiohttp) in front of the serving swarm.

``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST
/v1/chat/completions``. Requests are parsed into one typed ``CompletionRequest``
(``pipeline.openai_request``: which parameters are honoured, ignored or refused). Every choice of
a request, ``n`` per prompt, is a row of one batched session (``InferenceClient.arows``; choice
index = prompt index x n + j), so greedy choices are identical and sampled ones differ, all drawn
from one generator seeded by ``seed`` (reproducible for the same swarm and prompts). Text comes
from ``pipeline.completion_text``: decoded whole at each token, ``stop`` strings matched on the
text and cut off (finish_reason "stop"); the session closes once every choice has finished.
``max_tokens`` unset means the rest of the context, clamped to the caller's quota
(``api_keys.default_max_tokens``). ``"stream": true`` answers with server-sent events: a role
chunk per choice (chat), ``data: {chunk}`` lines, with ``stream_options.include_usage`` a last
chunk with no choices and the usage, then ``data: [DONE]``. Usage counts each prompt once and
every choice's completion tokens. ``logprobs`` are refused: the greedy path returns token ids,
not logits, so they could not be exact.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 bad or unsupported parameters / prompt over the context limit / over a per-request quota,
401 a missing or wrong API key (``/v1/models`` included), 404 unknown model, 429 over a
concurrency or KV quota (``Retry-After``), 503 when the swarm cannot serve (a span without a
server, coordinator unreachable, a chat template past its bounds). A client that disconnects
mid-stream ends the generation, which frees the servers' sessions.

A public endpoint: API keys come from a file (``pipeline.api_keys``: constant-time lookup,
per-key quotas on requests in flight, prompts, max_tokens and KV slots); without keys the same
quotas hold per client address. Every request's KV need, rows x (longest prompt + max_tokens), is
charged to its key before any server is asked, and the stage servers charge the gateway's
sessions to its peer id on top (``ServeConfig.max_client_tokens``). The gateway renders chat
templates itself, in bounded worker processes (``pipeline.chat_template.TemplateRenderer``), from
the model's template as its server sent it or from a local file pinned with ``--chat-template``,
and hands the client the rendered text: a hostile template cannot stall the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import web

from peer.errors import LowbandError
from pipeline.api_keys import KeyRing, Lease, Quota, QuotaExceeded, Usage, default_max_tokens
from pipeline.chat_template import TemplateRenderer, render_chat
from pipeline.client import InferenceClient
from pipeline.completion_text import Choices
from pipeline.openai_request import BadParam, CompletionRequest, parse_request
from pipeline.protocol import ContextLimitExceeded, ModelNotFound
from pipeline.tokenizer import Tokenizer

log = logging.getLogger("lowband.pipeline.gateway")

MAX_BODY = 1 << 20


@dataclass
class GatewayConfig:
    """Who may call and how much: ``keys`` None = open (quotas per client address)."""
    keys: KeyRing | None = None
    quota: Quota = Quota()                  # per address when keyless (keys carry their own)
    total_concurrent: int = 64              # the whole gateway
    total_kv_slots: int = 1 << 14           # the whole gateway (a server's default per-client share)
    chat_template: str | None = None        # pinned template source (else each model's own)
    template_timeout_s: float = 2.0
    template_max_output: int = 1 << 20


CLIENT: web.AppKey[InferenceClient] = web.AppKey("client", InferenceClient)
CONFIG: web.AppKey[GatewayConfig] = web.AppKey("config", GatewayConfig)
USAGE: web.AppKey[Usage] = web.AppKey("usage", Usage)
RENDERER: web.AppKey[TemplateRenderer] = web.AppKey("renderer", TemplateRenderer)


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers=headers)


def _bad(e: BadParam) -> web.Response:
    return _error(400, str(e), "invalid_request_error", e.param, e.code)


def _principal(request: web.Request) -> tuple[str, Quota] | web.Response:
    """(who, quota) of the caller: its API key, or its address on a keyless gateway; 401."""
    cfg = request.app[CONFIG]
    if cfg.keys is None:
        return f"addr:{request.remote}", cfg.quota
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    key = cfg.keys.match(presented.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "invalid_request_error",
                      code="invalid_api_key")
    return f"key:{key.digest.hex()[:16]}", key.quota


def _over_quota(e: QuotaExceeded) -> web.Response:
    if e.kind == "size":
        return _error(400, str(e), "invalid_request_error", code="kv_quota_exceeded")
    return _error(429, str(e), e.kind, code="rate_limit_exceeded", headers={"Retry-After": "1"})


def _swarm_error(e: Exception) -> web.Response:
    """The HTTP answer to an error of the swarm or of the request it found."""
    if isinstance(e, ModelNotFound):
        return _error(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, (ValueError, ContextLimitExceeded)):  # BadRequest, context limit, sampler parameters
        return _error(400, str(e), "invalid_request_error")
    return _error(503, str(e), "server_error")  # no route, servers gone, coordinator unreachable


# ----------------------------------------------------------------------------------- models
def _card(name: str, m: dict) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lowband", "context_length": m["max_seq_len"],
            "servers": m["servers"], "ready": m["covered"]}


async def _models(request: web.Request) -> web.Response:
    if isinstance(who := _principal(request), web.Response):
        return who
    try:
        models = await request.app[CLIENT].models()
    except LowbandError as e:  # coordinator unreachable
        return _error(503, str(e), "server_error")
    return web.json_response({"object": "list", "data": [_card(name, m) for name, m in sorted(models.items())]})


async def _model(request: web.Request) -> web.Response:
    if isinstance(who := _principal(request), web.Response):
        return who
    name = request.match_info["model"]
    try:
        models = await request.app[CLIENT].models()
    except LowbandError as e:
        return _error(503, str(e), "server_error")
    if name not in models:
        return _error(404, f"no live server announces model {name!r}", "invalid_request_error", "model",
                      "model_not_found")
    return web.json_response(_card(name, models[name]))


# ------------------------------------------------------------------------------ completions
@dataclass
class _Plan:
    """What a validated request becomes once its prompts are tokenized and its KV charged."""
    tokenizer: Tokenizer
    prompt_ids: list[list[int]]     # one per prompt (each answered n times)
    max_tokens: int


def _check_quota(req: CompletionRequest, quota: Quota) -> None:
    """Per-request quotas that need no tokenizer."""
    if req.max_tokens is not None and req.max_tokens > quota.max_tokens:
        raise BadParam(f"'max_tokens' {req.max_tokens} exceeds this client's limit of {quota.max_tokens}",
                       "max_tokens")
    if req.rows > quota.prompts:
        what = f"{len(req.prompts)} prompts x n={req.n}" if req.n > 1 else f"{req.rows} prompts"
        raise BadParam(f"{what} in one request exceed this client's limit of {quota.prompts} sequences",
                       "n" if req.n > 1 else "messages" if req.chat else "prompt")


async def _plan(app: web.Application, req: CompletionRequest, quota: Quota, lease: Lease) -> _Plan:
    """Tokenize the prompts (a chat rendered with its template, bounded), settle max_tokens (unset:
    ``api_keys.default_max_tokens``) and charge the KV need, rows x (longest prompt + max_tokens),
    to the caller's lease."""
    client = app[CLIENT]
    tok = await client.tokenizer(req.model)
    if req.chat:
        texts = [await render_chat(app[RENDERER], tok, req.prompts[0], app[CONFIG].chat_template)]
    else:
        texts = list(req.prompts)
    ids = await asyncio.to_thread(lambda: [tok.encode(t) for t in texts])  # a large body takes a while
    if not all(ids):
        raise BadParam("a prompt encodes to zero tokens", "messages" if req.chat else "prompt")
    servers = await client.servers(req.model)
    if not servers:
        raise ModelNotFound(f"no live server announces model {req.model!r}")
    limit, longest = servers[0].max_seq_len, max(map(len, ids))
    max_tokens = req.max_tokens
    if max_tokens is None:
        if longest >= limit:
            raise ContextLimitExceeded(f"prompt of {longest} tokens fills the context limit of {limit} of "
                                       f"{req.model!r}")
        max_tokens = default_max_tokens(quota, room=limit - longest, rows=req.rows, longest=longest,
                                        total_kv_slots=app[USAGE].total_kv_slots)
    elif longest + max_tokens > limit:
        raise ContextLimitExceeded(f"prompt of {longest} tokens + {max_tokens} new tokens exceeds the context "
                                   f"limit of {limit} of {req.model!r}")
    lease.charge_kv(req.rows * (longest + max_tokens))
    return _Plan(tok, ids, max_tokens)


async def _events(client: InferenceClient, req: CompletionRequest, plan: _Plan,
                  choices: Choices) -> AsyncIterator[list[tuple[int, str, str | None]]]:
    """Every step's (choice index, text, finish) events; all choices are rows of one session,
    closed as soon as every choice has finished (end token, stop string or length)."""
    rows = [ids for ids in plan.prompt_ids for _ in range(req.n)]
    async with contextlib.aclosing(client.arows(req.model, rows, plan.max_tokens, req.temperature, req.top_p,
                                                req.seed, (plan.tokenizer.eos_id,))) as steps:
        async for step in steps:
            yield choices.add(step)
            if choices.done:
                return
    yield choices.close()


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    if isinstance(who := _principal(request), web.Response):
        return who
    name, quota = who
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the request body must be a JSON object", "invalid_request_error")
    try:
        req = parse_request(body, chat)
        _check_quota(req, quota)
    except BadParam as e:
        return _bad(e)
    try:
        lease = request.app[USAGE].begin(name, quota)
    except QuotaExceeded as e:
        return _over_quota(e)
    try:
        try:
            plan = await _plan(request.app, req, quota, lease)
        except QuotaExceeded as e:
            return _over_quota(e)
        except BadParam as e:
            return _bad(e)
        except (ValueError, LowbandError) as e:
            return _swarm_error(e)
        return await _respond(request, req, plan)
    finally:
        lease.release()


async def _respond(request: web.Request, req: CompletionRequest, plan: _Plan) -> web.StreamResponse:
    tok = plan.tokenizer
    choices = Choices(req.rows, tok.decode, eos_id=tok.eos_id, max_tokens=plan.max_tokens, stop=req.stop)
    shape = _Shape(req, "chatcmpl-" if req.chat else "cmpl-")
    response: web.StreamResponse | None = None
    async with contextlib.aclosing(_events(request.app[CLIENT], req, plan, choices)) as events:
        try:
            # The first step is awaited before any byte is sent, so request errors (unknown model,
            # context limit, missing span) still get a proper status code when streaming.
            first = await anext(events)
            if req.stream:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)

                async def emit(obj: dict) -> None:
                    await response.write(f"data: {json.dumps(obj)}\n\n".encode())

                if req.chat:  # OpenAI opens each choice with its role
                    for i in range(req.rows):
                        await emit(shape.chunk(i, "", None, first=True))
                for event in first:
                    await emit(shape.chunk(*event))
                async for step in events:
                    for event in step:
                        await emit(shape.chunk(*event))
                if req.include_usage:
                    await emit(shape.usage_chunk(_usage(plan, choices)))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            async for step in events:
                first += step
        except (ValueError, LowbandError) as e:
            if response is not None:  # mid-stream: the status is sent; end the event stream with an error
                await response.write(f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}"
                                     f"\n\n".encode())
                return response
            return _swarm_error(e)
    texts = ["".join(piece for i, piece, _ in first if i == row) for row in range(req.rows)]
    return web.json_response(shape.whole(texts, [c.finish for c in choices.rows], _usage(plan, choices)))


def _usage(plan: _Plan, choices: Choices) -> dict[str, int]:
    """Token counts as OpenAI bills them: each prompt once (not once per choice), every choice's
    completion tokens (the end token excluded)."""
    prompt = sum(map(len, plan.prompt_ids))
    return {"prompt_tokens": prompt, "completion_tokens": choices.tokens, "total_tokens": prompt + choices.tokens}


class _Shape:
    """OpenAI's response objects for one request: whole answers and stream chunks."""

    def __init__(self, req: CompletionRequest, prefix: str):
        self.req, self.id, self.created = req, prefix + secrets.token_hex(12), int(time.time())

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.req.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}

    def chunk(self, index: int, piece: str, finish: str | None, first: bool = False) -> dict:
        if self.req.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if piece:
                delta["content"] = piece
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": piece, "logprobs": None, "finish_reason": finish}
        out = {**self._head(True), "choices": [choice]}
        if self.req.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}

    def whole(self, texts: list[str], finish: list[str | None], usage: dict) -> dict:
        if self.req.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {**self._head(False), "choices": choices, "usage": usage}


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


def gateway_app(client: InferenceClient, config: GatewayConfig | None = None) -> web.Application:
    config = config or GatewayConfig()
    app = web.Application(client_max_size=MAX_BODY)
    app[CLIENT], app[CONFIG] = client, config
    app[USAGE] = Usage(config.total_concurrent, config.total_kv_slots)
    app[RENDERER] = TemplateRenderer(timeout_s=config.template_timeout_s, max_output=config.template_max_output)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)

    async def warm(app: web.Application) -> None:
        await app[RENDERER].warm()

    app.on_startup.append(warm)

    async def close(app: web.Application) -> None:
        await app[RENDERER].aclose()
        await app[CLIENT].aclose()

    app.on_cleanup.append(close)
    return app


async def start_gateway(client: InferenceClient, host: str = "127.0.0.1", port: int = 8000,
                        config: GatewayConfig | None = None) -> tuple[web.AppRunner, str]:
    """Serve the gateway on host:port (0 = any free port); returns (runner, base URL)."""
    runner = web.AppRunner(gateway_app(client, config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"
