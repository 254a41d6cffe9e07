"""`peer generate` and `peer gateway`: subcommands the `peer` CLI loads from the entry-point
group ``lowband.commands`` (so peer/ never imports pipeline/). Heavy imports (torch, aiohttp,
asyncio) happen only when a subcommand runs, so building the `peer` parser stays fast.

    peer generate --coordinator URL --model smollm2-135m "prompt" [--max-new-tokens N] [--chat]
                  [--spot-check P]
    peer gateway --coordinator URL [--host H] [--port P]     # OpenAI-compatible HTTP
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from peer.runtime import add_logging_args, add_token_args, read_token, setup_logging

log = logging.getLogger("lowband.gateway")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", required=True, help="coordinator URL, e.g. http://HOST:8470")
    add_token_args(p)
    p.add_argument("--wire", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="activation dtype between servers (fp32: exact)")
    add_logging_args(p)


def _token(args) -> str | None:
    return read_token(args.token, args.token_file)


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
    from pipeline.client import InferenceClient
    from pipeline.protocol import ModelNotFound

    token = _token(args)
    if not token:
        print("peer: a swarm token is required (--token, --token-file or $LOWBAND_TOKEN)", file=sys.stderr)
        return 2
    setup_logging(args.log_format, args.log_level)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    with InferenceClient(args.coordinator, token, wire=args.wire, spot_check=args.spot_check) as client:
        try:
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


def add_gateway(sub) -> None:
    p = sub.add_parser("gateway", help="serve an OpenAI-compatible HTTP API backed by the swarm",
                       description="GET /v1/models, POST /v1/completions and /v1/chat/completions (stream: "
                                   "server-sent events). Prints 'READY {json}' with the URL once listening.")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' from HTTP clients "
                                     "(default: no key needed)")
    p.set_defaults(run=run_gateway)


def run_gateway(args) -> int:
    import asyncio

    from peer.runtime import wait_for_stop_signal
    from pipeline.gateway import start_gateway

    token = _token(args)
    if not token:
        print("peer: a swarm token is required (--token, --token-file or $LOWBAND_TOKEN)", file=sys.stderr)
        return 2
    setup_logging(args.log_format, args.log_level)

    async def main() -> int:
        try:
            runner, url = await start_gateway(args.coordinator, token, args.host, args.port,
                                              wire=args.wire, api_key=args.api_key)
        except OSError as e:
            print(f"peer: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
            return 2
        log.info("gateway: %s/v1 (coordinator %s)", url, args.coordinator)
        print("READY " + json.dumps({"url": url, "pid": os.getpid()}), flush=True)
        try:
            await wait_for_stop_signal()
        finally:
            await runner.cleanup()
        return 0

    return asyncio.run(main())
