"""The `peer join --serve MODEL` limits (entry-point group ``lowband.role_options``, name
``serve``). Torch-free: building the `peer` parser imports this module; pipeline/server.py
(torch) loads only when the role runs and turns the values into a ``ServeConfig``."""
from __future__ import annotations

import argparse
from typing import Any

PREFIX = "serve_"
# How a server holds its weights (pipeline/quant.py has the mechanism): fp32 (dequantized at load),
# bf16, or q8 / q4 (kept quantized, dequantized per matmul).
WEIGHT_FORMATS = ("fp32", "bf16", "q8", "q4")
# ServeConfig field -> (flag, type, help); argparse dests are PREFIX + field.
FLAGS: dict[str, tuple[str, type, str]] = {
    "max_sessions": ("--serve-max-sessions", int, "sessions this server holds at once (default: 64)"),
    "max_total_tokens": ("--serve-kv-slots", int, "KV slots (positions x rows) reserved over all sessions "
                                                  "(default: 65536)"),
    "max_client_sessions": ("--serve-client-sessions", int, "sessions one client may hold (default: a quarter "
                                                            "of --serve-max-sessions, at least 4)"),
    "max_client_tokens": ("--serve-client-kv-slots", int, "KV slots one client may hold (default: a quarter of "
                                                          "--serve-kv-slots)"),
    "idle_timeout_s": ("--serve-idle-timeout", float, "seconds before an untouched session is freed "
                                                      "(default: 300)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serve limits (need --serve MODEL)",
                                      "Every session's KV reservation is charged to the client that opened it.")
    for field_name, (flag, kind, help_text) in FLAGS.items():
        group.add_argument(flag, dest=PREFIX + field_name, type=kind, default=None,
                           metavar="SECONDS" if kind is float else "N", help=help_text)
    group.add_argument("--serve-weights", "--weights", dest=PREFIX + "weights", choices=WEIGHT_FORMATS,
                       default=None, help="how weights are held: fp32 (default), bf16, or q8 / q4 kept quantized "
                                          "and dequantized per matmul (a GGUF's quantized tensors are kept exactly "
                                          "as they come; float weights are quantized to Q8_0 / Q4_1)")


def config_values(options: dict[str, Any] | None) -> dict[str, Any]:
    """ServeConfig keyword arguments from the parsed options (only those given); ValueError
    for a weight format that does not exist (options may come from elsewhere than argparse)."""
    values = {k.removeprefix(PREFIX): v for k, v in (options or {}).items()
              if v is not None and k.removeprefix(PREFIX) in (*FLAGS, "weights")}
    if "weights" in values and values["weights"] not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {values['weights']!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    return values
