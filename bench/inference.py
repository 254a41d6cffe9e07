"""Inference benchmark, part 1: SmolLM2-135M (fp32, CPU) greedy generation, ours vs HF transformers.

Every variant lives in its own worker process (so its peak memory is its own) that loads its
model once and then runs one generation per command; the parent interleaves the variants run by
run (hf, ours, hf, ours, ...) so the noise of a shared machine hits both alike, and reports
medians. Rows: ``hf`` = transformers ``generate`` on the same GGUF, dequantized to fp32;
``single`` = ``pipeline.generate`` in one process. Both get the same token ids (left-padded
batches) and always emit ``new_tokens`` tokens. Later parts (pipeline over peers, tensor split)
add a worker to ``WORKERS`` and their kinds to ``main``'s list.

    python bench/inference.py [--new-tokens 128] [--repeats 3] [--batches 1 8]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "How do I boil an egg? Give me clear step by step instructions, please.",
    "Summarize the plot of Romeo and Juliet.",
    "What is 17 times 23?",
    "Give me a tip for learning a new language quickly and keeping the habit going for months.",
]

# A runner generates once for (prompt ids, new_tokens) and calls on_first() when the first
# new token of every row exists.
Runner = Callable[[list[list[int]], int, Callable[[], None]], None]


def prompt_ids(batch: int) -> list[list[int]]:
    from pipeline.loading import reference_model_path
    from pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(reference_model_path())
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
            for q in (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch]]


class PeakRSS:
    """Samples resident memory of this process and of ``pids`` in a thread: the peaks during a
    measured section (``peak`` for this process, ``peaks[pid]`` for the others)."""

    def __init__(self, pids: list[int] = (), interval: float = 0.005):
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval, 0
        self._others = [psutil.Process(pid) for pid in pids]
        self.peaks = {p.pid: 0 for p in self._others}
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)
        for p in self._others:
            self.peaks[p.pid] = max(self.peaks[p.pid], p.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_hf() -> Runner:
    """HF transformers ``generate`` (greedy, its KV cache) on the model dequantized from the GGUF."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    from pipeline.loading import reference_model_path

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = reference_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()

    class FirstToken(BaseStreamer):
        def __init__(self, on_first: Callable[[], None]):
            self.calls, self.on_first = 0, on_first

        def put(self, value) -> None:  # the first call carries the prompt, the second the first tokens
            self.calls += 1
            if self.calls == 2:
                self.on_first()

        def end(self) -> None:
            pass

    def run(prompts: list[list[int]], new_tokens: int, on_first: Callable[[], None]) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=2, streamer=FirstToken(on_first))

    return run


def bench_single() -> Runner:
    """``pipeline.generate`` in one process: our model, preallocated KV cache."""
    from pipeline.generate import generate_tokens
    from pipeline.loading import load_model, reference_model_path

    model = load_model(reference_model_path())

    def run(prompts: list[list[int]], new_tokens: int, on_first: Callable[[], None]) -> None:
        for i, _ in enumerate(generate_tokens(model, prompts, new_tokens)):
            if i == 0:
                on_first()

    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    run.details = lambda: {"weight_mb": weight_mb}
    return run


