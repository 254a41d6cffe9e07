"""Child processes for the serving tests.

``client URL TOKEN MODEL``: start a long generation, print ``STREAMING`` after the first piece,
then hang with the sessions open (the test SIGKILLs it to check servers free them).

``liar JOIN-ARGS...``: ``peer join JOIN-ARGS...`` whose stage server returns wrong activations
(every hidden state and logit it sends is scaled by 1.1 and shifted by 0.1): the server the
spot-check tests must catch. Fault injection lives here only; the product CLI has no such switch.
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


def run_liar(join_args: list[str]) -> int:
    from peer.cli import main
    from pipeline.server import StageServer

    honest_reply = StageServer._reply

    def lying_reply(self, r, h, length, all_reduce=None):
        return honest_reply(self, r, h * 1.1 + 0.1, length, all_reduce)

    StageServer._reply = lying_reply  # the `serve` role plug-in builds its StageServer from this class
    return main(["join", *join_args])


if __name__ == "__main__":
    if sys.argv[1] == "client":
        run_client(*sys.argv[2:5])
    elif sys.argv[1] == "liar":
        raise SystemExit(run_liar(sys.argv[2:]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
