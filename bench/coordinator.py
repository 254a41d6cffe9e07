"""Coordinator scale benchmark: N simulated peers heartbeating at 1 Hz against a real coordinator.

    .venv/bin/python bench/coordinator.py [--peers 1000] [--duration 40] [--clients 4]

A real `coordinator start` process is spawned (closed swarm, --token; address and admission rate
limits raised, since every simulated peer shares 127.0.0.1). N Ed25519 identities are spread over
a few client processes; each simulated peer is admitted with a token proof, joins, then sends a
heartbeat once per second at its own random phase, every request signed as a `peer join`
daemon signs it (peer/reqsign.py: signature, nonce, body hash, checked against the replay guard), carrying small stats (throughput, uptime, a few links)
and, like the daemon, the id of the peer list it holds -- so the ~110 kB list of 1,000 peers
travels only after a membership change, not in every answer.

Reported, over the steady window after every peer has joined and heartbeated once:
- client-observed heartbeat latency p50/p90/p99/max (request sent -> whole answer read);
- the coordinator's own view: its /metrics heartbeat histogram (handler time, bucketed);
- coordinator CPU (% of one core, from /proc/<pid>/stat utime+stime), heartbeats/s, errors;
- whether each simulated peer was still ``active`` at the end.
Target (issue 4): p99 < 50 ms at 1,000 peers, 1 Hz. Writes bench/results/coordinator.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import check, cpu_seconds, write_results  # noqa: E402
from peer.admission import ADMIT_PATH, token_proof  # noqa: E402
from peer.identity import Identity  # noqa: E402
from peer.reqsign import sign_headers  # noqa: E402

TOKEN = "bench-coordinator-token-8bbb684e46ead0203aded096000f297db881cb69"
P99_TARGET_S = 0.050


# -- load generator (runs in client processes) ------------------------------------------------------
async def _post(session: aiohttp.ClientSession, url: str, path: str, identity: Identity,
                fields: dict) -> tuple[int, bytes]:
    """One signed POST, as a daemon sends it (signing is part of the measured cost)."""
    data = json.dumps(fields).encode()
    headers = {"Content-Type": "application/json",
               **sign_headers(identity, "POST", path, data, with_key=path == ADMIT_PATH)}
    async with session.post(url + path, data=data, headers=headers) as resp:
        return resp.status, await resp.read()


async def _simulate(url: str, n: int, index: int, stop, out) -> dict:
    """Join ``n`` peers (each heartbeats once per second from right after its own join, at its own
    phase, like a daemon); tell the parent when all have joined; stop when ``stop`` is set."""
    rng = random.Random(index)
    identities = [Identity.generate() for _ in range(n)]
    ids = [i.peer_id for i in identities]
    samples: list[tuple[float, float]] = []   # (send time, latency)
    errors: dict[str, int] = {}
    joined = 0
    views: list[str | None] = [None] * n
    full_lists = 0   # heartbeat answers that carried the peer list (membership changed)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        gate = asyncio.Semaphore(16)

        async def join(k: int) -> None:
            nonlocal joined
            meta = {"device": "cpu", "memory": 8 << 30, "roles": ["train"], "throughput": 1e10}
            for attempt in range(5):  # a loaded machine may time a join out: retry like a daemon
                try:
                    async with gate:
                        ident = identities[k]
                        status, answer = await _post(session, url, ADMIT_PATH, ident, {
                            "token_proof": token_proof(TOKEN, ident.public_bytes)})
                        if status != 200:
                            raise RuntimeError(f"admit answered HTTP {status}: {answer[:300]!r}")
                        status, answer = await _post(session, url, "/api/join", ident, {
                            "address": f"127.0.{index}.{k % 250 + 1}:{7000 + k}", "meta": meta})
                    if status != 200:
                        raise RuntimeError(f"join answered HTTP {status}: {answer[:300]!r}")
                    views[k] = json.loads(answer)["view"]
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    if attempt == 4:
                        raise
            joined += 1
            if joined == n:
                out.put(("joined", index, time.time()))

        async def peer_loop(k: int) -> None:
            nonlocal full_lists
            await join(k)
            identity = identities[k]
            others = rng.sample(ids, min(3, len(ids)))
            next_at = time.time() + rng.random()
            while not stop.is_set():
                await asyncio.sleep(max(0.0, next_at - time.time()))
                stats = {"throughput": 1e10, "mesh_size": n, "uptime_s": round(time.time() - started, 3),
                         "links": {o: {"connected": True, "ping_rtt_s": 0.0004, "rtt_s": 0.0004,
                                       "bandwidth_Bps": 1.2e9} for o in others if o != identity.peer_id}}
                sent = time.time()
                t0 = time.perf_counter()
                try:
                    status, answer = await _post(session, url, "/api/heartbeat", identity,
                                                 {"stats": stats, "view": views[k]})
                    if status in (404, 410):  # declared dead: join again, as the daemon does
                        errors[f"HTTP {status} (rejoined)"] = errors.get(f"HTTP {status} (rejoined)", 0) + 1
                        await join(k)
                    elif status == 200:
                        samples.append((sent, time.perf_counter() - t0))
                        # Like the daemon: keep the view id; the list comes only when it changed.
                        views[k] = json.loads(answer)["view"]
                        full_lists += b'"peers"' in answer
                    else:
                        errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                next_at = max(next_at + 1.0, time.time())  # a late answer skips slots, no bursts

        started = time.time()
        await asyncio.gather(*(peer_loop(k) for k in range(n)))
    return {"samples": samples, "errors": errors, "cpu_s": sum(os.times()[:2]),
            "full_lists": full_lists}


def _client_main(url: str, n: int, index: int, stop, out) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        out.put(("result", index, asyncio.run(_simulate(url, n, index, stop, out))))
    except Exception as e:  # the parent reports it instead of waiting for a result forever
        out.put(("failed", index, f"client {index}: {type(e).__name__}: {e}"))


# -- measurement helpers --------------------------------------------------------------------------
def cpu_pressure() -> float | None:
    """Linux PSI: % of the last minute in which some runnable task waited for a CPU -- how much
    other work on this shared machine competed with the benchmark. None where unavailable."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return float(first.split("avg60=")[1].split()[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def scrape(url: str) -> dict:
    """The coordinator's heartbeat histogram buckets and peers per state, from its /metrics;
    empty when it does not answer in time (a starved coordinator must not abort the run)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    except (OSError, TimeoutError):
        return {"buckets": {}, "peers": {}}
    buckets = {}
    for s in families["lowband_coordinator_request_seconds"].samples:
        if (s.name.endswith("_bucket") and s.labels.get("route") == "/api/heartbeat"
                and s.labels.get("method") == "POST"):
            buckets[float(s.labels["le"])] = s.value
    peers = {s.labels["state"]: s.value for s in families["lowband_coordinator_peers"].samples}
    return {"buckets": buckets, "peers": peers}


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q (cumulative counts)."""
    total = buckets.get(float("inf"), 0)
    if not total:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


