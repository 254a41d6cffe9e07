"""Process plumbing shared by the `peer` and `coordinator` commands: logging (text or JSON
lines), stop signals (portable), where the swarm token and join string come from, and the flags
and help format every subcommand shares. Cheap to import (no asyncio, aiohttp or torch at import time): the
parsers are built from it before any command runs."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default: argparse's "(default: X)" unless the help text already
    says it, or there is none to show (None: the help says what happens instead; a flag's
    False: off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if "default" in text or action.required or nothing:
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose help (its subcommands' included) shows every option's default."""

    def __init__(self, *args: Any, formatter_class: type = HelpFormatter, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """--log-format / --log-level, for every long-running command."""
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text or one JSON object per line on stderr; progress "
                             "bars only with text on a terminal")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"), help="least severe level logged")


def add_token_args(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup,
                   fallback: str = "$LOWBAND_TOKEN") -> None:
    """--token / --token-file, for every command that takes the swarm token (``read_token``)."""
    parser.add_argument("--token", help="swarm token; visible in ps, prefer --token-file "
                                        f"(default without --token/--token-file: {fallback})")
    parser.add_argument("--token-file", metavar="PATH",
                        help=f"file holding the swarm token (default without --token/--token-file: "
                             f"{fallback})")


def add_coordinator_args(parser: argparse.ArgumentParser, *, token: bool = True,
                         url_help: str = "coordinator URL, e.g. https://HOST:8470") -> None:
    """How a command reaches and is admitted by the coordinator: --coordinator, --join /
    --join-file, --token / --token-file (closed swarm; ``token=False`` leaves them out) and
    --insecure; ``read_coordinator_args`` collects them. Used by `peer join`, `peer status`,
    `peer generate` and `peer gateway`."""
    parser.add_argument("--coordinator", metavar="URL",
                        help=f"{url_help} (default: the URL inside the join string)")
    parser.add_argument("--join", metavar="STRING",
                        help="join string printed by `coordinator invite` (lowband1:...): the "
                             "coordinator's URL, key and TLS fingerprint, plus an invite; visible "
                             "in ps, prefer --join-file (default without --join/--join-file: "
                             "$LOWBAND_JOIN)")
    parser.add_argument("--join-file", metavar="PATH",
                        help="file holding the join string (default without --join/--join-file: "
                             "$LOWBAND_JOIN)")
    if token:
        add_token_args(parser, "$LOWBAND_TOKEN; without any: --join's invite, or open admission")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain http:// to a coordinator that is not on this machine "
                             "(requests stay signed, but answers travel unauthenticated)")


DEFAULT_CLIENT_KEY_PATH = Path.home() / ".lowband" / "client.key"


def add_client_key_arg(parser: argparse.ArgumentParser) -> None:
    """--key for inference clients (`peer generate`, `peer gateway`): the identity admitted as a
    client, kept so one invite serves every later run (its credential: KEY.cred)."""
    parser.add_argument("--key", type=Path, default=DEFAULT_CLIENT_KEY_PATH,
                        help="Ed25519 identity key file of this client, created if missing")


def read_coordinator_args(args: argparse.Namespace) -> dict[str, Any]:
    """``coordinator``, ``join``, ``token`` and ``insecure`` from ``add_coordinator_args``' flags
    (files and environment included), as keywords of DaemonConfig / InferenceClient. A weak
    token raises ValueError saying how to make a good one."""
    join = _read_secret("--join", getattr(args, "join", None), getattr(args, "join_file", None),
                        "LOWBAND_JOIN")
    token = None
    if hasattr(args, "token"):
        token = read_token(args.token, args.token_file)
        if token:
            from peer.tokens import check_token_strength  # loads zxcvbn: only when a token is given

            check_token_strength(token)
    return {"coordinator": args.coordinator, "join": join, "token": token,
            "insecure": bool(args.insecure)}


def _read_secret(flag: str, value: str | None, path: str | None, env: str) -> str | None:
    if value:
        return value
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as e:
            raise SystemExit(f"cannot read {flag}-file {path}: {e.strerror}")
    return os.environ.get(env) or None


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def wait_for_stop_signal() -> None:
    """Return on SIGINT or SIGTERM. Uses loop.add_signal_handler where the loop has it and
    falls back to signal.signal (Windows' event loops lack it)."""
    import asyncio  # here, not at import time: building the parsers stays cheap

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                signal.signal(sig, signal.SIG_DFL)


def read_token(token: str | None, token_file: str | None) -> str | None:
    """--token, else --token-file's content, else $LOWBAND_TOKEN, else None."""
    return _read_secret("--token", token, token_file, "LOWBAND_TOKEN")
