"""Peer-side HTTP client of the coordinator's run and checkpoint routes (coordinator/runs.py,
coordinator/checkpoint_routes.py). Every request is signed by the peer's key like any other
coordinator request (peer/membership.py, peer/reqsign.py), chunk uploads included (the body hash
is signed), so nobody can act as another peer in a rendezvous or upload in its name."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any
from urllib.parse import quote

from torch import Tensor

from peer.blobs import Manifest, ManifestError
from peer.membership import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from peer.progress import Progress

from .errors import StateError
from .state_io import tensors_from_chunks

log = logging.getLogger("lowband.train")

# The coordinator holds a rendezvous request up to 15 s (runs.HOLD_S); allow for that plus slack.
SYNC_REQUEST_TIMEOUT_S = 40.0
RATE_LIMIT_RETRIES = 5


class RunClient(CoordinatorClient):
    """``CoordinatorClient`` plus the run and checkpoint calls of one peer. A daemon's role gets
    one with ``daemon.client.derive(RunClient)`` (same coordinator, key, credential, TLS pin)."""

    def __init__(self, url: str | None, token: str | bytes | None = None, identity=None, *,
                 timeout: float = SYNC_REQUEST_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(url, token, identity, timeout=timeout, **kwargs)

    async def _post(self, path: str, fields: dict) -> dict:
        """A signed POST; asked to slow down (429: rate or capacity limit), it waits and asks
        again a few times (every run request is idempotent)."""
        retries = 0
        while True:
            try:
                return await self._request("POST", path, fields)
            except CoordinatorError as e:
                if e.status != 429 or retries == RATE_LIMIT_RETRIES:
                    raise
            retries += 1
            await asyncio.sleep(random.uniform(0.5, 1.5))

    # -- runs ----------------------------------------------------------------------------------
    async def join_run(self, run: str, config: dict, explicit: list[str]) -> dict:
        """Create-or-get ``run``: the stored config (the creator's), ``conflicts`` with the
        ``explicit`` keys of ``config``, this peer's data ``slot``/``slot_position``, the run's
        ``step``, ``latest_checkpoint`` and current ``donors``."""
        return await self._post(f"/runs/{quote(run)}", {"config": config, "explicit": explicit})

    async def sync(self, run: str, step: int, base_hash: str, *, deadline_s: float,
                   unavailable_s: float | None = None) -> dict:
        """Rendezvous for outer step ``step``: asks again while the window is open (answers
        are idempotent) and rides out a coordinator restart, until ``deadline_s``. With
        ``unavailable_s``, raises ``CoordinatorUnavailable`` once the coordinator has not
        answered at all (refused, timed out, 5xx; a 4xx is an answer) for that long, so the
        caller can go on without it."""
        now = time.monotonic()
        end = now + deadline_s
        delay = 0.25
        down_since: float | None = None
        while True:
            try:
                answer = await self._post(f"/runs/{quote(run)}/sync",
                                          {"step": step, "base_hash": base_hash})
                if not answer.get("pending"):
                    return answer
                delay, down_since = 0.25, None
            except CoordinatorUnavailable:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now + delay > end or (unavailable_s is not None
                                         and now + delay - down_since > unavailable_s):
                    raise
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(2 * delay, 5.0)
            if time.monotonic() > end:
                raise CoordinatorUnavailable(f"rendezvous for step {step} of run {run} did not "
                                             f"close within {deadline_s:.0f}s")

    async def report(self, run: str, step: int, state_hash: str, metrics: dict,
                     averaged: list[str] | None = None) -> dict:
        """Report the global-state hash after outer step ``step``; ``averaged``: the peers the
        final average ran over, which the coordinator checks against the window's participants
        (coordinator/benching.py)."""
        body = {"step": step, "state_hash": state_hash, "metrics": metrics}
        if averaged is not None:
            body["averaged"] = averaged
        return await self._post(f"/runs/{quote(run)}/report", body)

    async def report_offenses(self, run: str, step: int, offenses: list[dict]) -> dict:
        """Report the peers this peer caught sending a poisoned pseudo-gradient at outer step
        ``step`` (``[{peer_id, code, detail}]``); the answer lists those now ``banned``."""
        return await self._post(f"/runs/{quote(run)}/offenses",
                                {"step": step, "offenses": offenses})

    async def leave_run(self, run: str) -> dict:
        return await self._post(f"/runs/{quote(run)}/leave", {})

    async def run_info(self, run: str) -> dict:
        return await self._request("GET", f"/runs/{quote(run)}")

    # -- checkpoints ---------------------------------------------------------------------------
    async def _raw(self, method: str, path: str, data: bytes | memoryview | None = None) -> bytes:
        """A request whose body and/or answer are raw bytes; errors as in ``_request``."""
        status, body = await self._send(method, path, data)
        if status >= 500:
            raise CoordinatorUnavailable(f"coordinator {self.url}: HTTP {status}", status=status)
        if status >= 400:
            raise CoordinatorError(f"coordinator {self.url}: HTTP {status}: "
                                   f"{body[:300].decode('utf-8', 'replace')}", status=status)
        return body

    async def latest_manifest(self, run: str) -> Manifest | None:
        """The run's newest checkpoint manifest, or None when it has none."""
        try:
            data = await self._raw("GET", f"/runs/{quote(run)}/checkpoints/latest")
        except CoordinatorError as e:
            if e.status == 404:
                return None
            raise
        try:
            return Manifest.from_json(data)
        except ManifestError as e:
            raise StateError(f"coordinator sent an invalid manifest: {e}") from e

    async def download_checkpoint(self, manifest: Manifest) -> dict[str, Tensor]:
        """The tensors of ``manifest``, every chunk fetched once and verified."""
        shas = manifest.chunk_shas()
        chunks = {}
        with Progress(f"checkpoint {manifest.run}@{manifest.step} download", len(shas), "chunks",
                      logger=log) as progress:
            for sha in shas:
                chunks[sha] = await self._raw("GET", f"/runs/{quote(manifest.run)}/chunks/{sha}")
                progress.update()
        return tensors_from_chunks(manifest, chunks.__getitem__)

    async def upload_checkpoint(self, manifest: Manifest,
                                chunks: dict[str, memoryview]) -> dict[str, Any]:
        """Upload the chunks the coordinator lacks (so a retried upload resumes), then publish
        the manifest. Returns counts of chunks sent/skipped and bytes sent."""
        run = quote(manifest.run)
        todo = (await self._request("POST", f"/runs/{run}/checkpoints/missing",
                                    {"shas": list(chunks)}))["missing"]
        sent = 0
        with Progress(f"checkpoint {manifest.run}@{manifest.step} upload",
                      sum(len(chunks[sha]) for sha in todo), logger=log) as progress:
            for sha in todo:
                await self._raw("PUT", f"/runs/{run}/chunks/{sha}", bytes(chunks[sha]))
                sent += len(chunks[sha])
                progress.update(len(chunks[sha]))
        await self._request("PUT", f"/runs/{run}/checkpoints/{manifest.step}", manifest.to_dict())
        return {"chunks_sent": len(todo), "chunks_skipped": len(chunks) - len(todo),
                "bytes_sent": sent}
