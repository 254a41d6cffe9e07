"""Real processes under hostile input, shared by the fuzz bench (bench/fuzz.py) and
tests/test_hostile_input.py: a coordinator started in its own folder with the filesystem oracle
(nothing written outside its documented data-dir layout), signed requests (peer/reqsign.py,
sometimes spoiled on purpose), and hostile
connections to a PeerHost (mutated handshakes, garbage records, hostile frames inside valid
records) with the check that a legitimate peer is still served."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from peer.errors import AuthError, ProtocolError
from peer.handshake import Handshake
from peer.identity import Identity
from peer.reqsign import H_BODY, H_NONCE, H_PEER, H_SIG, H_TIME, sign_headers
from peer.secure import SecureChannel
from peer.wire import FrameType
from testing import ROOT
from testing.fuzzgen import mutate, random_header
from testing.wire_oracles import seal_raw

TOKEN = "fuzz-swarm-token-337f9c14b27ed0a0e062efdd9e22a32f1cefed8b"


@dataclass
class Coordinator:
    """A real coordinator process whose working directory is ``parent`` and whose data dir is
    ``parent/data`` (so anything it writes outside the data dir lands where we look)."""

    proc: subprocess.Popen
    url: str
    host: str
    port: int
    parent: Path
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if hasattr(signal, "SIGTERM") else signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_records(self) -> list[tuple[str, str, str]]:
        """(level, logger, text with traceback) of every log record."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        starts = list(re.finditer(r"^\d{4}-\d\d-\d\d [\d:,]+ (\w+) ([\w.]+): ", text, re.M))
        return [(m.group(1), m.group(2), text[m.start():nxt.start() if nxt else len(text)])
                for m, nxt in zip(starts, starts[1:] + [None])]

    def log_problems(self) -> tuple[list[str], int]:
        """Records that mean an input reached code that did not expect it, and the number of
        tracebacks aiohttp logs from its own code (e.g. for every request its parser rejects
        with a 400): log noise a hostile client can cause, not a failure of ours."""
        problems, noise = [], 0
        for level, logger, text in self.log_records():
            if logger == "aiohttp.server" and "/coordinator/" not in text and "/peer/" not in text:
                noise += 1  # inside aiohttp only: its parser's 400s, writes to a client already gone
            elif level in ("ERROR", "CRITICAL") or "Traceback" in text:
                problems.append(text[:3000])
        return problems, noise


def start_coordinator(parent: Path, log: Path, timeout: float = 60.0) -> Coordinator:
    parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
           "--data-dir", str(parent / "data"), "--token", TOKEN, "--heartbeat-interval", "5",
           "--peer-timeout", "600", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                ready = json.loads(line[6:])
                return Coordinator(proc, ready["url"], "127.0.0.1", ready["port"], parent, log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"coordinator did not start:\n{log.read_text(errors='replace')[-3000:]}")


# What the coordinator may create under its data dir (coordinator/store.py, coordinator/checkpoints.py).
_DATA_FILES = re.compile(r"(coordinator\.sqlite3(-wal|-shm|-journal)?|token|authority\.key|endpoint\.json"
                         r"|tls\.(crt|key)"
                         r"|checkpoints/\.tmp/[0-9a-f]+\.part"
                         r"|checkpoints/runs/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/chunks/[0-9a-f]{2}/[0-9a-f]{64}"
                         r"|checkpoints/runs/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/manifests/\d{12}\.json)\Z")
_DATA_DIRS = re.compile(r"(checkpoints|checkpoints/\.tmp|checkpoints/runs"
                        r"|checkpoints/runs/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(/chunks(/[0-9a-f]{2})?|/manifests)?)\Z")


