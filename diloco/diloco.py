"""DiLoCo with blocking, one-step-delayed, or eager outer steps."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .averager import Averager
from .base import OuterConfig, OuterTrainer, InFlight
from .errors import AveragingError, ConfigError, StateError
from .inner import BatchSource, InnerReport, LossFn


class OuterMode(str, Enum):
    BLOCKING = "blocking"
    DELAYED = "delayed"
    EAGER = "eager"


@dataclass
class DiLoCoConfig(OuterConfig):
    inner_steps: int = 100  # H: default inner-phase length when run_inner gets no bound
    mode: OuterMode = OuterMode.BLOCKING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1, got {self.inner_steps}")
        try:
            self.mode = OuterMode(self.mode)
        except ValueError as e:
            raise ConfigError(f"mode must be one of {[m.value for m in OuterMode]}, got "
                              f"{self.mode!r}") from e


@dataclass(frozen=True)
class OuterReport:
    outer_step: int
    applied: bool              # whether an average was applied to the global params
    participants: int | None   # peers in the applied average, when the averager reports it
    waited_s: float            # time blocked waiting for averages in this call


class DiLoCo(OuterTrainer):
    """DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models"), with the outer-step overlap of Kale, Douillard & Donchev 2025 ("Eager
    Updates For Overlapped Communication and Computation in DiLoCo").

    M peers, global fp32 params theta, outer momentum v (both on `outer_device`), local model
    theta_m. One round = `run_inner(...)` then `outer_step()`:

        theta_m <- theta                               (end of the previous outer step)
        H inner steps: theta_m <- InnerOpt(theta_m)    (optimizer state kept across rounds)
        Delta_m = theta - theta_m                      (pseudo-gradient: global minus local)
        Delta   = mean over participants of Delta_m    (Averager; a joiner sends zeros once)
        v <- mu*v + Delta ; theta <- theta - lr*(Delta + mu*v)   (SGD Nesterov, torch semantics)

    Modes (`DiLoCoConfig.mode`), with Delta^(t) the mean of round t and Delta_m^(t) this peer's
    own contribution (exactly what it sent):

    - blocking: the rule above; the peer waits for Delta^(t) before the next inner phase.
    - delayed: the average of round t is launched and the next inner phase starts at once; outer
      step t applies Delta^(t-1) (the average launched one round earlier, which had a whole
      inner phase to arrive): theta <- Nesterov(theta, Delta^(t-1)). Round 1 applies nothing.
      Every peer applies the same averages, so the global state stays identical across peers.
    - eager (Kale, Douillard & Donchev 2025, "eager updates"): outer step t applies
          G_m^(t) = Delta^(t-1) - w_(t-1) * Delta_m^(t-1) + w_t * Delta_m^(t),   w_t = 1/N_t,
      which, with a steady group of N peers, is the paper's estimate of the mean Delta^(t)
                  = Delta_m^(t)/N + (1/N) * sum_{k != m} Delta_k^(t-1):
      this peer's own term fresh, the other peers' terms one round late (the average launched
      at step t is still in flight), theta <- Nesterov(theta, G_m^(t)). The correction for the
      guess happens when Delta^(t) has arrived, at the next outer step (a fixed point of the
      schedule, never "whenever it arrives"): that estimate takes out exactly the own term
      w_t * Delta_m^(t) applied eagerly and puts in the true mean, so summed over rounds the
      estimates equal the sum of the true means plus the last own term; `finish()` applies the
      final correction Delta^(T) - w_T * Delta_m^(T).
      N_t is the participant count reported with Delta^(t-1), a number every peer agrees on.
      Round 1 has no earlier average (Delta^(0) = 0, so G_m^(1) = Delta_m^(1)/N_1) and no agreed
      count: it waits for its own average once, only to learn N_1 (the averager's `group_size` is a
      local view that another thread may change; reading it would make the weight depend on
      timing). Every later round overlaps fully.
      Consequence (as in the paper): theta and v are per-peer and differ by O(Delta/N) terms,
      so `global_state_hash()` is not equal across peers in this mode. The shared quantities
      (the averages, their participant counts, the step counter) are equal on every peer. A
      snapshot carries the donor's theta together with the own term w_t * Delta_m^(t) that
      theta holds, so a joiner's next estimate takes that term out again.

    A failed average raises AveragingError. In blocking mode theta, v and the local model are
    unchanged and `outer_step()` may be retried (with `feedback_codec` set, the failed attempt
    has already folded Delta_m into the error-feedback residual, so a retry counts it twice:
    rejoin from a snapshot instead). In the overlapped modes a lost round cannot be replayed,
    so the peer should rejoin from a snapshot.
    """

    config: DiLoCoConfig

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer,
                 data: BatchSource, loss_fn: LossFn, averager: Averager,
                 config: DiLoCoConfig | None = None, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        config = config or DiLoCoConfig()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        super().__init__(model, inner_optimizer, data, loss_fn, averager, config, [names],
                         scheduler=scheduler)
        self.outer_steps = 0
        self._pending: InFlight | None = None  # overlapped modes: the previous round's average
        self._eager_weight = 0.0  # eager: the weight w its own pending Delta_m was applied with

    def run_inner(self, steps: int | None = None, seconds: float | None = None) -> InnerReport:
        """Inner phase: `steps` steps, or as many as fit in `seconds` (heterogeneous peers), or
        `config.inner_steps` when neither is given."""
        if steps is None and seconds is None:
            steps = self.config.inner_steps
        return super().run_inner(steps=steps, seconds=seconds)

    def train_round(self, steps: int | None = None,
                    seconds: float | None = None) -> tuple[InnerReport, OuterReport]:
        inner = self.run_inner(steps=steps, seconds=seconds)
        return inner, self.outer_step()

    def outer_step(self) -> OuterReport:
        copy = self.copies[0]
        waited0 = self.waited_s
        t = self.outer_steps + 1
        tag = f"{self.config.tag_prefix}/outer/{t}"
        mode = self.config.mode
        if mode is OuterMode.BLOCKING:
            zero_next = set(self._zero_next)
            inflight = self._launch(0, tag)
            try:
                grads, participants = self._resolve(inflight)
            except AveragingError:
                self._zero_next = zero_next  # a retry sends what this attempt sent
                raise
        else:
            prev = self._pending
            previous, participants = self._resolve(prev) if prev is not None else (None, None)
            inflight = self._launch(0, tag)
            if mode is OuterMode.DELAYED:
                grads = previous
            else:
                if prev is None:  # eager round 1: wait once, only to learn the agreed count N_1
                    _, participants = self._resolve(inflight)
                grads = self._eager_estimate(previous, participants, prev, inflight)
            self._pending = inflight
        if grads is not None:
            copy.step(grads, self.config.outer_lr, self.config.outer_momentum)
        copy.write_local(0.0)
        self.outer_steps = t
        return OuterReport(outer_step=t, applied=grads is not None, participants=participants,
                           waited_s=self.waited_s - waited0)

    def _eager_estimate(self, previous: list[Tensor] | None, participants: int | None,
                        prev: InFlight | None, fresh: InFlight) -> list[Tensor]:
        """G = Delta^(t-1) - w_(t-1) * Delta_m^(t-1) + w_t * Delta_m^(t) with w_t = 1/N, N the
        participant count of the latest resolved average (round 1: Delta^(0) = 0); sets w_t."""
        if not participants:
            raise AveragingError(f"eager mode needs the participant count of each average; "
                                 f"average {(prev or fresh).tag!r} did not report one")
        weight = 1.0 / participants
        if previous is None or prev is None:
            estimate = [d * weight for d in fresh.sent]
        else:
            w_prev = self._eager_weight
            estimate = [a - s * w_prev + d * weight
                        for a, s, d in zip(previous, prev.sent, fresh.sent)]
        self._eager_weight = weight
        return estimate

    def finish(self) -> OuterReport | None:
        """Overlapped modes: wait for the last in-flight average and apply it (delayed) or its
        correction (eager), so the final model includes every round. No-op when blocking."""
        if self._pending is None:
            return None
        waited0 = self.waited_s
        average, participants = self._resolve(self._pending)
        if self.config.mode is OuterMode.EAGER:
            average = [a - s * self._eager_weight for a, s in zip(average, self._pending.sent)]
        self._pending = None
        copy = self.copies[0]
        copy.step(average, self.config.outer_lr, self.config.outer_momentum)
        copy.write_local(0.0)
        return OuterReport(outer_step=self.outer_steps, applied=True, participants=participants,
                           waited_s=self.waited_s - waited0)

    # -- state ---------------------------------------------------------------------------------
    def _shared_state(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:
            average, participants = self._resolve(self._pending)
            pending = {"average": average, "participants": participants, "tag": self._pending.tag}
        if pending is not None and self.config.mode is OuterMode.EAGER:
            # Eager theta is per-peer and holds w * Delta_m of the pending round: whoever adopts
            # this theta must take out that term when the average is applied.
            pending["eager_sent"] = self._pending.sent
            pending["eager_weight"] = self._eager_weight
        return {"outer_step": self.outer_steps, "mode": self.config.mode.value, "pending": pending}

    def _load_shared_state(self, snap: dict[str, Any]) -> None:
        if snap["mode"] != self.config.mode.value:
            raise StateError(f"snapshot was taken in mode {snap['mode']!r}, this trainer runs "
                             f"{self.config.mode.value!r}")
        self.outer_steps = int(snap["outer_step"])
        p = snap["pending"]
        self._eager_weight = 0.0
        if p is None:
            self._pending = None
            return
        # Delayed mode never reads what was sent; eager reads the own term the adopted theta
        # holds (the donor's, or this peer's own when resuming its checkpoint).
        sent = p.get("eager_sent")
        if self.config.mode is OuterMode.EAGER:
            if sent is None:
                raise StateError("eager snapshot lacks the own term its theta holds")
            self._eager_weight = float(p["eager_weight"])
        self._pending = InFlight.resolved(
            p["average"], p["participants"],
            [torch.zeros_like(a) for a in p["average"]] if sent is None else list(sent), p["tag"])
