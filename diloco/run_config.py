"""The model presets a run config names, and how a peer builds its model, optimizer and data shard
from its ``RunConfig`` (defined, torch-free, in diloco/run_spec.py and re-exported here)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model import Llama, LlamaConfig
from pipeline.tokenizer import Tokenizer

from .data import TokenShards, cache_root, reference_tokenizer, shakespeare_corpus, tokenize_corpus
from .run_spec import CODECS, ROBUST_MODES, RunConfig  # noqa: F401 (re-exported: the torch-free part)

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


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256, eos 0: NUL never occurs in text files)."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def hf() -> Tokenizer:
        """The same ids as a Hugging Face tokenizer, for exports: GPT-2's byte-level alphabet
        with one token per byte (id = byte value) and no merges; eos is id 0."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        tk = HFTokenizer(models.BPE(vocab={c: b for b, c in _gpt2_byte_chars().items()}, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        return Tokenizer(tk, eos_id=ByteTokenizer.eos_id)


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel maps each byte to):
    printable Latin-1 bytes stand for themselves, the others take code points from 256 up."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def run_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The tokenizer a run trains with, as a ``pipeline.tokenizer.Tokenizer`` (what an export
    ships beside the weights)."""
    return ByteTokenizer.hf() if cfg.tokenizer == "bytes" else reference_tokenizer()[0]


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
