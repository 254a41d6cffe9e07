"""Tiny served models for the gateway-security and serving-limits tests, and their child process.

``write_tiny_model`` (from ``testing/tiny_serving.py``, shared with bench/attacks.py): a random
6-block llama as a Hugging Face folder with a word-level tokenizer and a chosen chat template.

``python tests/tiny_serving.py serve LIMITS-JSON JOIN-ARGS...``: ``peer join JOIN-ARGS...`` whose
serve role uses ``ServeConfig(**LIMITS)`` (small KV budgets, so a test can fill them without
gigabytes of cache); the server code itself is unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root

from testing.tiny_serving import WORDS, write_tiny_model  # noqa: F401  (re-exported for the tests)


def serve_with_limits(limits: dict, join_args: list[str]) -> int:
    from peer.cli import main
    from pipeline.server import ServeConfig, ServeRole

    plain_init = ServeRole.__init__

    def init(self, argument, config=None):
        plain_init(self, argument, ServeConfig(**limits))

    ServeRole.__init__ = init  # the `serve` plug-in builds its role from this class
    return main(["join", *join_args])


if __name__ == "__main__":
    if sys.argv[1] != "serve":
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    raise SystemExit(serve_with_limits(json.loads(sys.argv[2]), sys.argv[3:]))