def filesystem_problems(parent: Path, canary: str, extra_roots: tuple[Path, ...] = ()) -> list[str]:
    """Everything written where it should not be: entries of ``parent`` besides the data dir,
    data-dir entries outside the documented layout, and any file or folder whose name carries
    the canary (used in every path-traversal attempt) under ``parent`` or ``extra_roots``."""
    problems = [f"outside the data dir: {p}" for p in parent.iterdir() if p.name != "data"]
    data = parent / "data"
    for dirpath, dirnames, filenames in os.walk(data):
        rel_dir = Path(dirpath).relative_to(data).as_posix()
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir != "." else d
            if not _DATA_DIRS.match(rel):
                problems.append(f"unexpected folder in the data dir: {rel}")
        for f in filenames:
            rel = f"{rel_dir}/{f}" if rel_dir != "." else f
            if not _DATA_FILES.match(rel):
                problems.append(f"unexpected file in the data dir: {rel}")
    for root in (parent, *extra_roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "node_modules", "__pycache__")]
            for name in dirnames + filenames:
                if canary in name and not Path(dirpath, name).resolve().is_relative_to(
                        (data / "checkpoints" / "runs").resolve()):
                    problems.append(f"traversal canary written: {Path(dirpath, name)}")
    return problems


def signed_headers(ident: Identity, method: str, path: str, body: bytes,
                   rng: random.Random | None = None, *, with_key: bool = False) -> dict:
    """Signed request headers for exactly ``method path body``; with ``rng``, sometimes
    spoiled instead (a header dropped or garbled, another key's signature, a stale time, the
    hash of another body) -- each must be refused with a 4xx, never a 5xx."""
    h = sign_headers(ident, method, path, body, with_key=with_key)
    if rng is not None and rng.random() < 0.3:
        spoil = rng.randrange(6)
        if spoil == 0:
            del h[rng.choice([H_PEER, H_TIME, H_NONCE, H_BODY, H_SIG])]
        elif spoil == 1:
            h[rng.choice([H_PEER, H_TIME, H_NONCE, H_BODY, H_SIG])] = rng.choice(
                ["", "zz", "0" * 500, "1e999", "-1", "NaN", "\u00e9".encode().decode("latin-1"), h[H_SIG].upper()])
        elif spoil == 2:
            h[H_SIG] = Identity.generate().sign(b"other").hex()
        elif spoil == 3:
            h = sign_headers(ident, method, path, body, with_key=with_key, now=time.time() - 3600)
        elif spoil == 4:
            h = sign_headers(ident, method, path, body + b" ", with_key=with_key)
        else:
            h = sign_headers(ident, method, path + "x", body, with_key=with_key)
    return h