def bucket_delta(after: dict, before: dict) -> dict:
    return {le: after[le] - before.get(le, 0) for le in after}


def start_coordinator(data_dir: Path, interval: float, timeout: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "start", "--port", "0", "--data-dir", str(data_dir),
         "--token", TOKEN, "--heartbeat-interval", str(interval), "--peer-timeout", str(timeout),
         # every simulated peer shares 127.0.0.1: the per-address limits would throttle the swarm
         "--address-rate", "100000", "--admit-rate", "1000", "--max-peers-per-address", "0",
         "--no-probe", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return proc, json.loads(line[6:])["url"]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("coordinator did not become ready")


# -- main -----------------------------------------------------------------------------------------
def run(peers: int, duration: float, clients: int, warmup: float) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="lowband-bench-coord-"))
    coord, url = start_coordinator(data_dir, 1.0, 10.0)
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    shares = [peers // clients + (1 if i < peers % clients else 0) for i in range(clients)]
    procs = [ctx.Process(target=_client_main, args=(url, n, i, stop, out)) for i, n in enumerate(shares)]
    try:
        launched = time.time()
        for p in procs:
            p.start()
        last_join = launched
        for _ in procs:  # every simulated peer has joined (and is heartbeating)
            kind, index, info = out.get(timeout=600)
            if kind == "failed":
                raise RuntimeError(info)
            last_join = max(last_join, info)
        time.sleep(warmup)
        window_start = time.time()
        cpu0, wall0, hist0 = cpu_seconds(coord.pid), time.monotonic(), scrape(url)["buckets"]
        time.sleep(duration)
        cpu1, wall1 = cpu_seconds(coord.pid), time.monotonic()
        window_end = time.time()
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        pressure = cpu_pressure()
        final = scrape(url)
        stop.set()
        results = []
        for _ in procs:
            kind, index, info = out.get(timeout=120)
            if kind == "failed":
                raise RuntimeError(info)
            results.append(info)
        coord_hist = bucket_delta(final["buckets"], hist0)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        coord.terminate()
        try:
            coord.wait(timeout=20)
        except subprocess.TimeoutExpired:
            coord.kill()
        shutil.rmtree(data_dir, ignore_errors=True)

    latencies = [lat for r in results for sent, lat in r["samples"] if window_start <= sent < window_end]
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    cpu_pct = None if cpu0 is None or cpu1 is None else 100 * (cpu1 - cpu0) / (wall1 - wall0)
    return {
        "config": {"peers": peers, "heartbeat_hz": 1.0, "duration_s": duration, "warmup_s": warmup,
                   "client_processes": clients},
        "all_joined_after_s": round(last_join - launched, 2),
        "heartbeats_in_window": len(latencies),
        "heartbeats_per_s": round(len(latencies) / duration, 1),
        "latency_ms": {"p50": 1e3 * percentile(latencies, 0.50), "p90": 1e3 * percentile(latencies, 0.90),
                       "p99": 1e3 * percentile(latencies, 0.99), "max": 1e3 * max(latencies),
                       "mean": 1e3 * statistics.fmean(latencies)},
        "coordinator_handler_ms": {q: (None if (v := histogram_quantile(coord_hist, float(q[1:]) / 100)) is None
                                       else 1e3 * v) for q in ("p50", "p99")},
        "coordinator_handler_buckets": {str(k): v for k, v in sorted(coord_hist.items())},
        "coordinator_cpu_percent_of_one_core": None if cpu_pct is None else round(cpu_pct, 1),
        # CPU the coordinator spent per heartbeat answered: what it costs regardless of how much
        # of the machine it got (heartbeats are ~all of its work in the window).
        "coordinator_cpu_ms_per_heartbeat": None if cpu_pct is None or not latencies else
        round(10 * cpu_pct * duration / len(latencies), 3),
        "client_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "answers_with_full_peer_list": sum(r["full_lists"] for r in results),
        "errors": errors,
        "machine_loadavg_at_window_end": load,
        "machine_cpu_pressure_avg60_pct": pressure,
        "peers_by_state_at_end": final["peers"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=40.0, help="measured seconds (default 40)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first (default 5)")
    parser.add_argument("--clients", type=int, default=4, help="load-generator processes (default 4)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep bench/results as is")
    args = parser.parse_args(argv)
    result = run(args.peers, args.duration, args.clients, args.warmup)
    lat = result["latency_ms"]
    rows = [check(f"heartbeat p99 at {args.peers} peers x 1 Hz (client-observed)", lat["p99"],
                  P99_TARGET_S * 1e3, higher_is_better=False, unit="ms"),
            check("heartbeats/s served / offered", result["heartbeats_per_s"] / args.peers, 0.95, unit="ratio"),
            check("errors", sum(result["errors"].values()), 0, higher_is_better=False, unit="requests")]
    latency_rows = [{"quantity": k, "ms": round(v, 2)} for k, v in lat.items()]
    latency_rows += [{"quantity": f"coordinator handler {q} (bucket upper bound)", "ms": v}
                     for q, v in result["coordinator_handler_ms"].items()]
    context = [{"quantity": "coordinator CPU, % of one core", "value": result["coordinator_cpu_percent_of_one_core"]},
               {"quantity": "coordinator CPU per heartbeat, ms", "value": result["coordinator_cpu_ms_per_heartbeat"]},
               {"quantity": "heartbeats/s in window", "value": result["heartbeats_per_s"]},
               {"quantity": "load-generator CPU, s", "value": result["client_cpu_s"]},
               {"quantity": "machine load average (1, 5, 15 min) at window end",
                "value": json.dumps(result["machine_loadavg_at_window_end"])},
               {"quantity": "machine CPU pressure (PSI some avg60, %)",
                "value": result["machine_cpu_pressure_avg60_pct"]},
               {"quantity": "peers by state at end", "value": json.dumps(result["peers_by_state_at_end"])}]
    notes = ["Latency is measured by the load generator: signed heartbeat sent -> whole answer "
             "read. The load generator shares the machine's cores with the coordinator, so its "
             "own scheduling delay is included; the coordinator handler histogram (from its "
             "/metrics) excludes it.",
             "Errors count the whole run (join phase included); latencies the measured window.",
             "CPU % is utime+stime of the coordinator process over the measured window."]
    print(json.dumps({k: v for k, v in result.items() if k != "coordinator_handler_buckets"}, indent=2))
    if not args.no_write:
        paths = write_results("coordinator", result, {"Checks": rows, "Heartbeat latency": latency_rows,
                                                      "Context": context}, notes)
        print("wrote", *paths)
    return 0 if all(r["result"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