def _child(args: list[str], procs: list[subprocess.Popen], timeout: float = 300.0) -> dict:
    """Start a child that prints ``READY {json}``; return that json (children die with us)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    procs.append(proc)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("READY "):
                # Keep draining stdout so a chatty child never blocks on a full pipe.
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return json.loads(line[6:])
    finally:
        timer.cancel()
    raise RuntimeError(f"{args[:3]} exited before READY (exit {proc.poll()})")


def bench_swarm(serve: list[tuple[str, str]], delay_ms: float = 0.0) -> Runner:
    """A coordinator plus one ``peer join --serve ARG --blocks SPAN`` process per entry of
    ``serve``, optionally each behind a ``testing.netem`` relay adding ``delay_ms`` one way (so
    every client<->server hop costs 2 x delay_ms of RTT); generation through InferenceClient.
    A batch is one session of several rows (``InferenceClient.arows``), as a batch is one
    ``generate_tokens`` call in ``single``."""
    import atexit
    import tempfile

    import socket

    from pipeline.client import InferenceClient

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    token, procs, servers = secrets.token_urlsafe(32), [], []
    atexit.register(lambda: [p.kill() for p in procs])
    tmp = Path(tempfile.mkdtemp(prefix="lowband-bench-"))
    url = _child(["-m", "coordinator", "start", "--port", "0", "--data-dir", str(tmp / "coord"), "--token", token,
                  "--heartbeat-interval", "0.5", "--peer-timeout", "30"], procs)["url"]
    for i, (arg, span) in enumerate(serve):
        port = free_port()
        announce = []
        if delay_ms:
            relay = _child(["-m", "testing.netem", "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{port}",
                            "--delay-ms", str(delay_ms)], procs)
            announce = ["--announce", relay["listen"]]
        servers.append(_child(["-m", "peer.cli", "join", "--coordinator", url, "--token", token, "--listen",
                               f"127.0.0.1:{port}", "--key", str(tmp / f"s{i}.key"), "--device", "cpu",
                               "--serve", arg, "--blocks", span, *announce], procs))
        servers[-1]["pid"] = procs[-1].pid
    client = InferenceClient(url, token)
    atexit.register(client.close)  # runs before the children are killed (atexit is LIFO)
    entry_points = sum(1 for arg, _ in serve if ",tp=" not in arg or ":0/" in arg)  # tp rank 0 leads
    deadline = time.monotonic() + 120
    while len(client.call(client.servers, "smollm2-135m")) < entry_points:
        if time.monotonic() > deadline:
            raise RuntimeError("the swarm never announced every span")
        time.sleep(0.5)

    def run(prompts: list[list[int]], new_tokens: int, on_first: Callable[[], None]) -> None:
        async def rows() -> None:
            steps = 0
            async for _ in client.arows("smollm2-135m", prompts, new_tokens):  # no stop id: always new_tokens
                steps += 1
                if steps == 1:
                    on_first()

        client.call(rows)

    def details() -> dict:
        """Per server: weight bytes it holds (its announcement); per hop of the last route: the
        client's measured round trip."""
        weights = [client.call(client.server_info, s["peer_id"], s["address"])["weight_bytes"] for s in servers]
        rtts = [client.host.link_stats(peer).rtt_s for peer, _, _ in client.last_route]
        decode = client.last_compute_s[1:]  # the servers' own timing of each decode step, summed over hops
        return {"server_weight_mb": [w / 2**20 for w in weights], "hop_rtt_ms": [r * 1e3 for r in rtts],
                "server_compute_ms": statistics.median(decode) * 1e3 if decode else None}

    run.server_pids = [s["pid"] for s in servers]
    run.details = details
    return run


PIPELINE = [("smollm2-135m", "0:10"), ("smollm2-135m", "10:20"), ("smollm2-135m", "20:30")]
WORKERS: dict[str, Callable[[], Runner]] = {
    "hf": bench_hf, "single": bench_single,
    "pipeline": lambda: bench_swarm(PIPELINE),                       # 3 stages, loopback
    "pipeline_10ms": lambda: bench_swarm(PIPELINE, delay_ms=10.0),   # 3 stages, +10 ms each way per hop
    "tp3": lambda: bench_swarm([(f"smollm2-135m,tp=b:{r}/3", "0:30") for r in range(3)]),  # tensor split K=3
}


