"""What DiLoCo and Streaming DiLoCo share: configuration, the inner loop, fp32 global copies per
fragment, launching/awaiting averages, joiner zero contributions, state and its hash."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .averager import AverageResult, Averager
from .errors import AveragingError, ConfigError, StateError
from .inner import BatchSource, InnerLoop, InnerReport, LossFn
from .outer import FeedbackQuantizer, GlobalCopy


@dataclass
class OuterConfig:
    """Outer-loop settings common to both trainers (defaults: docs/architecture.md §DiLoCo rules).

    feedback_codec: when set (e.g. "int4"), each pseudo-gradient is pre-quantized with this codec
    under error feedback before it is averaged; configure the mesh averager with the same codec.
    """

    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_device: str = "cpu"
    average_timeout_s: float = 1800.0
    tag_prefix: str = "diloco"
    feedback_codec: str | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not self.outer_lr > 0:
            raise ConfigError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if not self.average_timeout_s > 0:
            raise ConfigError(f"average_timeout_s must be > 0, got {self.average_timeout_s}")


@dataclass
class InFlight:
    """One launched average: the future and exactly what this peer contributed."""

    future: Future
    sent: list[Tensor]
    tag: str

    @classmethod
    def resolved(cls, average: list[Tensor], participants: int | None, sent: list[Tensor],
                 tag: str) -> "InFlight":
        fut: Future = Future()
        fut.set_result(AverageResult(average, participants))
        return cls(fut, sent, tag)


class OuterTrainer(ABC):
    """Base of the DiLoCo trainers; `fragments` partitions the trainable parameter names
    (DiLoCo: one fragment holding everything)."""

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, data: BatchSource,
                 loss_fn: LossFn, averager: Averager, config: OuterConfig,
                 fragments: list[list[str]], *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        self.model = model
        self.averager = averager
        self.config = config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the model has no trainable parameters")
        self._names = [n for n, _ in named]
        by_name = dict(named)
        flat = [n for frag in fragments for n in frag]
        if sorted(flat) != sorted(self._names) or any(not frag for frag in fragments):
            raise ConfigError("fragments must be non-empty and partition the model's trainable "
                              "parameter names (each name exactly once)")
        device = torch.device(config.outer_device)
        self.copies = [GlobalCopy([(n, by_name[n]) for n in frag], device) for frag in fragments]
        self.inner = InnerLoop(model, inner_optimizer, data, loss_fn, scheduler=scheduler,
                               max_grad_norm=config.max_grad_norm, after_step=self._after_inner_step)
        self._feedback = (FeedbackQuantizer(config.feedback_codec)
                          if config.feedback_codec is not None else None)
        self._zero_next: set[int] = set()
        self.waited_s = 0.0  # total time blocked on averages (overlap diagnostics)

    # -- inner phase --------------------------------------------------------------------------
    def run_inner(self, steps: int | None = None, seconds: float | None = None) -> InnerReport:
        """Inner phase bounded by `steps` and/or a wall-clock budget of `seconds`."""
        return self.inner.run(steps=steps, seconds=seconds)

    def _after_inner_step(self, step: int) -> None:
        """Hook after every inner step (Streaming DiLoCo's sync points)."""

    # -- averaging ---------------------------------------------------------------------------
    def contribute_zero_next(self) -> None:
        """Elastic join: this peer's next contribution to every fragment is zeros (it still counts
        as a participant), since its pseudo-gradient does not cover a full inner phase."""
        self._zero_next = set(range(len(self.copies)))

    def _launch(self, fragment: int, tag: str, within_s: float | None = None) -> InFlight:
        copy = self.copies[fragment]
        if fragment in self._zero_next:
            sent = [torch.zeros_like(t) for t in copy.params]
        else:
            sent = copy.pseudo_gradient()
            if self._feedback is not None:
                sent = self._feedback.quantize(fragment, sent)
        try:
            future = self.averager.start(sent, tag, within_s=within_s)
        except Exception as e:
            raise AveragingError(f"average {tag!r} could not start: {e}") from e
        self._zero_next.discard(fragment)
        return InFlight(future, sent, tag)

    def _resolve(self, inflight: InFlight) -> tuple[list[Tensor], int | None]:
        t0 = time.perf_counter()
        try:
            result = inflight.future.result(timeout=self.config.average_timeout_s)
        except FutureTimeout as e:
            raise AveragingError(f"average {inflight.tag!r} not done after "
                                 f"{self.config.average_timeout_s}s") from e
        except AveragingError:
            raise
        except Exception as e:
            raise AveragingError(f"average {inflight.tag!r} failed: {type(e).__name__}: {e}") from e
        finally:
            self.waited_s += time.perf_counter() - t0
        if len(result) != len(inflight.sent) or any(
                r.shape != s.shape for r, s in zip(result, inflight.sent)):
            raise AveragingError(f"average {inflight.tag!r} returned tensors that do not match "
                                 f"the {len(inflight.sent)} sent")
        average = [r.to(s.device, torch.float32) for r, s in zip(result, inflight.sent)]
        return average, getattr(result, "participants", None)

    # -- state ---------------------------------------------------------------------------------
    def global_state_hash(self) -> str:
        """sha256 over the fp32 global params, then the outer momenta, each in the model's
        parameter order (name bytes, then raw tensor bytes)."""
        params = {n: t for c in self.copies for n, t in zip(c.names, c.params)}
        momenta = {n: t for c in self.copies for n, t in zip(c.names, c.momenta)}
        h = hashlib.sha256()
        for table in (params, momenta):
            for name in self._names:
                h.update(name.encode())
                h.update(table[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def snapshot(self) -> dict[str, Any]:
        """The group-wide state a joining peer needs (global params, momentum, step counters,
        resolved in-flight averages). Waits for averages still in flight; this does not change
        the trajectory, since their results are applied at the same point as before."""
        glob = {"params": {}, "momenta": {}}
        for c in self.copies:
            st = c.state()
            glob["params"].update(st["params"])
            glob["momenta"].update(st["momenta"])
        return {"kind": type(self).__name__, "global": glob, **self._shared_state()}

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        """Adopt a group snapshot (elastic join / replica init): global state and counters; the
        local model is set to the global params."""
        if snap.get("kind") != type(self).__name__:
            raise StateError(f"snapshot is for {snap.get('kind')!r}, this is {type(self).__name__}")
        for key in ("params", "momenta"):
            if set(snap["global"][key]) != set(self._names):
                raise StateError(f"snapshot global {key} do not match this model's parameters")
        for c in self.copies:
            c.load({k: {n: snap["global"][k][n] for n in c.names} for k in ("params", "momenta")})
            c.write_local(0.0)
        self._load_shared_state(snap)

    def state_dict(self) -> dict[str, Any]:
        """Full checkpoint of this peer: snapshot() plus the local model, inner optimizer and
        scheduler, data position, error-feedback residuals and per-peer algorithm state."""
        return {"snapshot": self.snapshot(),
                "local": {n: p.detach().clone() for c in self.copies
                          for n, p in zip(c.names, c.local)},
                "inner": self.inner.state_dict(),
                "feedback": None if self._feedback is None else self._feedback.state_dict(),
                "zero_next": sorted(self._zero_next),
                "peer": self._peer_state()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_snapshot(state["snapshot"])
        local = state["local"]
        for c in self.copies:
            for n, p in zip(c.names, c.local):
                if n not in local or local[n].shape != p.shape:
                    raise StateError(f"checkpoint local params lack or misshape {n!r}")
                p.copy_(local[n])
        self.inner.load_state_dict(state["inner"])
        if (state["feedback"] is None) != (self._feedback is None):
            raise StateError("checkpoint and config disagree on feedback_codec")
        if self._feedback is not None:
            self._feedback.load_state_dict(state["feedback"], torch.device(self.config.outer_device))
        self._zero_next = set(state["zero_next"])
        self._load_peer_state(state["peer"])

    @abstractmethod
    def _shared_state(self) -> dict[str, Any]:
        """Algorithm state every peer holds identically (counters, resolved averages)."""

    @abstractmethod
    def _load_shared_state(self, snap: dict[str, Any]) -> None: ...

    def _peer_state(self) -> dict[str, Any]:
        return {}

    def _load_peer_state(self, state: dict[str, Any]) -> None:
        """Per-peer algorithm state (none by default)."""
