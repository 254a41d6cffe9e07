"""Real-process harness for tests and benches: start Python children, read their READY line,
always clean up.

A child prints one line ``READY {json}`` on stdout when it is serving; ``spawn`` waits for it
(with a timeout) and returns the parsed dict. Every child is killed by pid at teardown.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testing import ROOT


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    proc: subprocess.Popen
    ready: dict
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_for_line(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise TimeoutError(f"child {self.pid} never printed {needle!r}; output:\n" + "\n".join(self.lines[-40:]))


class Procs:
    """Owns the children of one test; use as the ``procs`` fixture."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(self, args: list[str], *, ready_timeout: float = 60, env: dict | None = None,
              wait_ready: bool = True, cwd: Path | None = None) -> Child:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        proc = subprocess.Popen(args, cwd=cwd or ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        child = Child(proc=proc, ready={})
        self.children.append(child)
        got_ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                child.lines.append(line)
                if line.startswith("READY ") and not got_ready.is_set():
                    child.ready.update(json.loads(line[6:]))
                    got_ready.set()
            got_ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if wait_ready:
            if not got_ready.wait(ready_timeout) or not child.ready:
                out = "\n".join(child.lines[-40:])
                child.kill()
                raise RuntimeError(f"child {args} not ready within {ready_timeout}s:\n{out}")
        return child

    def python(self, *args: str, **kw) -> Child:
        return self.spawn([sys.executable, *args], **kw)

    def cleanup(self) -> None:
        for c in self.children:
            c.kill()
        for c in self.children:
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_until_async(predicate, timeout: float = 10.0) -> None:
    """``wait_until`` for a test whose event loop must keep running (in-process PeerHosts)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
