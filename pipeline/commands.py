"""`peer generate` and `peer gateway`: subcommands the `peer` CLI loads from the entry-point
group ``lowband.commands`` (so peer/ never imports pipeline/). Heavy imports (torch, aiohttp,
asyncio) happen only when a subcommand runs, so building the `peer` parser stays fast.

    peer generate (--join STRING | --coordinator URL [--token ...]) --model smollm2-135m "prompt"
                  [--max-new-tokens N] [--chat] [--spot-check P]
    peer gateway (--join STRING | --coordinator URL ...) [--host H] [--port P]
                 [--api-keys-file FILE] [--max-concurrent N ...] [--chat-template FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from peer.runtime import HelpFormatter, add_client_key_arg, add_coordinator_args, add_logging_args, setup_logging

log = logging.getLogger("lowband.gateway")


def _common(p: argparse.ArgumentParser) -> None:
    add_coordinator_args(p)
    add_client_key_arg(p)
    p.add_argument("--wire", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="activation dtype between servers (fp32: exact)")
    add_logging_args(p)


def _client(args, **kwargs):
    """The InferenceClient the flags describe; ValueError on a weak token or a refused URL."""
    from peer.runtime import read_coordinator_args
    from pipeline.client import InferenceClient

    return InferenceClient(**read_coordinator_args(args), key_path=args.key, wire=args.wire, **kwargs)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return p


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model served by the swarm",
                       description="Route a prompt through the swarm's stage servers and print the completion "
                                   "as it is generated. Exit 0 on success, 2 on a bad request (unknown model, "
                                   "prompt too long, bad parameters), 1 when the swarm cannot serve it.")
    _common(p)
    p.add_argument("--model", required=True, help="model name as announced by its servers (e.g. smollm2-135m)")
    p.add_argument("prompt", help="prompt text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this mass")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--spot-check", type=_probability, default=0.0, metavar="P",
                   help="re-run each hop's step on a second server of its span with probability P and compare; "
                        "a server caught returning wrong activations is avoided and reported (0: off)")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from peer.errors import LowbandError
    from pipeline.protocol import ModelNotFound

    setup_logging(args.log_format, args.log_level)
    try:
        client = _client(args, spot_check=args.spot_check)
    except (ValueError, LowbandError) as e:
        print(f"peer: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            prompt = _chat_text(client, args.model, args.prompt) if args.chat else args.prompt
            for piece in client.stream(args.model, prompt, args.max_new_tokens, args.temperature, args.top_p,
                                       args.seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:  # BadRequest, ContextLimitExceeded, sampler parameters
            print(f"\npeer: {e}", file=sys.stderr)
            return 2
        except LowbandError as e:  # ModelNotFound is a bad request; the rest (no route, coordinator away) are not
            print(f"\npeer: {e}", file=sys.stderr)
            return 2 if isinstance(e, ModelNotFound) else 1
    sys.stdout.write("\n")
    return 0


def _chat_text(client, model: str, user: str) -> str:
    """The user message in the model's chat template (sent by its server: rendered bounded)."""
    from pipeline.chat_template import TemplateRenderer, render_chat

    async def render() -> str:
        renderer = TemplateRenderer(workers=1)
        try:
            return await render_chat(renderer, await client.tokenizer(model), [{"role": "user", "content": user}])
        finally:
            await renderer.aclose()

    return client.call(render)


class _EpilogFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (as everywhere), the epilog's example lines kept as written."""


KEYS_HELP = """API keys file: one key per line, then optional per-key quotas, e.g.
  sk-3f9c...  name=alice concurrent=2 prompts=4 max_tokens=512 kv_slots=4096
  sha256:<64 hex digits of the key's SHA-256>  name=bob
('#' starts a comment; keys are >= 16 characters; unset quotas take the --max-* values).
Clients send 'Authorization: Bearer KEY'. Without keys the gateway is open and the --max-*
quotas hold per client address. A request without max_tokens gets the rest of the model's
context, clamped to the key's max_tokens and to kv_slots / concurrent."""