def hostile_session_frames(rng: random.Random) -> list[tuple[int, dict, bytes, int]]:
    """Frames an authenticated but hostile peer might send inside valid records: DATA chunks
    with wrong types, off-grid offsets, oversized totals, bad message kinds, PING/PONG with odd
    ids, unknown frame types — and some valid requests in between."""
    D = int(FrameType.DATA)
    ok = {"i": 1, "o": 0, "n": 3, "z": 1 << 20, "k": "q", "c": 1, "m": "echo", "h": {}}
    variants = [
        (D, dict(ok), b"abc", 0),
        (D, {**ok, "i": "x"}, b"abc", 0), (D, {**ok, "z": 0}, b"abc", 0), (D, {**ok, "n": 2**62}, b"abc", 0),
        (D, {**ok, "o": 5}, b"abc", 0), (D, {**ok, "n": 10}, b"abc", 0), (D, {**ok, "o": -1}, b"abc", 0),
        (D, {**ok, "k": "zz"}, b"abc", 0), (D, {**ok, "k": None}, b"abc", 0), (D, {**ok, "m": 5}, b"abc", 0),
        (D, {**ok, "c": [1]}, b"abc", 0), (D, {**ok, "c": "1"}, b"abc", 0), (D, {**ok, "h": []}, b"abc", 0),
        (D, {**ok, "k": "m", "t": 5}, b"abc", 0), (D, {**ok, "k": "m", "t": "tag", "h": "x"}, b"abc", 0),
        (D, {**ok, "k": "r", "c": 999, "h": {}}, b"abc", 0), (D, {**ok, "k": "r", "c": [1]}, b"abc", 0),
        (D, {**ok, "k": "r", "c": {"a": 1}}, b"abc", 0), (D, {**ok, "k": "e", "c": [], "err": 1}, b"abc", 0),
        (D, {**ok, "m": "nope"}, b"abc", 0), (D, {**ok, "n": 4, "z": 2, "o": 2}, b"ab", 1),
        (D, {**ok, "n": 2**31, "z": 1, "i": rng.randrange(2**40)}, b"a", 1),
        (int(FrameType.PING), {"p": [1]}, b"", 0), (int(FrameType.PING), {"p": {"a": 1}}, b"", 0),
        (int(FrameType.PONG), {"p": [1]}, b"", 0), (int(FrameType.PONG), {"p": {}}, b"", 0),
        (int(FrameType.PONG), {}, b"", 0), (int(FrameType.PING), {}, b"", 0),
        (int(FrameType.HELLO), {}, b"", 0), (99, {}, b"", 0), (int(FrameType.REJECT), {"reason": 1}, b"", 0),
    ]
    frames = [rng.choice(variants) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        frames.append((D, random_header(rng), rng.randbytes(rng.randrange(0, 64)), rng.choice([0, 1])))
    return frames


async def tcp_case(address: str, rng: random.Random, idents: list[Identity], flights: list[bytes],
                   corpus: list[bytes]) -> str:
    """One hostile connection; returns its kind. The server's verdict is read from its log and
    from a legitimate peer's calls afterwards."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
    kind = rng.choice(["random", "mutated-handshake", "garbage-records", "hostile-frames", "hostile-frames"])
    try:
        if kind == "random":
            writer.write(rng.randbytes(rng.randrange(1, 5000)))
        elif kind == "mutated-handshake":
            writer.write(mutate(rng, rng.choice(flights)))
        else:
            hs = Handshake(rng.choice(idents), TOKEN.encode(), initiator=True)
            writer.write(hs.data_to_send())
            while not hs.done:
                data = await asyncio.wait_for(reader.read(4096), 10)
                if not data:
                    return kind + " (refused)"
                hs.receive_data(data)
                writer.write(hs.data_to_send())
            assert hs.result is not None
            channel = SecureChannel(hs.result.send_key, hs.result.recv_key, max_payload=1 << 20)
            if kind == "garbage-records":
                out = b"".join(bytes(channel.seal_frame(FrameType.PING, {"p": 1})) for _ in range(rng.randint(0, 2)))
                writer.write(mutate(rng, out + bytes(channel.seal_frame(FrameType.PING, {"p": 2}))))
            else:
                for type_, header, payload, flags in hostile_session_frames(rng):
                    writer.write(bytes(channel.seal_frame(type_, header, payload, flags)))
                if rng.random() < 0.3:  # authenticated garbage plaintext
                    writer.write(seal_raw(hs.result.send_key, channel._send_ctr, mutate(rng, rng.choice(corpus))))
        await writer.drain()
        try:  # give the server a moment to act; it may also just keep the connection
            await asyncio.wait_for(reader.read(1 << 16), 0.05)
        except asyncio.TimeoutError:
            pass
    except (OSError, ProtocolError, AuthError):
        pass  # the server dropped us: expected
    finally:
        writer.close()
    return kind


async def legit_check(client, server: dict) -> bool:
    """A well-behaved peer can still connect and call the server."""
    from peer.errors import LowbandError

    try:
        await client.connect(server["address"], expected_peer_id=server["peer_id"])
        hdr, payload = await client.call(server["peer_id"], "echo", {"x": 1}, b"hello", timeout=15)
        return hdr == {"echo": {"x": 1}} and bytes(payload) == b"hello"
    except (LowbandError, OSError):
        return False
