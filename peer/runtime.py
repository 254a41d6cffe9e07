"""Process plumbing shared by the `peer` and `coordinator` commands: logging (text or JSON
lines), stop signals (portable), and where the swarm token comes from."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text or one JSON object per line (default text)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"), help="default info")


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
    if token:
        return token
    if token_file:
        try:
            return Path(token_file).read_text().strip() or None
        except OSError as e:
            raise SystemExit(f"cannot read token file {token_file}: {e.strerror}")
    return os.environ.get("LOWBAND_TOKEN") or None