def worker(kind: str) -> None:
    """Serve ``{"batch": B, "new_tokens": N}`` lines on stdin with one timed run each."""
    import torch

    run = WORKERS[kind]()
    print(json.dumps({"ready": kind, "threads": torch.get_num_threads()}), flush=True)
    pids = getattr(run, "server_pids", [])
    for line in sys.stdin:
        cmd = json.loads(line)
        prompts = prompt_ids(cmd["batch"])
        first: list[float] = []
        with PeakRSS(pids) as mem:
            t0 = time.perf_counter()
            run(prompts, cmd["new_tokens"], lambda: first.append(time.perf_counter()))
            total = time.perf_counter() - t0
        out = {"total_s": total, "ttft_s": first[0] - t0, "peak_rss_mb": mem.peak / 2**20,
               "server_peak_rss_mb": [mem.peaks[p] / 2**20 for p in pids]}
        if hasattr(run, "details"):
            out.update(run.details())
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self, kind: str, timeout: float = 1800.0):
        self.kind, self.timeout = kind, timeout
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = self._read()

    def _read(self) -> dict:
        # Timeout by a watchdog: a stuck worker is killed, which ends readline().
        timer = threading.Timer(self.timeout, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            raise RuntimeError(f"benchmark worker {self.kind} died (exit {self.proc.poll()})")
        return json.loads(line)

    def run(self, batch: int, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"batch": batch, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def summarize(kind: str, batch: int, new_tokens: int, runs: list[dict]) -> dict:
    total = statistics.median(r["total_s"] for r in runs)
    ttft = statistics.median(r["ttft_s"] for r in runs)
    row = {"kind": kind, "batch": batch, "new_tokens": new_tokens, "repeats": len(runs),
           "tok_s": batch * new_tokens / total, "decode_tok_s": batch * (new_tokens - 1) / (total - ttft),
           "ms_per_step": 1e3 * (total - ttft) / (new_tokens - 1), "ttft_s": ttft, "total_s": total,
           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}
    if runs[0]["server_peak_rss_mb"]:
        row["server_peak_rss_mb"] = [max(col) for col in zip(*(r["server_peak_rss_mb"] for r in runs))]
        row["server_weight_mb"] = runs[0]["server_weight_mb"]
        row["hop_rtt_ms"] = [statistics.median(col) for col in zip(*(r["hop_rtt_ms"] for r in runs))]
        row["server_compute_ms"] = statistics.median(r["server_compute_ms"] for r in runs)
    if "weight_mb" in runs[0]:
        row["weight_mb"] = runs[0]["weight_mb"]
    return row


def bench_interleaved(kinds: list[str], batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    workers = {k: Worker(k) for k in kinds}
    try:
        rows = []
        for batch in batches:
            for w in workers.values():
                w.run(batch, new_tokens)  # warm-up
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for rep in range(repeats):
                for k, w in workers.items():
                    runs[k].append(w.run(batch, new_tokens))
                    print(f"batch {batch} run {rep + 1}/{repeats} {k}: {runs[k][-1]}", file=sys.stderr, flush=True)
            rows += [summarize(k, batch, new_tokens, runs[k]) for k in kinds]
        return rows
    finally:
        for w in workers.values():
            w.close()


def ratios_vs(rows: list[dict], base: str = "hf") -> list[dict]:
    anchor = {r["batch"]: r for r in rows if r["kind"] == base}
    return [{"kind": r["kind"], "batch": r["batch"], "tok_s_ratio": r["tok_s"] / anchor[r["batch"]]["tok_s"],
             "ttft_ratio": r["ttft_s"] / anchor[r["batch"]]["ttft_s"],
             "run_ratios": [b["total_s"] / a["total_s"] for a, b in zip(r["runs"], anchor[r["batch"]]["runs"])]}
            for r in rows if r["kind"] != base and r["batch"] in anchor]


def targets(rows: list[dict], k: int = 3) -> list[dict]:
    """The issue's targets, each measured against its anchor in this run."""
    by = {(r["kind"], r["batch"]): r for r in rows}
    out = []

    def check(name: str, batch: int, value: float, limit: float, ok: bool, how: str) -> None:
        out.append({"target": name, "batch": batch, "value": value, "limit": limit, "pass": ok, "how": how})

    for (kind, batch), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        single = by.get(("single", batch))
        if kind == "single" and ("hf", batch) in by:
            v = r["tok_s"] / by[("hf", batch)]["tok_s"]
            check("single process >= 1.0x transformers", batch, v, 1.0, v >= 1.0, "tok/s ratio")
        if kind == "pipeline" and single:
            v = r["tok_s"] / single["tok_s"]
            check("3-stage loopback >= 0.8x single process", batch, v, 0.8, v >= 0.8, "tok/s ratio")
        if kind == "pipeline_10ms" and single:
            # compute = what the stage servers report for their forwards in this run: on this VM
            # a core idle between steps runs the next forward slower than one process that never
            # idles (closing note of issue 5), so the single-process time is shown beside it.
            rtts = sum(r["hop_rtt_ms"])
            v = r["ms_per_step"] / (r["server_compute_ms"] + rtts)
            check("10 ms delay: time per token <= 1.1x (compute + hop RTTs)", batch, v, 1.1, v <= 1.1,
                  f"{r['ms_per_step']:.1f} ms / ({r['server_compute_ms']:.1f} ms servers' compute + "
                  f"{' + '.join(f'{x:.1f}' for x in r['hop_rtt_ms'])} ms RTT); with single-process "
                  f"compute {single['ms_per_step']:.1f} ms: {r['ms_per_step'] / (single['ms_per_step'] + rtts):.3f}x")
        if kind == "tp3" and single and "weight_mb" in single:
            v = max(r["server_weight_mb"]) / single["weight_mb"]
            check(f"tensor split: per-peer weights <= 1/{k} + 10%", batch, v, 1 / k + 0.1, v <= 1 / k + 0.1,
                  f"largest peer {max(r['server_weight_mb']):.1f} MB / whole model {single['weight_mb']:.1f} MB")
    return out


def write_results(rows: list[dict], ratios: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    checks = targets(rows)
    (RESULTS / "inference.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios,
                                                        "targets": checks}, indent=2))
    lines = ["# Inference benchmark", "",
             f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), CPU, {meta['threads']} torch threads, "
             f"greedy, {meta['new_tokens']} new tokens, median of {meta['repeats']} interleaved runs after a "
             "warm-up.", "",
             "| kind | batch | tok/s | decode tok/s | ms/step | servers' compute ms/step | TTFT s | total s "
             "| peak RSS MB (worker) | servers: peak RSS MB | servers: weights MB | hop RTT ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]

    def nums(xs: list[float], fmt: str = ".0f") -> str:
        return " / ".join(f"{x:{fmt}}" for x in xs)

    for r in rows:
        lines.append(f"| {r['kind']} | {r['batch']} | {r['tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['ms_per_step']:.1f} | "
                     f"{'' if r.get('server_compute_ms') is None else format(r['server_compute_ms'], '.1f')} | "
                     f"{r['ttft_s']:.3f} | {r['total_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{nums(r.get('server_peak_rss_mb', []))} | "
                     f"{nums(r.get('server_weight_mb', [r['weight_mb']] if 'weight_mb' in r else []), '.1f')} | "
                     f"{nums(r.get('hop_rtt_ms', []), '.1f')} |")
    lines += ["", "| ours vs transformers | batch | tok/s ratio | TTFT ratio | per-pair speed ratios |",
              "|---|---:|---:|---:|---|"]
    for q in ratios:
        pairs = ", ".join(f"{x:.2f}" for x in q["run_ratios"])
        lines.append(f"| {q['kind']} | {q['batch']} | {q['tok_s_ratio']:.2f}x | {q['ttft_ratio']:.2f}x | {pairs} |")
    lines += ["", "| target | batch | measured | limit | pass | how |", "|---|---:|---:|---:|---|---|"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['batch']} | {c['value']:.3f} | {c['limit']:.3f} | "
                     f"{'yes' if c['pass'] else 'NO'} | {c['how']} |")
    lines += ["", "tok/s = batch x new tokens / total time (prefill included); ms/step = decode time per "
              "generated token (per step of the whole batch); peak RSS (worker) = the measuring process's "
              "resident memory during generation (for pipeline and tp3 that is the client); servers: each "
              "stage server's peak RSS (torch runtime included) and the bytes of weights it holds; hop RTT "
              "= the client's measured round trip to each server of the route; servers' compute = the stage servers' "
              "own timing of their forward per decode step (reply header compute_ms), summed over the route.", ""]
    (RESULTS / "inference.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", nargs="+", choices=sorted(WORKERS), default=list(WORKERS),
                    help="rows to run (hf is the anchor of the ratios)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    rows = bench_interleaved(args.kinds, args.batches, args.new_tokens, args.repeats)
    ratios = ratios_vs(rows)
    meta = {"new_tokens": args.new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_results(rows, ratios, meta)
    print((RESULTS / "inference.md").read_text())


if __name__ == "__main__":
    main()
