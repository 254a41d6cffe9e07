"""Test-only helpers on top of the shared real-process harness (testing/procs.py), which tests
keep importing from here."""
from __future__ import annotations

from pathlib import Path

from testing import ROOT
from testing.procs import Child, Procs, free_port, wait_until, wait_until_async

__all__ = ["ROOT", "Child", "Procs", "free_port", "wait_until", "wait_until_async", "start_coordinator",
           "reference_model"]


def start_coordinator(procs: Procs, data_dir: Path, token: str, *flags: str, heartbeat: float = 0.5,
                      peer_timeout: float = 10) -> Child:
    """`python -m coordinator start` on 127.0.0.1 and a free port; ``.ready["url"]`` is its URL."""
    return procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                        "--data-dir", str(data_dir), "--token", token,
                        "--heartbeat-interval", str(heartbeat), "--peer-timeout", str(peer_timeout), *flags)


def reference_model():
    """The single-process oracle of the serving tests: ``(model, tokenizer)`` of the reference GGUF
    (pipeline.loading.reference_model_path)."""
    from pipeline.loading import load_model, reference_model_path
    from pipeline.tokenizer import Tokenizer

    path = reference_model_path()
    return load_model(path), Tokenizer.from_gguf(path)
