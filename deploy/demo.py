"""`make demo`: a coordinator and three peers on this machine, end to end.

Starts a coordinator (temporary data dir, free port on 127.0.0.1) and three `peer join` daemons
as subprocesses, waits until every peer is active and has pinged every other peer through the
encrypted transport, prints the status page URL and the membership table (`peer status`), keeps
the swarm running for --duration seconds, then stops everything cleanly by pid (SIGTERM: peers
leave the swarm) and checks that each process exited 0. Exit status 0 means all of that worked.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    """A child process whose output is echoed with a prefix and scanned for `READY {json}`."""

    def __init__(self, name: str, args: list[str], verbose: bool) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        self._ready: queue.Queue[dict] = queue.Queue()
        self._verbose = verbose
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("READY "):
                self._ready.put(json.loads(line[6:]))
            elif self._verbose or " WARNING " in line or " ERROR " in line:
                print(f"  [{self.name}] {line}", flush=True)

    def wait_ready(self, timeout: float) -> dict:
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            raise SystemExit(f"demo: {self.name} was not ready within {timeout:.0f}s "
                             f"(exit code {self.proc.poll()})") from None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM by pid, then wait; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def api_status(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/status", timeout=10) as r:
        return json.loads(r.read())


def all_meshed(url: str, ids: set[str]) -> bool:
    """Every peer active, and every peer reports a successful ping to every other peer."""
    peers = {p["peer_id"]: p for p in api_status(url)["peers"]}
    for pid in ids:
        p = peers.get(pid)
        if p is None or p["state"] != "active":
            return False
        links = p["stats"].get("links", {})
        if set(links) != ids - {pid} or any(row.get("pings_ok", 0) < 1 for row in links.values()):
            return False
    return True


def print_table(url: str) -> None:
    subprocess.run([sys.executable, "-m", "peer.cli", "status", "--coordinator", url],
                   cwd=ROOT, check=False, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds to keep the swarm running after it formed (default 20)")
    parser.add_argument("--verbose", action="store_true", help="echo every child log line")
    args = parser.parse_args(argv)

    procs: list[Proc] = []
    workdir = tempfile.TemporaryDirectory(prefix="lowband-demo-")
    work = Path(workdir.name)
    token_file = work / "token"
    token_file.write_text(secrets.token_urlsafe(24))
    try:
        coordinator = Proc("coordinator", ["-m", "coordinator", "start", "--host", "127.0.0.1",
                                           "--port", "0", "--data-dir", str(work / "coordinator"),
                                           "--token-file", str(token_file),
                                           "--heartbeat-interval", "1", "--peer-timeout", "6"],
                           args.verbose)
        procs.append(coordinator)
        url = coordinator.wait_ready(60)["url"]
        print(f"coordinator up: status page {url}/", flush=True)

        started = time.monotonic()
        for i in range(args.peers):
            procs.append(Proc(f"peer{i}", ["-m", "peer.cli", "join", "--coordinator", url,
                                           "--token-file", str(token_file),
                                           "--listen", "127.0.0.1:0", "--device", "auto",
                                           "--key", str(work / f"peer{i}.key"),
                                           "--ping-interval", "1"], args.verbose))
        ids = set()
        for p in procs[1:]:
            ready = p.wait_ready(120)
            ids.add(ready["peer_id"])
            print(f"{p.name} joined: id {ready['peer_id'][:12]} at {ready['address']} "
                  f"(device {ready['device']})", flush=True)

        deadline = time.monotonic() + 60
        while not all_meshed(url, ids):
            if time.monotonic() > deadline:
                print_table(url)
                raise SystemExit("demo: peers did not all see and ping each other within 60s")
            time.sleep(0.2)
        print(f"\nall {len(ids)} peers see each other and exchanged encrypted pings "
              f"({time.monotonic() - started:.1f}s after launch)\n", flush=True)
        print_table(url)
        print(f"\nstatus page: {url}/   (running {args.duration:g}s more; Ctrl-C stops early)\n",
              flush=True)
        try:
            end = time.monotonic() + args.duration
            while time.monotonic() < end:
                time.sleep(min(5.0, max(0.0, end - time.monotonic())))
                if time.monotonic() < end:
                    print_table(url)
                    print(flush=True)
        except KeyboardInterrupt:
            print("interrupted; shutting down", flush=True)

        print("stopping peers (SIGTERM -> leave) ...", flush=True)
        codes = {p.name: p.stop() for p in procs[1:]}
        left = [p for p in api_status(url)["peers"] if p["state"] == "left"]
        codes["coordinator"] = coordinator.stop()
        print(f"exit codes: {codes}; {len(left)}/{len(ids)} peers left cleanly", flush=True)
        return 0 if all(c == 0 for c in codes.values()) and len(left) == len(ids) else 1
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        workdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
