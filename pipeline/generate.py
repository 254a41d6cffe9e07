"""Single-process text generation: prefill, KV-cached decode, greedy or nucleus sampling.

Batches of prompts of different lengths are left-padded; pad slots get position -1 so the
cache masks them and every row sees its own positions 0..n-1 (results match one-by-one runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import torch
from torch import Tensor

from pipeline.model import Llama
from pipeline.tokenizer import Tokenizer

Messages = list[dict]
Prompt = Union[str, Messages]


@dataclass
class Sampler:
    """temperature 0 -> greedy (argmax); else softmax(logits / T) cut to the top-p nucleus
    (Holtzman et al. 2020). ``seed`` makes sampling reproducible."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        self._gen: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [B, V] -> token ids [B]."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        if self._gen is None or self._gen.device != logits.device:
            self._gen = torch.Generator(device=logits.device)
            if self.seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(self.seed)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            outside = sorted_p.cumsum(dim=-1) - sorted_p >= self.top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self._gen).squeeze(-1)


def _check_whole(model: Llama) -> None:
    if len(model.block_ids) != model.cfg.n_layers or not (model.with_embed and model.with_head):
        raise ValueError("single-process generation needs a model holding every block, the embedding and the head")


@torch.inference_mode()
def generate_tokens(model: Llama, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler | None = None,
                    stop_ids: Iterable[int] = ()) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] LongTensor) per step, until every row has produced a
    stop id or ``max_new_tokens`` steps have run. Finished rows keep decoding (ignore their tokens)."""
    _check_whole(model)
    sampler = sampler or Sampler()
    cfg = model.cfg
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for p in prompts:
        if any(not 0 <= t < cfg.vocab_size for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context limit "
                         f"of {cfg.max_seq_len}")
    device = model.rope_cos.device
    b = len(prompts)
    tokens = torch.zeros((b, longest), dtype=torch.long)
    positions = torch.full((b, longest), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, longest - len(p):] = torch.tensor(p)
        positions[row, longest - len(p):] = torch.arange(len(p))
    tokens, positions = tokens.to(device), positions.to(device)
    cache = model.new_cache(b, capacity=longest + max_new_tokens)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    next_pos = torch.tensor([len(p) for p in prompts], device=device)[:, None]

    h = model.run_blocks(model.embed(tokens), 0, cfg.n_layers, cache, positions)
    logits = model.head(h[:, -1])
    for step in range(max_new_tokens):
        tok = sampler(logits)
        yield tok
        done |= torch.isin(tok, stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            return
        h = model.run_blocks(model.embed(tok[:, None]), 0, cfg.n_layers, cache, next_pos)
        logits = model.head(h[:, -1])
        next_pos += 1


def _prompt_ids(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    else:
        raise ValueError("a prompt is a str or a list of {'role', 'content'} messages")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("prompt encodes to zero tokens")
    return ids


def _is_batch(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)


class Completions:
    """Collects a batch's steps (one token per row) into each row's tokens up to its stop id."""

    def __init__(self, rows: int, stops: Iterable[int]):
        self.stops = set(stops)
        self.rows: list[list[int]] = [[] for _ in range(rows)]
        self.finished = [False] * rows  # the row has produced a stop id

    def add(self, tokens: list[int]) -> None:
        for r, t in enumerate(tokens):
            self.finished[r] = self.finished[r] or t in self.stops
            if not self.finished[r]:
                self.rows[r].append(t)


def generate(model: Llama, tokenizer: Tokenizer, prompt: Prompt | list[Prompt], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop_at_eos: bool = True) -> str | list[str]:
    """Completion text for a prompt (str, or chat messages rendered with the chat template), or a
    list of completions for a list of prompts (one batch). The stop token is not included."""
    batch = _is_batch(prompt)
    prompts = [_prompt_ids(tokenizer, p) for p in (prompt if batch else [prompt])]
    stops = [tokenizer.eos_id] if stop_at_eos else []
    out = Completions(len(prompts), stops)
    for tok in generate_tokens(model, prompts, max_new_tokens, Sampler(temperature, top_p, seed), stops):
        out.add(tok.tolist())
    texts = [tokenizer.decode(r) for r in out.rows]
    return texts if batch else texts[0]


def stream(model: Llama, tokenizer: Tokenizer, prompt: Prompt, max_new_tokens: int = 128,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
           stop_at_eos: bool = True) -> Iterator[str]:
    """Yield text pieces of one completion as they are decoded (joined, they equal ``generate``)."""
    if _is_batch(prompt) and not all(isinstance(m, dict) for m in prompt):
        raise ValueError("stream() takes one prompt")
    stops = [tokenizer.eos_id] if stop_at_eos else []
    ids: list[int] = []
    sent = ""
    for tok in generate_tokens(model, [_prompt_ids(tokenizer, prompt)], max_new_tokens,
                               Sampler(temperature, top_p, seed), stops):
        t = int(tok[0])
        if t in stops:
            break
        ids.append(t)
        text = tokenizer.decode(ids)
        # Hold back a partial UTF-8 character (decoded as U+FFFD) until its last byte arrives.
        if not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = tokenizer.decode(ids)
    if len(text) > len(sent):
        yield text[len(sent):]
