"""Streaming DiLoCo: fragments synced on a staggered schedule, each all-reduce overlapping
tau inner steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .averager import Averager
from .base import OuterConfig, OuterTrainer, InFlight
from .errors import ConfigError, StateError
from .fragments import strided_fragments
from .inner import BatchSource, InnerReport, LossFn


@dataclass(frozen=True)
class StreamingSchedule:
    """Which fragment launches / syncs after inner step s (s = 1, 2, ...).

    Fragment f has offset o_f = f*H/P and syncs after step s when s >= 1 and
    (s - o_f) % H == 0 (fragment 0 at H, 2H, ...; fragment f first at f*H/P). Its all-reduce is
    launched tau steps earlier, after step s - tau. With tau < H/P, a fragment's all-reduce
    starts after the previous fragment's sync, so at most one is on the wire at a time."""

    inner_steps: int   # H
    fragments: int     # P
    overlap_steps: int  # tau

    def __post_init__(self) -> None:
        H, P, tau = self.inner_steps, self.fragments, self.overlap_steps
        if H < 1 or P < 1:
            raise ConfigError(f"need H >= 1 and P >= 1, got H={H}, P={P}")
        if H % P:
            raise ConfigError(f"H ({H}) must be a multiple of the number of fragments P ({P}) so "
                              f"that fragment offsets f*H/P are whole steps")
        if not 0 <= tau < H // P:
            raise ConfigError(f"overlap tau ({tau}) must satisfy 0 <= tau < H/P = {H // P}: a "
                              f"fragment's all-reduce must start after the previous one synced")

    def offset(self, fragment: int) -> int:
        return fragment * self.inner_steps // self.fragments

    def sync_fragment(self, step: int) -> int | None:
        if step < 1:
            return None
        stride = self.inner_steps // self.fragments
        k = step % self.inner_steps
        return k // stride if k % stride == 0 else None

    def launch_fragment(self, step: int) -> int | None:
        return self.sync_fragment(step + self.overlap_steps) if step >= 1 else None


@dataclass
class StreamingConfig(OuterConfig):
    inner_steps: int = 100   # H: each fragment syncs every H inner steps
    fragments: int = 4       # P
    overlap_steps: int = 1   # tau: inner steps each fragment's all-reduce overlaps
    alpha: float = 0.5       # local <- (1 - alpha) * global_new + alpha * local at a sync
    # Spread each fragment's all-reduce over this fraction of its overlap window (tau steps at
    # the measured step time) instead of bursting at the link's rate: a lower peak outgoing
    # rate for the same bytes. 0 = no pacing.
    pace: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.pace < 1:
            raise ConfigError(f"pace must be in [0, 1) (a fraction of the overlap window), got {self.pace}")
        StreamingSchedule(self.inner_steps, self.fragments, self.overlap_steps)


@dataclass(frozen=True)
class SyncReport:
    fragment: int
    launch_step: int    # inner step after which the pseudo-gradient snapshot was taken
    sync_step: int      # inner step after which the outer step was applied
    participants: int | None
    waited_s: float


@dataclass(frozen=True)
class StreamingReport:
    inner: InnerReport
    syncs: list[SyncReport] = field(default_factory=list)


