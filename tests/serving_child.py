"""Child processes for the serving tests.

``client URL TOKEN MODEL``: start a long generation, print ``STREAMING`` after the first piece,
then hang with the sessions open (the test SIGKILLs it to check servers free them).
"""
from __future__ import annotations

import sys
import time

from pipeline.client import InferenceClient


def run_client(url: str, token: str, model: str) -> None:
    client = InferenceClient(url, token)
    stream = client.stream(model, [{"role": "user", "content": "Tell me a long story about a lighthouse."}], 200,
                           stop_at_eos=False)
    next(stream)
    print("STREAMING", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "client":
        run_client(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
