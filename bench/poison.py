"""Poisoned updates: DiLoCo training with 1 of 4 peers malicious, with and without defences, and
what the robust all-reduce costs next to the ring.

    .venv/bin/python bench/poison.py [--attacks flip,huge,nan] [--defences none,detect,trimmed,cclip]
                                     [--outer 10] [--inner 10] [--timing-numel 25000000]

Four worker processes on loopback (testing.links), each a real PeerHost, train a tiny Llama
(pipeline.model.LlamaConfig.tiny, byte tokens) with DiLoCo on disjoint Shakespeare shards
(diloco.data), averaging pseudo-gradients through diloco.mesh.MeshAverager -> collectives
all_reduce (int8). Runs, all from the same seed: clean (ring, plain mean); then per attack, the
last worker poisons every pseudo-gradient it sends while the defence is
  none:    the ring (plain mean, no screening: the damage),
  detect:  RobustConfig() -- screening at the shard owners, offenders excluded, mean of the rest,
  trimmed: RobustConfig(detect=False, aggregate="trimmed_mean") and
  cclip:   RobustConfig(detect=False, aggregate="centered_clip") -- no exclusion by norm or
           direction, a robust aggregator over every decodable contribution.
Attacks: flip (sends -delta), huge (delta x 1e3), nan (a crafted payload whose scales are NaN:
the sender's codec check is bypassed, as a malicious peer would). Worker 0 (honest) evaluates the
global model on a held-out shard after every outer step; the acceptance check is final eval loss
within 5% of the clean run's at the same step. Then all-reduce timing of --timing-numel fp32
values (int8 on the wire): ring vs robust modes, medians of repeats (slowest rank per repeat).
Writes bench/results/poison.json and poison.md (docs/architecture.md §Measuring performance).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import check, write_results  # noqa: E402
from testing.baselines.workers import mesh_go, report, run_workers, slowest_per_repeat, start_mesh_host  # noqa: E402
from testing.poison import PoisoningAverager, install_payload_poisoner  # noqa: E402

ATTACKS = ("flip", "huge", "nan")
DEFENCES = ("none", "detect", "trimmed", "cclip")
N_HOSTS = 4
EVAL_SHARDS = N_HOSTS + 1   # shard N_HOSTS of the corpus is held out for evaluation
_TIMEOUT_S = 1800.0


# ----------------------------------------------------------------------------- worker (one host)
def _robust_config(defence: str, offenders: list):
    from collectives import RobustConfig

    hook = lambda peer, reason: offenders.append((peer, reason))  # noqa: E731
    options = {"detect": {}, "trimmed": {"detect": False, "aggregate": "trimmed_mean"},
               "cclip": {"detect": False, "aggregate": "centered_clip"}}
    return RobustConfig(on_offender=hook, **options[defence]) if defence in options else None


def _train(run: dict, args, ctx: dict) -> dict:
    """One training run on this worker (its own thread; collectives on the host's loop)."""
    import torch

    from diloco import DiLoCo
    from diloco.mesh import MeshAverager, Rendezvous
    from diloco.run_config import build_model, build_optimizer, lm_loss, shard

    cfg, peers, rank = ctx["cfg"], ctx["peers"], args.rank
    model = build_model(cfg)
    opt, sched = build_optimizer(cfg, model)
    data = shard(cfg, ctx["tokens"], rank, EVAL_SHARDS, "cpu")
    offenders: list = []
    robust = _robust_config(run["defence"], offenders)

    async def rendezvous(tag: str) -> Rendezvous:
        return Rendezvous(peers, f"{run['name']}.{tag}")

    options = {"robust": robust} if robust is not None else {}
    mesh = MeshAverager(ctx["host"], ctx["loop"], rendezvous, codec="int8", **options)
    malicious = run["attack"] is not None and rank == N_HOSTS - 1
    averager = PoisoningAverager(mesh, run["attack"]) if malicious else mesh
    trainer = DiLoCo(model, opt, data, lm_loss, averager, cfg.outer_config(), scheduler=sched)
    curve, reduce_s, error = [], [], None
    for _ in range(args.outer):
        trainer.run_inner(steps=args.inner)
        try:
            trainer.outer_step()
        except Exception as exc:  # noqa: BLE001 - the damage an undefended run takes is a result
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            break
        reduce_s.append(mesh.last.reduce_s)
        if rank == 0:
            curve.append(_eval_loss(model, ctx["eval"], lm_loss, torch))
    return {"curve": curve, "error": error, "reduce_s": reduce_s, "hash": trainer.global_state_hash()[:16],
            "offenders": sorted({(p[:8], r.split(" ")[0]) for p, r in offenders})}


def _eval_loss(model, batches, lm_loss, torch) -> float:
    with torch.no_grad():
        loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    return loss if math.isfinite(loss) else float("inf")


async def _timing(host, peers: list[str], args) -> dict:
    import hashlib

    import torch

    from collectives import Group, RobustConfig, all_reduce

    group = Group(host, peers)
    x = torch.randn(args.timing_numel, generator=torch.Generator().manual_seed(args.rank))
    modes = {"ring": None, "robust detect+mean": RobustConfig(),
             "robust trimmed_mean": RobustConfig(detect=False, aggregate="trimmed_mean"),
             "robust centered_clip": RobustConfig(detect=False, aggregate="centered_clip")}
    times, digests = {}, {}
    await all_reduce(group, [x[:1 << 20]], tag="t-warm", codec="int8")
    for k, (name, robust) in enumerate(modes.items()):
        times[name] = []
        for rep in range(args.repeats):
            await all_reduce(group, [x[:1]], tag=f"t-barrier-{k}-{rep}", codec="fp32")
            start = time.perf_counter()
            out = await all_reduce(group, [x], tag=f"t-{k}-{rep}", codec="int8", robust=robust)
            times[name].append(time.perf_counter() - start)
        digests[name] = hashlib.sha256(out[0].numpy().tobytes()).hexdigest()[:16]
        del out
    return {"times": times, "digests": digests}


async def _worker(args: argparse.Namespace) -> None:
    import torch

    from diloco.run_config import RunConfig, corpus_tokens
    from diloco.data import TokenShards

    torch.set_num_threads(1)  # four workers share two cores
    host, go = await start_mesh_host(args.address, args.token, args.rank)
    cfg = RunConfig(preset="tiny", inner_steps=args.inner, seq_len=args.seq_len, batch_size=args.batch,
                    warmup_steps=args.inner, seed=1)
    tokens = corpus_tokens(cfg, None)
    held_out = TokenShards(tokens, EVAL_SHARDS, N_HOSTS, cfg.seq_len, 16, seed=cfg.seed)
    ctx = {"cfg": cfg, "peers": go["peers"], "host": host, "loop": asyncio.get_running_loop(), "tokens": tokens,
           "eval": [held_out.next_batch() for _ in range(args.eval_batches)]}
    runs = {}
    for run in json.loads(args.runs):
        crafting = run["attack"] == "nan" and args.rank == N_HOSTS - 1
        honest_again = install_payload_poisoner(host) if crafting else None
        t0 = time.perf_counter()
        runs[run["name"]] = {**await asyncio.to_thread(_train, run, args, ctx), "seconds": time.perf_counter() - t0}
        if honest_again is not None:
            honest_again()
    timing = await _timing(host, go["peers"], args) if args.timing_numel else {}
    await asyncio.to_thread(report, {"rank": args.rank, "runs": runs, **timing})
    await host.close()


# ----------------------------------------------------------------------------- parent
def _runs(attacks: list[str], defences: list[str]) -> list[dict]:
    runs = [{"name": "clean", "attack": None, "defence": "none"}]
    return runs + [{"name": f"{a}-{d}", "attack": a, "defence": d} for a in attacks for d in defences]


def _training_rows(runs: list[dict], results: list[dict], outer: int) -> tuple[list[dict], list[dict]]:
    by_rank = sorted(results, key=lambda r: r["rank"])
    clean = by_rank[0]["runs"]["clean"]["curve"]
    rows, checks = [], []
    for run in runs:
        per_rank = [r["runs"][run["name"]] for r in by_rank]
        mine = per_rank[0]
        steps = len(mine["curve"])
        final = mine["curve"][-1] if mine["curve"] else float("inf")
        ratio = final / clean[steps - 1] if steps and math.isfinite(final) else float("inf")
        honest = per_rank[:N_HOSTS - 1]
        reported = sorted({tuple(o) for r in honest for o in r["offenders"]})
        errors = [r["error"] for r in per_rank if r["error"]]
        rows.append({"run": run["name"], "attack": run["attack"] or "-", "defence": run["defence"],
                     "outer steps done": steps, "final eval loss": final,
                     "vs clean (same step)": ratio if run["attack"] else 1.0,
                     "offenders reported (honest peers)": ", ".join(f"{p}:{c}" for p, c in reported) or "-",
                     "same hash all peers": len({r["hash"] for r in per_rank}) == 1,
                     "avg reduce s": sum(mine["reduce_s"]) / max(1, len(mine["reduce_s"])),
                     "run s": mine["seconds"], "error": errors[0][:120] if errors else "-"})
        if run["attack"] and run["defence"] != "none":
            full = ratio if steps == outer else float("inf")
            checks.append(check(f"{run['name']}: final eval loss / clean at step {outer}", full, 1.05,
                                higher_is_better=False))
    return rows, checks


def _timing_rows(results: list[dict], numel: int) -> list[dict]:
    modes = list(results[0]["times"])
    summary = {m: slowest_per_repeat([r["times"][m] for r in results]) for m in modes}
    ring = summary["ring"]["median"]
    return [{"mode": m, "numel": numel, "wire": "int8", "median s": s["median"], "min s": s["min"],
             "vs ring": s["median"] / ring, "bit-identical": len({r["digests"][m] for r in results}) == 1,
             "repeats": len(s["samples"])} for m, s in summary.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", default="flip,huge,nan")
    parser.add_argument("--defences", default="none,detect,trimmed,cclip")
    parser.add_argument("--outer", type=int, default=10)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--timing-numel", type=int, default=25_000_000, help="0 skips the timing part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="poison", help="results file stem under bench/results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--rank", "--address", "--token", "--runs"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.rank = int(args.rank)
        asyncio.run(_worker(args))
        return 0
    from testing.links import open_links

    attacks, defences = args.attacks.split(","), args.defences.split(",")
    if not set(attacks) <= set(ATTACKS) or not set(defences) <= set(DEFENCES):
        parser.error(f"attacks must be among {ATTACKS}, defences among {DEFENCES}")
    runs = _runs(attacks, defences)
    token = secrets.token_hex(16)
    passthrough = ["--outer", str(args.outer), "--inner", str(args.inner),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--eval-batches",
                   str(args.eval_batches), "--timing-numel", str(args.timing_numel), "--repeats", str(args.repeats)]

    def argv(i: int) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--worker", "--rank", str(i), "--address",
                links.address(i), "--token", token, "--runs", json.dumps(runs), *passthrough]

    t0 = time.perf_counter()
    with open_links("loopback", N_HOSTS) as links:
        results = run_workers(links, argv, mesh_go(links), timeout=_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    train_rows, checks = _training_rows(runs, results, args.outer)
    tables = {"Training with 1 of 4 peers malicious": train_rows, "Acceptance": checks}
    if args.timing_numel:
        tables["All-reduce cost on loopback (4 peers)"] = _timing_rows(results, args.timing_numel)
    for rows in tables.values():
        for row in rows:
            print(row, flush=True)
    notes = [f"tiny Llama (LlamaConfig.tiny, byte tokens), DiLoCo H={args.inner}, {args.outer} outer steps, "
             f"batch {args.batch} x {args.seq_len} tokens, int8 all-reduce over 4 PeerHost processes on "
             f"loopback; worker {N_HOSTS - 1} is the malicious one; eval = mean loss of {args.eval_batches} "
             f"batches of 16 from the held-out shard {N_HOSTS} of {EVAL_SHARDS}; wall time {elapsed:.0f} s.",
             "'trimmed' / 'cclip' = RobustConfig(detect=False, aggregate='trimmed_mean' / 'centered_clip'): no "
             "exclusion by norm/direction; undecodable/non-finite contributions are still excluded (they cannot "
             "be averaged), hence offenders are reported for 'nan' only.",
             "Timing: one fp32 tensor, int8 on the wire, 2 shared cores; sample = slowest rank of a repeat."]
    json_path, md_path = write_results(args.name, {"args": vars(args), "runs": runs, "raw": results},
                                       tables, notes)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
