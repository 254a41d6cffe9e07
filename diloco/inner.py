"""The inner phase: plain local training of one replica, bounded by steps or wall-clock time.

Model-agnostic: any `torch.nn.Module`, any `torch.optim.Optimizer`, a `BatchSource` and a
`loss_fn(model, batch) -> scalar loss`. The optimizer (and LR scheduler) state lives across outer
steps, as DiLoCo prescribes; only the parameters are touched by the outer step.

Heterogeneous peers: `run(seconds=S)` keeps stepping while the next step is predicted to fit in
S seconds (prediction = moving average of measured step times), so a fast peer does more steps
and every peer reaches the outer step at about the same wall-clock time; `steps_for(S)` turns a
time budget into this peer's step count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from .errors import ConfigError

# Weight of the newest step in the step-time moving average: reacts within ~5 steps to a
# slowdown without letting one noisy step (GC, page fault) swing the budget.
_STEP_TIME_EMA = 0.2


class BatchSource(Protocol):
    """Deterministic, resumable stream of training batches (e.g. `diloco.data.TokenShards`)."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class InnerReport:
    steps: int
    seconds: float
    mean_loss: float
    step_time_s: float  # moving average after this phase


class InnerLoop:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: BatchSource,
                 loss_fn: LossFn, *, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 max_grad_norm: float | None = None,
                 after_step: Callable[[int], None] | None = None) -> None:
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.after_step = after_step
        self.steps_done = 0
        self.step_time_s: float | None = None

    def step(self) -> Tensor:
        """One inner step; returns the detached loss. `after_step(steps_done)` runs afterwards
        (Streaming DiLoCo syncs fragments there) and is not counted in the step time."""
        t0 = time.perf_counter()
        batch = self.data.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps_done += 1
        dt = time.perf_counter() - t0
        self.step_time_s = dt if self.step_time_s is None else (
            (1 - _STEP_TIME_EMA) * self.step_time_s + _STEP_TIME_EMA * dt)
        if self.after_step is not None:
            self.after_step(self.steps_done)
        return loss.detach()

    def run(self, steps: int | None = None, seconds: float | None = None) -> InnerReport:
        """Run at least one step; stop after `steps` steps and/or before the predicted end of the
        next step would pass `seconds`."""
        if steps is None and seconds is None:
            raise ConfigError("run needs steps and/or seconds")
        if steps is not None and steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"seconds must be > 0, got {seconds}")
        start = time.perf_counter()
        total: Tensor | None = None
        n = 0
        while steps is None or n < steps:
            if seconds is not None and n > 0 and (
                    time.perf_counter() - start + (self.step_time_s or 0.0) > seconds):
                break
            loss = self.step()
            total = loss.float() if total is None else total + loss.float()
            n += 1
        assert total is not None and self.step_time_s is not None
        return InnerReport(steps=n, seconds=time.perf_counter() - start,
                           mean_loss=float(total) / n, step_time_s=self.step_time_s)

    def steps_for(self, seconds: float) -> int:
        """This peer's step budget for a wall-clock budget, from its measured speed (>= 1)."""
        if self.step_time_s is None:
            raise ConfigError("no step time measured yet: run at least one inner step first")
        return max(1, int(seconds / self.step_time_s))

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "step_time_s": self.step_time_s,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "data": self.data.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.step_time_s = state["step_time_s"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
