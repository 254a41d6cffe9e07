"""What every peer of a training run must agree on (``RunConfig``, stored by the coordinator:
the first creator wins), the model presets it names, and how a peer builds its model, optimizer
and data shard from it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collectives import RobustConfig
from pipeline.model import Llama, LlamaConfig

from .data import TokenShards, cache_root, reference_tokenizer, shakespeare_corpus, tokenize_corpus
from .diloco import DiLoCoConfig
from .errors import ConfigError

# preset -> (model config, tokenizer). "bytes": UTF-8 bytes as tokens (vocab 256), which keeps the
# embedding small enough for CPU demos; "reference": the SmolLM2 BPE tokenizer (vocab 49152).
PRESETS: dict[str, tuple[LlamaConfig, str]] = {
    # ~0.1M parameters: tests and smoke runs on a loaded 2-core machine.
    "micro": (LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          hidden_dim=128, max_seq_len=512), "bytes"),
    # ~2.4M parameters: the CPU demo (pipeline.model.LlamaConfig.tiny).
    "tiny": (LlamaConfig.tiny(vocab_size=256, max_seq_len=512), "bytes"),
    # The reference model's shape, trained from scratch on the reference tokenizer.
    "smollm2-135m": (LlamaConfig.smollm2_135m(), "reference"),
}
CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
# robust mode -> the aggregate of the robust all-reduce (collectives.robust); "off" = the ring.
ROBUST_MODES: dict[str, str | None] = {"off": None, "detect": "mean", "trimmed": "trimmed_mean",
                                       "clip": "centered_clip"}


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings (DESIGN.md section 4 defaults where they apply; H is small so CPU demos
    see outer steps within seconds).

    inner_seconds: when set, each peer's inner phase is a wall-clock budget (heterogeneous peers
    do as many steps as fit, so all reach the rendezvous together) instead of ``inner_steps``.
    error_feedback: pre-quantize pseudo-gradients with ``codec`` under error feedback (for int4).
    zstd: compress the codec's bytes with zstd on the wire (lossless; int8 pseudo-gradients in
    bench/diloco.py: 11% fewer bytes).
    total_steps: the run ends at this outer step (0 = never).
    sync_timeout_s / min_peers: a rendezvous waits for the peers in lockstep and for at least
    min_peers arrivals, but never longer than sync_timeout_s after the first expected arrival.
    robust: "off" averages pseudo-gradients over the ring; otherwise over the robust all-reduce,
    whose shard owners screen every contribution (non-finite, norm above 4x the median, pointing
    away from the coordinate-wise median), exclude offenders and aggregate the rest by "detect":
    mean, "trimmed": trimmed mean, "clip": centered clipping. Part of the run config because
    every participant must run the same collective.
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
    robust: str = "off"

    def __post_init__(self) -> None:
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
        return PRESETS[self.preset][0]

    @property
    def tokenizer(self) -> str:
        return PRESETS[self.preset][1]

    def robust_config(self) -> RobustConfig | None:
        """The robust all-reduce settings of ``robust`` (None: the plain ring)."""
        aggregate = ROBUST_MODES[self.robust]
        return None if aggregate is None else RobustConfig(aggregate=aggregate)

    def outer_config(self) -> DiLoCoConfig:
        return DiLoCoConfig(outer_lr=self.outer_lr, outer_momentum=self.outer_momentum,
                            inner_steps=self.inner_steps, tag_prefix="run",
                            feedback_codec=self.codec if self.error_feedback else None,
                            max_grad_norm=self.max_grad_norm or None,
                            average_timeout_s=max(600.0, 20 * self.sync_timeout_s))


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256, eos 0: NUL never occurs in text files)."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def build_model(cfg: RunConfig) -> nn.Module:
    """The run's initial model, bit-identical on every peer: built on the CPU under the run seed
    (the CPU generator is the same everywhere for the same torch version)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        return Llama(cfg.model_config)
    finally:
        torch.random.set_rng_state(gen_state)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def lr_factor(step: int, warmup_steps: int, total_steps: int = 0, schedule: str = "constant") -> float:
    """Inner lr multiplier: linear warmup over ``warmup_steps``, then constant, or ("cosine") down
    to 10% at ``total_steps``."""
    warmup = max(1, warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * done))


def inner_optimizer(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int = 0,
                    schedule: str = "constant"):
    """The inner AdamW (betas 0.9 / 0.95) and its ``lr_factor`` schedule."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, total_steps, schedule))
    return opt, sched


def build_optimizer(cfg: RunConfig, model: nn.Module):
    return inner_optimizer(model.parameters(), cfg.inner_lr, cfg.weight_decay, cfg.warmup_steps)


def corpus_tokens(cfg: RunConfig, data: str | Path | None,
                  cache_dir: str | Path | None = None) -> np.ndarray:
    """The tokenized corpus (``data`` or Shakespeare), cached under the lowband cache."""
    path = shakespeare_corpus(cache_dir) if data is None else Path(data)
    if cfg.tokenizer == "bytes":
        return tokenize_corpus(path, ByteTokenizer(), "bytes-v1", cache_root(cache_dir))
    tokenizer, tokenizer_id = reference_tokenizer()
    return tokenize_corpus(path, tokenizer, tokenizer_id, cache_dir)


def shard(cfg: RunConfig, tokens: np.ndarray, slot: int, slots: int, device: str) -> TokenShards:
    """The data shard of run slot ``slot`` (of ``slots``, assigned by the coordinator)."""
    return TokenShards(tokens, slots, slot, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                       device=device)