def add_gateway(sub) -> None:
    p = sub.add_parser("gateway", help="serve an OpenAI-compatible HTTP API backed by the swarm",
                       description="GET /v1/models, POST /v1/completions and /v1/chat/completions (stream: "
                                   "server-sent events). Prints 'READY {json}' with the URL once listening.",
                       epilog=KEYS_HELP, formatter_class=_EpilogFormatter)
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    keys = p.add_argument_group("API keys and quotas")
    keys.add_argument("--api-keys-file", metavar="FILE", help="require one of the API keys in FILE (format below; default: no keys, quotas "
                           "per client address)")
    keys.add_argument("--api-key", help="require this one key (visible in ps: prefer --api-keys-file; default: none)")
    keys.add_argument("--max-concurrent", type=_positive, default=4, metavar="N",
                      help="requests in flight per key")
    keys.add_argument("--max-prompts", type=_positive, default=16, metavar="N",
                      help="prompts in one request")
    keys.add_argument("--max-tokens", type=_positive, default=4096, metavar="N",
                      help="max_tokens of one request")
    keys.add_argument("--max-kv-slots", type=_positive, default=1 << 14, metavar="N",
                      help="KV slots per key: rows x (prompt + max_tokens) over its requests in flight")
    keys.add_argument("--total-concurrent", type=_positive, default=64, metavar="N",
                      help="requests in flight over the whole gateway")
    keys.add_argument("--total-kv-slots", type=_positive, default=1 << 14, metavar="N",
                      help="KV slots over the whole gateway; keep within the servers' per-client share "
                           "(the default is a stage server's default share)")
    tpl = p.add_argument_group("chat templates (rendered in bounded worker processes)")
    tpl.add_argument("--chat-template", metavar="FILE",
                     help="render every chat with this jinja template (default: the one each model's server "
                          "sends)")
    tpl.add_argument("--template-timeout", type=float, default=2.0, metavar="SECONDS",
                     help="a chat template that takes longer is refused")
    p.set_defaults(run=run_gateway)


def gateway_config(args):
    """The GatewayConfig the flags describe; ValueError on a bad keys or template file."""
    from pathlib import Path

    from pipeline.api_keys import MIN_KEY_CHARS, ApiKey, KeyRing, Quota, key_digest
    from pipeline.gateway import GatewayConfig

    quota = Quota(args.max_concurrent, args.max_prompts, args.max_tokens, args.max_kv_slots)
    keys = KeyRing.load(args.api_keys_file, quota).keys if args.api_keys_file else []
    if args.api_key:
        if len(args.api_key) < MIN_KEY_CHARS:
            raise ValueError(f"--api-key needs at least {MIN_KEY_CHARS} characters")
        keys.append(ApiKey("--api-key", key_digest(args.api_key), quota))
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --chat-template {args.chat_template}: {e}") from e
    if not args.template_timeout > 0:
        raise ValueError("--template-timeout must be > 0")
    return GatewayConfig(KeyRing(keys) if keys else None, quota, args.total_concurrent, args.total_kv_slots,
                         template, args.template_timeout)


def run_gateway(args) -> int:
    import asyncio

    from peer.errors import LowbandError
    from peer.runtime import wait_for_stop_signal
    from pipeline.gateway import start_gateway

    setup_logging(args.log_format, args.log_level)
    try:
        config = gateway_config(args)
        client = _client(args)
    except (ValueError, LowbandError) as e:
        print(f"peer: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            runner, url = await start_gateway(client, args.host, args.port, config)
        except OSError as e:
            print(f"peer: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
            await client.aclose()
            return 2
        log.info("gateway: %s/v1 (coordinator %s)%s", url, args.coordinator or "from the join string",
                 "" if config.keys else "; no API keys: open to anyone who can reach it")
        print("READY " + json.dumps({"url": url, "pid": os.getpid()}), flush=True)
        try:
            await wait_for_stop_signal()
        finally:
            await runner.cleanup()
        return 0

    return asyncio.run(main())
