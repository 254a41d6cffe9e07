"""Child process of tests/test_nat_swarm.py: an inference client run inside a lab namespace
(behind a NAT router), where the test process cannot reach. Waits until ``--servers`` servers
of the model are announced, generates greedily and prints one ``RESULT {json}`` line: the
completion, the route (peer id, start, end) and the link path to each server."""
from __future__ import annotations

import argparse
import json
import time

from pipeline.client import InferenceClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--servers", type=int, required=True)
    ap.add_argument("--prompt", required=True, help="JSON: a string or chat messages")
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--wait", type=float, default=60.0)
    args = ap.parse_args()
    client = InferenceClient(args.coordinator, args.token, insecure=True, key_path=args.key)
    try:
        deadline = time.monotonic() + args.wait
        while len(client.call(client.servers, args.model)) < args.servers:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(client.call(client.servers, args.model))} servers announced")
            time.sleep(0.5)
        text = client.generate(args.model, json.loads(args.prompt), args.new)
        paths = {pid: client.host.link_path(pid) for pid, _, _ in client.last_route}
        print("RESULT " + json.dumps({"text": text, "route": client.last_route, "paths": paths}),
              flush=True)
    finally:
        client.close()


if __name__ == "__main__":
    main()
