"""What every peer of a training run must agree on: ``RunConfig`` (stored by the coordinator: the
first creator wins), the codecs and robust modes it may name. Torch-free to import (the model
presets, the codec and DiLoCo classes load when a config is built), so the `peer join --train`
flags (diloco/train_options.py) show its defaults without loading torch."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from collectives import RobustConfig
    from pipeline.model import LlamaConfig

    from .diloco import DiLoCoConfig

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
# robust mode -> the aggregate of the robust all-reduce (collectives.robust); "off" = the ring.
ROBUST_MODES: dict[str, str | None] = {"off": None, "detect": "mean", "trimmed": "trimmed_mean",
                                       "clip": "centered_clip"}


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings (defaults of docs/architecture.md §DiLoCo rules; H is small so CPU demos
    see outer steps within seconds).

    inner_steps: H, the inner steps per outer step; also the batches the coordinator hands each
    peer per inner phase (diloco/data.py: how a run's data grows with the swarm).
    inner_seconds: when set, each peer's inner phase is a wall-clock budget (heterogeneous peers
    do as many steps as fit, so all reach the rendezvous together), capped at ``inner_steps``
    (the peer's range of batches); pseudo-gradients are weighted by the batches each peer
    trained on (diloco/weighted.py), so a slow peer's shorter phase counts for less.
    data_shards: legacy (runs created by older peers store it); data is handed out in ranges of
    one stream, not in a fixed number of shards.
    error_feedback: pre-quantize pseudo-gradients with ``codec`` under error feedback (for int4).
    zstd: compress the codec's bytes with zstd on the wire (lossless; int8 pseudo-gradients in
    bench/diloco.py: 11% fewer bytes).
    total_steps: the run ends at this outer step (0 = never).
    sync_timeout_s / min_peers: a rendezvous waits for the peers in lockstep and for at least
    min_peers arrivals, but never longer than sync_timeout_s after the first expected arrival.
    robust: averages pseudo-gradients over the robust all-reduce, whose shard owners screen
    every contribution (non-finite, norm above 4x the median, pointing away from the
    coordinate-wise median), exclude offenders and aggregate the rest by "detect" (the default:
    in an open swarm any participant may be hostile): mean, "trimmed": trimmed mean, "clip":
    centered clipping; "off" averages over the ring (a trusted swarm; no screening). Part of the
    run config because every participant must run the same collective.
    """

    preset: str = "tiny"
    inner_steps: int = 20
    inner_seconds: float = 0.0
    total_steps: int = 0
    codec: str = "int8"
    error_feedback: bool = False
    zstd: bool = False
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    inner_lr: float = 4e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    checkpoint_every: int = 10
    sync_timeout_s: float = 30.0
    min_peers: int = 1
    data_shards: int = 16
    robust: str = "detect"

    def __post_init__(self) -> None:
        from .run_config import PRESETS  # torch: only when a config is built, not imported

        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.codec not in CODECS:
            raise ConfigError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.robust not in ROBUST_MODES:
            raise ConfigError(f"robust must be one of {tuple(ROBUST_MODES)}, got {self.robust!r}")
        positive_ints = ("inner_steps", "seq_len", "batch_size", "data_shards", "min_peers")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("total_steps", "warmup_steps", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("inner_seconds", "inner_lr", "weight_decay", "max_grad_norm", "sync_timeout_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not self.inner_lr > 0 or not self.sync_timeout_s > 0:
            raise ConfigError("inner_lr and sync_timeout_s must be > 0")
        if self.seq_len > self.model_config.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the preset's max_seq_len "
                              f"{self.model_config.max_seq_len}")
        # OuterConfig validates outer_lr / outer_momentum with the same messages.
        self.outer_config()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from the coordinator's stored JSON; unknown keys and wrong types are errors."""
        if not isinstance(d, dict):
            raise ConfigError("run config must be an object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown run config keys {unknown} (a newer peer created this "
                              f"run?); known: {sorted(known)}")
        values = {}
        for name, value in d.items():
            kind = type(getattr(cls, name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ConfigError(f"run config {name} must be {kind.__name__}, got {value!r}")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_config(self) -> LlamaConfig:
        from .run_config import PRESETS

        return PRESETS[self.preset][0]

    @property
    def tokenizer(self) -> str:
        from .run_config import PRESETS

        return PRESETS[self.preset][1]

    def robust_config(self) -> RobustConfig | None:
        """The robust all-reduce settings of ``robust`` (None: the plain ring)."""
        from collectives import RobustConfig

        aggregate = ROBUST_MODES[self.robust]
        return None if aggregate is None else RobustConfig(aggregate=aggregate)

    def outer_config(self) -> DiLoCoConfig:
        from .diloco import DiLoCoConfig

        return DiLoCoConfig(outer_lr=self.outer_lr, outer_momentum=self.outer_momentum,
                            inner_steps=self.inner_steps, tag_prefix="run",
                            feedback_codec=self.codec if self.error_feedback else None,
                            max_grad_norm=self.max_grad_norm or None,
                            average_timeout_s=max(600.0, 20 * self.sync_timeout_s))
