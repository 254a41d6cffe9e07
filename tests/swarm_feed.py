"""Test helper: simulated peers that speak the coordinator's real HTTP API (signed requests through
the real clients, peer.membership / diloco.run_client) so the status page and /metrics get known
data -- a training run with reported losses and a checkpoint, model servers with a coverage gap --
without running models. Membership-only peers are real `peer join` daemons in the tests."""
from __future__ import annotations

import asyncio
import math

import torch

from diloco.run_client import RunClient
from diloco.state_io import build_manifest
from peer.identity import Identity

RUN = "status-demo"
MODEL = "smollm2-135m"
N_LAYERS = 30
# Two servers cover blocks 0-23; blocks 24-29 are the gap the page must highlight.
SERVE_SPANS = ((0, 12), (12, 24))


def loss_at(step: int) -> float:
    """A plausible decreasing loss curve (what the plot must show)."""
    return round(2.0 + 8.0 * math.exp(-step / 4), 4)


def trainer_state(step: int):
    """(manifest, chunks) of the run's state after ``step``: one parameter and its outer
    momentum, as the train role stores them, its trainer hash in the meta (the hash the peers
    report, which the coordinator checks a checkpoint against)."""
    from coordinator.checkpoints import MOMENTUM_PREFIX, trainer_state_hash

    tensors = {"w": torch.arange(4096, dtype=torch.float32) + step,
               MOMENTUM_PREFIX + "w": torch.zeros(4096)}
    bare, chunks = build_manifest(RUN, step, tensors)
    meta = {"global_state_hash": trainer_state_hash(bare, lambda sha: bytes(chunks[sha])),
            "outer_step": step}
    return build_manifest(RUN, step, tensors, meta=meta)


def state_hash(step: int) -> str:
    return trainer_state(step)[0].meta["global_state_hash"]


class SimPeer:
    """One identity, one client; heartbeats in a background task with fixed stats."""

    def __init__(self, url: str, token: str, index: int, stats: dict | None = None) -> None:
        self.client = RunClient(url, token, Identity.generate(), timeout=30)
        self.address = f"127.0.0.{10 + index}:{7100 + index}"
        self.stats = stats or {}
        self._task: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        return self.client.identity.peer_id

    async def start(self, roles: list[str], interval: float) -> None:
        await self.client.join(self.address, {"device": "cpu", "memory": 4 << 30, "roles": roles,
                                              "throughput": 2.5e10})
        await self.client.heartbeat(self.stats)

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.client.heartbeat(self.stats)

        self._task = asyncio.create_task(beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()


async def start_servers(url: str, token: str, interval: float) -> list[SimPeer]:
    peers = []
    for i, (start, end) in enumerate(SERVE_SPANS):
        serve = {"model": MODEL, "n_layers": N_LAYERS, "blocks": [start, end], "sessions": 1 + i,
                 "tokens_per_s": 12.5 * (i + 1)}
        peer = SimPeer(url, token, 20 + i, {"serve": serve})
        await peer.start(["serve"], interval)
        peers.append(peer)
    return peers


async def train(url: str, token: str, steps: int, interval: float, n: int = 2) -> list[SimPeer]:
    """n trainers join the run, then for each outer step rendezvous (sync) and report loss,
    tokens, bytes and the (agreed) state hash; finally one uploads a checkpoint."""
    peers = [SimPeer(url, token, i) for i in range(n)]
    for p in peers:
        await p.start(["train"], interval)
        await p.client.join_run(RUN, {"sync_timeout_s": 20, "checkpoint_every": 0}, [])
    base = "0" * 64
    for step in range(1, steps + 1):
        await asyncio.gather(*(p.client.sync(RUN, step, base, deadline_s=30) for p in peers))
        for k, p in enumerate(peers):
            await p.client.report(RUN, step, state_hash(step), {
                "loss": loss_at(step) + 0.05 * k, "tokens": 4096, "tokens_per_s": 800.0,
                "bytes_sent": 250_000, "bytes_received": 250_000, "compute_utilization": 0.85,
                "participants": n})
        base = state_hash(step)
    await peers[0].client.upload_checkpoint(*trainer_state(steps))
    return peers
