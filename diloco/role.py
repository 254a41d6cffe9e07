"""The ``train`` role plug-in: ``peer join --train RUN`` trains one model with DiLoCo over the mesh.

Entry points (pyproject.toml): ``[project.entry-points."lowband.roles"] train =
"diloco.role:TrainRole"``; its `peer join` flags come from the torch-free diloco/train_options.py
(group ``lowband.role_options``). The daemon calls ``TrainRole(run_name, options)`` and
``start(daemon)``.

What a peer does (coordinator routes: coordinator/runs.py, coordinator/checkpoint_routes.py):

1. Create-or-get the run: the first creator's ``RunConfig`` wins; a flag this peer set
   explicitly that disagrees with the stored config is an error. The coordinator assigns a data
   slot: the peer trains on shard ``slot`` of ``data_shards`` of the corpus (``--data`` or
   Shakespeare), continuing at the slot's stored position, so a successor or a restarted run
   picks up that slot's data stream where it stopped.
2. Get the global state, verified against its hash: a snapshot from a live peer that holds the
   current state (RPC ``diloco.snapshot``, content-addressed chunks, every header field
   validated, the state checked against the coordinator's agreed hash of the step the donor
   claims, never the donor's own: a bad donor is skipped), else the coordinator's latest
   checkpoint, else the bit-identical initialization from the run seed.
   A peer that took a live snapshot joins mid-run: its first outer step contributes a zero
   pseudo-gradient without an inner phase, so it reaches that step's rendezvous in time.
3. Loop: inner phase (H steps, or the ``inner_seconds`` wall-clock budget), rendezvous,
   all-reduce of the pseudo-gradient (``MeshAverager``), Nesterov outer step, report metrics,
   the global-state hash and the ids the final average ran over (the coordinator benches a
   participant missing from them: coordinator/benching.py). Only ``train`` peers may fetch a
   snapshot. With the run's ``robust`` mode on (the default, ``detect``),
   poisoned pseudo-gradients are excluded from the average; the offenses this peer caught as a
   shard owner are reported to the coordinator (peer id, reason, step, shard), which can ban
   the offender. Told to resync (late, or its hash lost the majority vote), it reloads from a
   donor. Every ``checkpoint_every`` steps the coordinator designates one participant to upload
   a checkpoint (params, outer momentum, step, config, hash) — only missing chunks.
4. Coordinator outage (docs/architecture.md §Coordinator outage: collectives go on with the last known membership):
   when the coordinator has not answered a rendezvous for ``OFFLINE_AFTER_S`` (refused, timed
   out, 5xx), the peers of the last completed average take the next steps without it, meeting
   over the mesh (``mesh.offline_rendezvous``); step reports queue up and are sent, oldest
   first, when it answers again, and a checkpoint upload keeps retrying until the next one is
   due. Rule (``TrainRole._rendezvous``): every step's collective tag is ``mesh.step_tag``
   (run, generation, step, base-state hash) in both modes, so peers that disagree about the
   coordinator still meet in the same all-reduce, whose agreement round settles one member
   list; offline steps go back to the coordinator only together, when the offline rendezvous
   finds that every participant reaches it again.

The trainer runs in its own thread; HTTP and collectives run on the daemon's asyncio loop. The
global state (fp32) lives on the CPU, the model and batches on the daemon's device.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Coroutine, TypeVar

from peer.blobs import CHUNK_SIZE, InvalidName, Manifest, check_run
from peer.errors import LowbandError
from peer.membership import CoordinatorError, CoordinatorUnavailable
from peer.progress import waiting

from .diloco import DiLoCo
from .errors import AveragingError, ConfigError, DiLoCoError, StateError
from .inner import InnerReport
from .mesh import (AverageStats, MeshAverager, NotAParticipant, Rendezvous, offline_rendezvous,
                   step_tag)
from .run_client import RunClient
from .run_config import RunConfig, build_model, build_optimizer, corpus_tokens, lm_loss, shard
from .state_io import build_manifest, global_tensors, pack, parse_snapshot, snapshot_from_tensors
from .train_options import TrainOptions

log = logging.getLogger("lowband.train")
T = TypeVar("T")

SNAPSHOT_METHOD = "diloco.snapshot"
SNAPSHOT_TIMEOUT_S = 300.0   # a donor may hold its state lock for one whole rendezvous
REQUEST_TIMEOUT_S = 60.0
LEAVE_TIMEOUT_S = 10.0
UPLOAD_ATTEMPTS = 3            # tries of a checkpoint upload the coordinator refuses (4xx)
UPLOAD_RETRY_MAX_S = 10.0      # longest pause between upload tries while it is unreachable
# A rendezvous the coordinator has not answered for this long goes on without it (a restart
# that quick is ridden out); a probe of it before an offline step waits this long at most.
OFFLINE_AFTER_S = 3.0
PROBE_TIMEOUT_S = 5.0
MAX_QUEUED_REPORTS = 10_000    # step reports kept for the coordinator (oldest dropped first)
AGREED_WAIT_S = 15.0           # how long a joiner waits for the coordinator to agree on a step
AGREED_POLL_S = 0.5


class Stopping(DiLoCoError):
    """The peer is shutting down; the training thread unwinds."""


class TrainRole:
    """One peer's part in training run ``run`` (see the module docstring)."""

    def __init__(self, run: str, options: dict[str, Any] | None = None) -> None:
        try:
            self.run = check_run(run)
        except InvalidName as e:
            raise ConfigError(str(e)) from None
        self.options = TrainOptions.from_options(options)
        RunConfig(**self.options.config)  # bad flag values fail before the peer joins
        self.daemon = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: RunClient | None = None
        self.config: RunConfig | None = None
        self.trainer: DiLoCo | None = None
        self.state_hash: str | None = None   # hash of the global state the trainer holds
        self.source = ""                     # where the state came from: seed/checkpoint/peer
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._state_lock = threading.Lock()  # held while the global state changes
        self._thread: threading.Thread | None = None
        self._step = 0                       # the outer step being synced
        self._checkpoint_due = False         # this peer uploads the checkpoint of _step
        self._generation = 1                 # the run's generation, as last heard
        self._view: list[str] | None = None  # members of the last completed average
        self._offline = False                # the coordinator does not lead the steps now
        self._rounds = (0, 0)                # (step, rendezvous at that step that led to an average)
        # (step, state hash, metrics, wall time of the step) not yet sent to the coordinator
        # (step, state hash, metrics, wall time of the step, ids the step's average ran over)
        self._reports: deque[tuple[int, str, dict, float, list[str]]] = deque(
            maxlen=MAX_QUEUED_REPORTS)
        self._report_lock = asyncio.Lock()   # one sender of the queue at a time
        self._answered = asyncio.Event()     # the coordinator answered since the last failure
        self._uploads: list[Future] = []

    # -- daemon lifecycle ----------------------------------------------------------------------
    async def start(self, daemon) -> None:
        """Join the run (a config conflict fails the peer's start, before READY), then train in
        a thread of its own."""
        self.daemon = daemon
        self.loop = asyncio.get_running_loop()
        # Same coordinator, key, credential and pinned TLS certificate as the daemon's session.
        self.client = daemon.client.derive(RunClient)
        try:
            answer = await self.client.join_run(
                self.run, RunConfig(**self.options.config).to_dict(), sorted(self.options.config))
            if answer["conflicts"]:
                detail = ", ".join(f"{k}: run has {v['stored']!r}, you asked {v['requested']!r}"
                                   for k, v in sorted(answer["conflicts"].items()))
                raise ConfigError(f"run {self.run} already exists with another config ({detail});"
                                  f" drop those flags to join it")
            self.config = RunConfig.from_dict(answer["config"])
        except BaseException:
            await self.client.close()
            raise
        daemon.host.handle(SNAPSHOT_METHOD, self._on_snapshot, roles=("train",))
        self._thread = threading.Thread(target=self._thread_main, args=(answer,),
                                        name=f"train-{self.run}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self.trainer is not None:
            self.trainer.averager.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 8.0)
        pending = [asyncio.wrap_future(f) for f in self._uploads if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        if self.client is not None:
            await self.client.close()

    # -- helpers -------------------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = REQUEST_TIMEOUT_S) -> T:
        """Run a coroutine on the daemon loop from the training thread and wait for it; a stop
        request cancels it (Stopping)."""
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        end = time.monotonic() + timeout
        while True:
            try:
                return fut.result(min(0.25, max(0.0, end - time.monotonic())))
            except FutureTimeout:
                if self._stop.is_set():
                    fut.cancel()
                    raise Stopping("the peer is stopping") from None
                if time.monotonic() >= end:
                    fut.cancel()
                    raise TimeoutError(f"no answer within {timeout:.0f}s") from None

    def _say(self, line: str, level: int = logging.INFO) -> None:
        """The role's own progress lines ("train RUN: step 4 loss ..."), through logging so
        ``--log-format json`` keeps them one JSON object per line."""
        log.log(level, "train %s: %s", self.run, line)

    def _thread_main(self, answer: dict[str, Any]) -> None:
        try:
            self._train(answer)
        except Stopping:
            pass
        except Exception as e:  # the peer stays up (serving snapshots); say why training stopped
            log.exception("training stopped")
            self._say(f"stopped: {type(e).__name__}: {e}", logging.ERROR)
        finally:
            self.finished.set()
            try:  # it joined the run: stop being waited for
                asyncio.run_coroutine_threadsafe(self._leave(), self.loop).result(LEAVE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - best effort; liveness covers the rest
                log.warning("could not leave run %s: %s", self.run, e)

    async def _leave(self) -> None:
        try:
            await self._send_reports()
        except LowbandError as e:
            log.warning("%d step reports not sent: %s", len(self._reports), e)
        await self.client.leave_run(self.run)

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self, answer: dict[str, Any]) -> None:
        """Model, optimizer, data shard and trainer from the run config (in the training thread:
        tokenizing a corpus and building a model take a while)."""
        assert self.client is not None and self.daemon is not None and self.config is not None
        cfg = self.config
        device = self.daemon.device
        tokens = corpus_tokens(cfg, self.options.data)
        data = shard(cfg, tokens, answer["slot"], answer["slots"], device)
        data.position = int(answer["slot_position"])
        self._generation = int(answer["generation"])
        model = build_model(cfg).to(device)
        optimizer, scheduler = build_optimizer(cfg, model)
        averager = MeshAverager(self.daemon.host, self.loop, self._rendezvous, codec=cfg.codec,
                                zstd=cfg.zstd, membership=lambda: list(self.daemon.mesh),
                                robust=cfg.robust_config())
        self.trainer = DiLoCo(model, optimizer, data, lm_loss, averager, cfg.outer_config(),
                              scheduler=scheduler)
        self.state_hash = self.trainer.global_state_hash()
        self._say(f"{'created' if answer['created'] else 'joined'} run (preset {cfg.preset}, "
                  f"H={cfg.inner_steps}, codec {cfg.codec}, robust {cfg.robust}), data slot "
                  f"{answer['slot']}/{answer['slots']} at batch {data.position}, device {device}")

    # -- global state --------------------------------------------------------------------------
    def _load(self, tensors: dict, step: int, expected_hash: str, source: str) -> None:
        """Adopt a global state if it hashes to ``expected_hash``; otherwise keep the old one
        (also when it does not fit the model: ``load_snapshot`` may fail half way)."""
        assert self.trainer is not None
        with self._state_lock:
            previous = self.trainer.snapshot()
            try:
                self.trainer.load_snapshot(snapshot_from_tensors(tensors, step))
                got = self.trainer.global_state_hash()
                if got != expected_hash:
                    raise StateError(f"state from {source} hashes to {got[:12]}, expected "
                                     f"{expected_hash[:12]}; not adopted")
            except StateError:
                self.trainer.load_snapshot(previous)
                raise
            self.state_hash = got
        self.source = source
        self._say(f"state from {source}: step {step} hash {got}")

    def _from_peer(self, donor: str) -> None:
        """Adopt a donor's snapshot if it hashes to the coordinator's agreed hash of the step it
        claims (never the hash the donor itself sends: a lying donor's state would pass)."""
        assert self.daemon is not None
        # one RPC answer: nothing to count until it arrives, so the elapsed time is shown
        with waiting(f"train {self.run}: state from peer {donor[:12]}", logger=log):
            header, payload = self._call(
                self.daemon.host.call(donor, SNAPSHOT_METHOD, {"run": self.run}, b"",
                                      timeout=SNAPSHOT_TIMEOUT_S), SNAPSHOT_TIMEOUT_S + 10)
        manifest, tensors = parse_snapshot(self.run, header, payload)
        self._load(tensors, manifest.step, self._agreed_hash(manifest.step), f"peer {donor[:12]}")

    def _agreed_hash(self, step: int) -> str:
        """The coordinator's agreed hash of the global state after ``step``
        (``state_hashes`` of ``GET /api/runs/RUN``, coordinator/votes.py). For the run's
        current step the donors' own reports may still be on their way: ask again for
        ``AGREED_WAIT_S``; any other step without one fails at once (a donor claiming a step
        the run never reached wastes no time)."""
        assert self.client is not None
        end = time.monotonic() + AGREED_WAIT_S
        while True:
            info = self._call(self.client.run_info(self.run))
            hashes = info.get("state_hashes")
            agreed = hashes.get(str(step)) if isinstance(hashes, dict) else None
            if isinstance(agreed, str) and len(agreed) == 64:
                return agreed
            if step != info.get("step") or time.monotonic() >= end:
                raise StateError(f"the coordinator has no agreed state hash for step {step} of "
                                 f"run {self.run}; the donor's state cannot be verified")
            if self._stop.wait(AGREED_POLL_S):
                raise Stopping("the peer is stopping")

    def _from_checkpoint(self) -> bool:
        assert self.client is not None
        manifest = self._call(self.client.latest_manifest(self.run))
        if manifest is None:
            return False
        expected = manifest.meta.get("global_state_hash")
        if not isinstance(expected, str):
            raise StateError(f"checkpoint {manifest.step} of run {self.run} has no "
                             f"global_state_hash in its meta; it was not written by a train peer")
        tensors = self._call(self.client.download_checkpoint(manifest), 3600)
        self._load(tensors, manifest.step, expected, f"checkpoint {manifest.step}")
        return True

    def _acquire(self, donors: list[dict]) -> bool:
        """Adopt the run's current state; True when it came from a live peer (a mid-run join)."""
        if self._from_donors([d["peer_id"] for d in donors]):
            return True
        if self._from_checkpoint():
            return False
        self.source = "seed"
        self._say(f"state from seed {self.config.seed}: hash {self.state_hash}")
        return False

    def _from_donors(self, donors: list[str]) -> bool:
        me = self.daemon.peer_id
        for donor in [d for d in donors if d != me]:
            try:
                self._from_peer(donor)
                return True
            except (LowbandError, TimeoutError) as e:  # every donor field is validated: skip it
                log.warning("snapshot from %s failed: %s", donor[:12], e)
        return False

    def _resync(self, donors: list[str]) -> bool:
        """Reload from a donor; True when done. With no reachable donor the peer keeps its
        state (a checkpoint would be older than the run) and the coordinator decides again at
        the next rendezvous."""
        if not donors:
            try:
                donors = [d["peer_id"] for d in self._call(self.client.run_info(self.run))["donors"]]
            except (LowbandError, TimeoutError) as e:
                log.warning("cannot ask for donors: %s", e)
        if self._from_donors(donors):
            return True
        self._say("no donor reachable; keeping this peer's state")
        return False

    async def _on_snapshot(self, peer_id: str, header: dict, payload: bytes) -> tuple[dict, bytes]:
        if header.get("run") != self.run or self.trainer is None:
            raise StateError(f"this peer does not train run {header.get('run')!r}")
        manifest, chunks = await asyncio.to_thread(self._snapshot_blob)
        head = json.dumps(manifest.to_dict()).encode()
        return ({"manifest_bytes": len(head), "chunk_size": CHUNK_SIZE},
                head + pack(manifest, chunks))

    def _snapshot_blob(self) -> tuple[Manifest, dict[str, memoryview]]:
        assert self.trainer is not None
        with self._state_lock:
            snap = self.trainer.snapshot()
            step, state_hash = self.trainer.outer_steps, self.state_hash
        return build_manifest(self.run, step, global_tensors(snap),
                              meta={"global_state_hash": state_hash})

    # -- the outer loop ------------------------------------------------------------------------
    async def _rendezvous(self, tag: str) -> Rendezvous:
        """Who averages outer step ``_step``, under which collective tag.

        The coordinator leads while it answers. When it has not answered for
        ``OFFLINE_AFTER_S`` (and this peer has completed a step, so it knows whom to meet;
        ``tag``, the trainer's, is not used: every peer derives its own), the step is taken
        offline over ``mesh.offline_rendezvous`` with the members of the last completed average,
        and so are the next ones, until an offline rendezvous finds that every participant
        reaches the coordinator again: then all of them ask it for that same step.

        Tag rule: ``mesh.step_tag(run, generation, step, base hash)`` in both modes, suffixed
        ``.rN`` for this peer's N-th rendezvous at that step (a retry after a failed average never
        reads the failed one's messages). Peers that disagree about the coordinator (one got the
        closed window's answer just before a crash, another gave up on it) thus run the same
        all-reduce; if their member lists differ, its agreement round settles one list and the
        result is bit-identical over whoever took part. Only peers with the same base state
        share a tag. A split is still possible when the coordinator answers some peers and not
        others for a whole ``sync_timeout_s`` (its window closes without the silent ones, their
        offline rendezvous without the others): the base-hash vote of the next coordinator-led
        step then resyncs the minority, as for any late peer.
        """
        assert self.client is not None and self.config is not None and self.state_hash
        step, base = self._step, self.state_hash
        # Only a rendezvous that led to an average counts: a call answered "not a participant"
        # sent nothing under its tag, and counting it would give this peer another tag than
        # peers meeting at this step for the first time.
        n = self._rounds[1] + 1 if self._rounds[0] == step else 1
        suffix = f".r{n}" if n > 1 else ""
        collective = step_tag(self.run, self._generation, step, base) + suffix
        me, every = self.daemon.peer_id, self.config.checkpoint_every
        votes = 0
        while True:
            if self._offline:
                votes += 1
                # Back means: it answers this role, and the daemon heartbeats again (a peer the
                # restarted coordinator still holds for suspect would not count in its window).
                reachable = (await self._reach_coordinator() and self.daemon.registered
                             and self.daemon.coordinator_reachable)
                participants, back = await offline_rendezvous(
                    self.daemon.host, self._view, f"{collective}.v{votes}", reachable=reachable,
                    wait_s=self.config.sync_timeout_s, membership=lambda: self.daemon.mesh)
                if not back:
                    self._checkpoint_due = bool(every and step % every == 0
                                                and participants[0] == me)
                    self._rounds = (step, n)
                    return Rendezvous(participants, collective)
                self._offline = False
                self._say(f"outer step {step}: all {len(participants)} peers reach the "
                          f"coordinator again; it leads the steps from here")
            try:
                # After the peers agreed it is back, their window waits sync_timeout_s for this
                # one: going offline alone sooner would split the group.
                answer = await self.client.sync(
                    self.run, step, base, deadline_s=self.config.outer_config().average_timeout_s,
                    unavailable_s=(self.config.sync_timeout_s if votes else OFFLINE_AFTER_S)
                    if self._view else None)
                break
            except CoordinatorUnavailable as e:
                self._answered.clear()
                if not self._view:
                    raise
                self._offline = True
                self._say(f"outer step {step}: coordinator unreachable ({e}); going on with the "
                          f"{len(self._view)} peers of the last average")
        self._answered.set()
        self._generation = int(answer["generation"])
        self._checkpoint_due = bool(answer["checkpoint"])
        if not answer["participant"]:
            bench = answer.get("bench") or {}
            why = ("arrived late" if answer["late"] else
                   "state hash lost the majority vote" if answer["majority_hash"] != base else
                   f"benched until step {bench['until_step']} (it was counted in an average it "
                   f"did not take part in)" if bench.get("until_step", 0) >= step else
                   "newcomers wait for a free place in a window" if "bench" in answer else
                   "the coordinator did not count this peer as live")
            raise NotAParticipant(f"outer step {step}: {why}",
                                  [d["peer_id"] for d in answer.get("donors", [])], answer["late"])
        self._rounds = (step, n)
        return Rendezvous(answer["participants"],
                          step_tag(self.run, self._generation, step, base) + suffix)

    async def _reach_coordinator(self) -> bool:
        """Whether the coordinator answers now (a refusal is an answer): it gets the queued step
        reports, or, with none queued, a request for the run's state."""
        try:
            if self._reports:
                await asyncio.wait_for(self._send_reports(), PROBE_TIMEOUT_S)
            else:
                await asyncio.wait_for(self.client.run_info(self.run), PROBE_TIMEOUT_S)
        except (CoordinatorUnavailable, asyncio.TimeoutError):
            return False
        except CoordinatorError:
            pass
        return not self._reports

    async def _send_reports(self) -> None:
        """Send the queued step reports, oldest first. Raises ``CoordinatorUnavailable`` when
        the coordinator does not answer (the rest stay queued); a report it refuses is dropped."""
        async with self._report_lock:
            while self._reports:
                step, state_hash, metrics, at, averaged = self._reports[0]
                # The coordinator dates the report back by the time it waited here.
                metrics = {**metrics, "queued_s": round(max(0.0, time.time() - at), 3)}
                try:
                    await self._report(step, state_hash, metrics, averaged)
                except CoordinatorUnavailable:
                    self._answered.clear()
                    raise
                except CoordinatorError as e:
                    log.warning("report for step %d refused: %s", step, e)
                self._answered.set()
                self._reports.popleft()

    async def _report(self, step: int, state_hash: str, metrics: dict,
                      averaged: list[str]) -> dict:
        """One step report, with ``averaged``: the peers the final average ran over (the fault
        layer's survivors), which the coordinator compares with the window's participants to
        bench silent ones (coordinator/benching.py)."""
        assert self.client is not None
        # (a stats-less step has no member list to send)
        return await self.client.report(self.run, step, state_hash, metrics,
                                        averaged if self.daemon.peer_id in averaged else None)

    def _inner_phase(self) -> InnerReport:
        """H inner steps, or as many as fit in ``inner_seconds``; one step at a time so that a
        stop request is honoured between steps."""
        cfg, trainer = self.config, self.trainer
        t0, steps, loss = time.perf_counter(), 0, 0.0
        while True:
            report = trainer.run_inner(steps=1)
            steps += 1
            loss += report.mean_loss
            if self._stop.is_set():
                raise Stopping("the peer is stopping")
            if cfg.inner_seconds:
                if time.perf_counter() - t0 + report.step_time_s > cfg.inner_seconds:
                    break
            elif steps >= cfg.inner_steps:
                break
        return InnerReport(steps, time.perf_counter() - t0, loss / steps, report.step_time_s)

    def _train(self, answer: dict[str, Any]) -> None:
        self._setup(answer)
        joining = self._acquire(answer["donors"])
        cfg, trainer = self.config, self.trainer
        assert cfg is not None and trainer is not None
        while not self._stop.is_set():
            if cfg.total_steps and trainer.outer_steps >= cfg.total_steps:
                self._say(f"done at step {trainer.outer_steps} hash {self.state_hash}")
                return
            self._step = trainer.outer_steps + 1
            t0 = time.perf_counter()
            inner = None
            if joining:
                trainer.contribute_zero_next()
            else:
                inner = self._inner_phase()
            t1 = time.perf_counter()
            try:
                with self._state_lock:
                    report = trainer.outer_step()
                    self.state_hash = trainer.global_state_hash()
            except NotAParticipant as e:
                self._say(f"{e}; resyncing")
                joining = self._resync(e.donors)
                continue
            except AveragingError as e:
                if self._stop.is_set():
                    return
                self._say(f"outer step {self._step} failed ({e}); resyncing")
                joining = self._resync([])
                continue
            joining = False
            self._after_step(report.outer_step, inner, t0, t1, time.perf_counter(),
                             report.participants or 1)

    def _after_step(self, step: int, inner, t0: float, t1: float, t2: float,
                    participants: int) -> None:
        cfg, trainer = self.config, self.trainer
        stats = trainer.averager.last
        tokens = (inner.steps if inner else 0) * cfg.batch_size * cfg.seq_len
        inner_s = inner.seconds if inner else 0.0
        metrics = {"tokens": tokens, "tokens_per_s": tokens / inner_s if inner_s else 0.0,
                   "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received,
                   "outer_time_s": t2 - t1, "inner_time_s": inner_s,
                   "compute_utilization": inner_s / (t2 - t0) if t2 > t0 else 0.0,
                   "inner_steps": inner.steps if inner else 0, "participants": participants,
                   "data_position": trainer.inner.data.position}
        if inner is not None:
            metrics["loss"] = inner.mean_loss
        if self._offline:
            metrics["offline"] = 1
        # Queued, then sent at once while the coordinator leads (the next rendezvous may break a
        # tie with it); offline, the next offline rendezvous sends the queue (its probe).
        self._reports.append((step, self.state_hash, metrics, time.time(), sorted(stats.members)))
        if not self._offline:
            try:
                self._call(self._send_reports())
            except (LowbandError, TimeoutError) as e:  # training goes on; the report stays queued
                log.warning("report for step %d not sent yet: %s", step, e)
        # The next offline rendezvous meets these peers (an offender excluded here is not one).
        excluded = {o.peer for o in stats.offenders}
        self._view = [p for p in stats.members if p not in excluded]
        self._report_offenses(step, stats)
        self.loop.call_soon_threadsafe(self.daemon.report, "train", {
            "run": self.run, "step": step, "tokens_per_s": metrics["tokens_per_s"]})
        loss = f"{inner.mean_loss:.4f}" if inner else "-"
        self._say(f"step {step} loss {loss} | {metrics['tokens_per_s']:,.0f} tok/s | "
                  f"sent {stats.bytes_sent / 1024:,.1f} KiB recv {stats.bytes_received / 1024:,.1f}"
                  f" KiB | {participants} peers | outer {t2 - t1:.2f}s | hash {self.state_hash[:16]}"
                  + (" | offline" if self._offline else ""))
        if self._checkpoint_due:
            self._checkpoint(step)

    def _report_offenses(self, step: int, stats: AverageStats) -> None:
        """Say who the robust all-reduce excluded; report what this peer caught itself to the
        coordinator (best effort, like metrics: a lost report only delays a ban)."""
        for o in stats.offenders:
            self._say(f"step {step}: excluded peer {o.peer}: {o.reason()}")
        if not stats.caught or self._offline:  # offline nobody hears it; it stays excluded anyway
            return
        # The shard index lets the coordinator check this peer owned the shard it screened.
        offenses = [{"peer_id": o.peer, "code": o.code, "detail": o.detail, "shard": o.shard}
                    for o in stats.caught]
        try:
            answer = self._call(self.client.report_offenses(self.run, step, offenses))
        except (LowbandError, TimeoutError) as e:
            log.warning("offense report for step %d failed: %s", step, e)
            return
        for peer in answer.get("banned", []):
            self._say(f"step {step}: coordinator banned peer {peer}")

    def _checkpoint(self, step: int) -> None:
        """Upload the state of ``step`` in the background (training goes on meanwhile)."""
        with self._state_lock:
            snap = self.trainer.snapshot()
            state_hash = self.state_hash
        manifest, chunks = build_manifest(
            self.run, step, global_tensors(snap),
            config=dataclasses.asdict(self.config.model_config),
            meta={"global_state_hash": state_hash, "outer_step": step,
                  "run_config": self.config.to_dict(),
                  "data_position": self.trainer.inner.data.position})
        self._uploads = [f for f in self._uploads if not f.done()]
        self._uploads.append(asyncio.run_coroutine_threadsafe(
            self._upload(manifest, chunks), self.loop))

    async def _upload(self, manifest, chunks) -> None:
        """Upload a checkpoint; while the coordinator does not answer, keep trying (pauses
        doubling up to ``UPLOAD_RETRY_MAX_S``, cut short when another request gets an answer)
        until the next checkpoint is due, which supersedes this one, so an outage leaves no
        hole in the cadence. Other failures (a refusal, a bad manifest) get
        ``UPLOAD_ATTEMPTS`` tries."""
        assert self.client is not None and self.trainer is not None and self.config is not None
        next_due = manifest.step + self.config.checkpoint_every
        failures, pause, t0 = 0, 1.0, time.monotonic()
        while True:
            try:
                done = await self.client.upload_checkpoint(manifest, chunks)
                break
            except (LowbandError, DiLoCoError) as e:
                unavailable = isinstance(e, CoordinatorUnavailable)
                failures += not unavailable
                if failures >= UPLOAD_ATTEMPTS or self._stop.is_set():
                    self._say(f"checkpoint step {manifest.step} not uploaded ({e}); "
                              f"gave up after {time.monotonic() - t0:.0f}s")
                    return
                log.warning("checkpoint %d upload failed (%s); trying again in %.0fs",
                            manifest.step, e, pause)
            if unavailable:  # an answer to another request ends the pause early
                self._answered.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._answered.wait(), pause)
            else:
                await asyncio.sleep(pause)
            pause = min(2 * pause, UPLOAD_RETRY_MAX_S)
            if self.trainer.outer_steps >= next_due:
                self._say(f"checkpoint step {manifest.step} not uploaded in "
                          f"{time.monotonic() - t0:.0f}s; superseded by step {next_due}'s")
                return
        self._say(f"checkpoint step {manifest.step} uploaded ({done['chunks_sent']} chunks "
                  f"sent, {done['chunks_skipped']} already there) after "
                  f"{time.monotonic() - t0:.1f}s")