class StreamingDiLoCo(OuterTrainer):
    """Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping
    communication: Towards a Distributed Free Lunch").

    Parameters are split into P fragments (default: `strided_fragments`, blocks by index mod P,
    embedding/norm/head to the smallest fragments). Each fragment f has its own fp32 global copy
    theta_f and momentum v_f. With the schedule of `StreamingSchedule`, after inner step s:

        launch (s = sync step - tau):  Delta_f = theta_f - theta_m,f   (snapshot now)
                                       start averaging Delta_f; training continues
        sync:                          Delta = awaited mean of Delta_f
                                       v_f <- mu*v_f + Delta ; theta_f <- theta_f - lr*(Delta + mu*v_f)
                                       theta_m,f <- (1 - alpha)*theta_f + alpha*theta_m,f

    theta_m,f at the sync has trained tau steps past the snapshot; alpha keeps part of that
    progress (alpha = 0 replaces the fragment with the global copy). Outer gradients can be sent
    4-bit with error feedback (`feedback_codec="int4"`). Global state is identical on every peer.
    With `pace` > 0 each fragment's all-reduce is spread over that fraction of its overlap
    window (tau steps at the measured step time), lowering the peak outgoing rate further.
    P = 1, tau = 0, alpha = 0 is DiLoCo with blocking outer steps.
    """

    config: StreamingConfig

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer,
                 data: BatchSource, loss_fn: LossFn, averager: Averager,
                 config: StreamingConfig | None = None, *,
                 fragments: list[list[str]] | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        config = config or StreamingConfig()
        if fragments is None:
            fragments = strided_fragments(model, config.fragments)
        elif len(fragments) != config.fragments:
            raise ConfigError(f"config.fragments = {config.fragments} but {len(fragments)} "
                              f"fragments were given")
        super().__init__(model, inner_optimizer, data, loss_fn, averager, config, fragments,
                         scheduler=scheduler)
        self.schedule = StreamingSchedule(config.inner_steps, config.fragments,
                                          config.overlap_steps)
        self.fragments = fragments
        self.syncs_done = [0] * config.fragments
        self._inflight: tuple[int, int, InFlight] | None = None  # (fragment, launch step, avg)
        self._reports: list[SyncReport] = []

    @property
    def step(self) -> int:
        """Inner steps taken by the group so far (the schedule's clock)."""
        return self.inner.steps_done

    def run_inner(self, steps: int | None = None,
                  seconds: float | None = None) -> StreamingReport:  # type: ignore[override]
        """Train `steps` inner steps (default H) or for `seconds`; fragments sync on schedule."""
        if steps is None and seconds is None:
            steps = self.config.inner_steps
        self._reports = []
        inner = super().run_inner(steps=steps, seconds=seconds)
        return StreamingReport(inner, self._reports)

    def _after_inner_step(self, step: int) -> None:
        f = self.schedule.launch_fragment(step)
        if f is not None:
            if self._inflight is not None:
                raise StateError(f"fragment {self._inflight[0]} still in flight at step {step}")
            tag = f"{self.config.tag_prefix}/frag{f}/sync{step + self.config.overlap_steps}"
            self._inflight = (f, step, self._launch(f, tag, self._window_s()))
        g = self.schedule.sync_fragment(step)
        if g is not None:
            self._sync(g, step)

    def _window_s(self) -> float | None:
        """Seconds to spread a fragment's average over (``config.pace``), once steps are timed."""
        step_s = self.inner.step_time_s
        if not self.config.pace or step_s is None:
            return None
        return self.config.pace * self.config.overlap_steps * step_s

    def _sync(self, fragment: int, step: int) -> None:
        if self._inflight is None or self._inflight[0] != fragment:
            raise StateError(f"fragment {fragment} due to sync at step {step} was never launched")
        _, launch_step, inflight = self._inflight
        waited0 = self.waited_s
        average, participants = self._resolve(inflight)
        copy = self.copies[fragment]
        copy.step(average, self.config.outer_lr, self.config.outer_momentum)
        copy.write_local(self.config.alpha)
        self._inflight = None
        self.syncs_done[fragment] += 1
        self._reports.append(SyncReport(fragment, launch_step, step, participants,
                                        self.waited_s - waited0))

    def finish(self) -> SyncReport | None:
        """Apply the fragment still in flight now (end of training) instead of at its sync step."""
        if self._inflight is None:
            return None
        self._reports = []
        self._sync(self._inflight[0], self.step)
        return self._reports[0]

    # -- state ---------------------------------------------------------------------------------
    def _shared_state(self) -> dict[str, Any]:
        inflight = None
        if self._inflight is not None:
            f, launch_step, avg = self._inflight
            average, participants = self._resolve(avg)
            inflight = {"fragment": f, "launch_step": launch_step, "average": average,
                        "participants": participants, "tag": avg.tag}
        return {"step": self.step, "syncs_done": list(self.syncs_done), "inflight": inflight,
                "schedule": [self.config.inner_steps, self.config.fragments,
                             self.config.overlap_steps],
                "fragments": self.fragments}

    def _load_shared_state(self, snap: dict[str, Any]) -> None:
        if list(snap["schedule"]) != [self.config.inner_steps, self.config.fragments,
                                      self.config.overlap_steps]:
            raise StateError(f"snapshot schedule (H, P, tau) = {snap['schedule']} differs from "
                             f"this trainer's")
        if [list(f) for f in snap["fragments"]] != [list(f) for f in self.fragments]:
            raise StateError("snapshot fragments differ from this trainer's")
        self.inner.steps_done = int(snap["step"])
        self.syncs_done = list(snap["syncs_done"])
        p = snap["inflight"]
        self._inflight = None if p is None else (
            p["fragment"], p["launch_step"],
            InFlight.resolved(p["average"], p["participants"],
                               [torch.zeros_like(a) for a in p["average"]], p["tag"]))
