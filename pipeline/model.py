"""Llama-family decoder in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or
untied head (Touvron et al. 2023, "LLaMA"; Ainslie et al. 2023, "GQA").

Config flags turn the same blocks into the other families we load (``LlamaConfig.family``):
Qwen2/2.5 (``qkv_bias``), Qwen3 (``qk_norm``), Gemma 3 (``qk_norm``, ``sandwich_norm``,
``activation="gelu_tanh"``, ``embed_scale``, ``attn_scale``, sliding-window layers with their own
RoPE base, ``logit_softcap``). Norm weights are the effective scale: Gemma's ``1 + w`` is folded
in by the loaders (as llama.cpp's GGUF converter already does), so one ``RMSNorm`` serves all.

The same code serves three uses:
- training: ``Llama(cfg)(tokens) -> logits`` (causal, no cache);
- pipeline serving: a ``Llama`` built with only a range of blocks runs ``embed`` /
  ``run_blocks(h, start, end, cache, positions)`` / ``head`` with a ``KVCache``;
- tensor-split serving (Shoeybi et al. 2019, "Megatron-LM"): a ``Block`` built from
  ``cfg.shard(rank, K)`` and ``shard_block_weights(...)`` holds a slice of the attention heads and
  of the MLP's intermediate columns; its ``attn_partial`` / ``mlp_partial`` return partial sums of
  the hidden-state update and ``forward(..., all_reduce=fn)`` sums them across peers, one
  all-reduce per attention and one per MLP.

Weights use the Hugging Face rotary layout (rotate-half); loaders convert other layouts.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AllReduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    head_dim: int = 0  # 0 -> dim // n_heads; kept explicit so a tensor-split shard keeps it
    family: str = "llama"           # llama | qwen2 | qwen3 | gemma3 (what the loaders recognised)
    qkv_bias: bool = False          # Qwen2: biases on the q/k/v projections
    qk_norm: bool = False           # Qwen3, Gemma 3: RMSNorm over each head's q and k before RoPE
    sandwich_norm: bool = False     # Gemma 3: also normalise the attention and MLP outputs before the residual add
    activation: str = "silu"        # gated MLP: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    embed_scale: float = 1.0        # Gemma: embeddings times sqrt(dim)
    attn_scale: float = 0.0         # 0 -> 1/sqrt(head_dim); Gemma 3: query_pre_attn_scalar ** -0.5
    rope_scale: float = 1.0         # linear RoPE scaling (positions / factor) of the full-attention layers
    sliding_window: int = 0         # keys a sliding layer's query sees (itself included)
    sliding_layers: tuple[int, ...] = ()  # layer indices that use the sliding window
    rope_local_theta: float = 0.0   # > 0: sliding layers' own RoPE base, unscaled (Gemma 3); 0: the full layers' RoPE
    logit_softcap: float = 0.0      # > 0: logits -> cap * tanh(logits / cap) (Gemma 2 style)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError("rope_theta and norm_eps must be positive")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        object.__setattr__(self, "sliding_layers", tuple(sorted(set(int(i) for i in self.sliding_layers))))
        if any(not 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ValueError(f"sliding_layers must lie in [0, {self.n_layers})")
        if self.sliding_layers and self.sliding_window < 1:
            raise ValueError("sliding layers need a sliding_window >= 1")
        if not (self.embed_scale > 0 and self.attn_scale >= 0 and self.rope_scale > 0
                and self.rope_local_theta >= 0 and self.logit_softcap >= 0):
            raise ValueError("embed_scale and rope_scale must be positive; attn_scale, rope_local_theta and "
                             "logit_softcap non-negative")

    @classmethod
    def tiny(cls, vocab_size: int = 256, max_seq_len: int = 256) -> "LlamaConfig":
        """~2.4M parameters at vocab 256: fast enough for CPU training demos and tests."""
        return cls(vocab_size=vocab_size, dim=192, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=512,
                   rope_theta=10000.0, norm_eps=1e-5, max_seq_len=max_seq_len, tie_embeddings=True)

    @classmethod
    def smollm2_135m(cls) -> "LlamaConfig":
        """SmolLM2-135M's shape (the reference model; loaders read it from the file's metadata)."""
        return cls(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                   rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True)

    def shard(self, rank: int, k: int) -> "LlamaConfig":
        """Config of tensor-split shard ``rank`` of ``k``: a slice of the heads (whole KV groups) and of
        the MLP columns. Norms, dim and head_dim are unchanged."""
        _check_split(self, rank, k)
        h0, h1 = split_bounds(self.n_kv_heads, rank, k)
        c0, c1 = split_bounds(self.hidden_dim, rank, k)
        group = self.n_heads // self.n_kv_heads
        return replace(self, n_heads=(h1 - h0) * group, n_kv_heads=h1 - h0, hidden_dim=c1 - c0)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def _check_split(cfg: LlamaConfig, rank: int, k: int) -> None:
    if not (k >= 1 and 0 <= rank < k):
        raise ValueError(f"bad tensor-split rank {rank} of {k}")
    if cfg.n_kv_heads % k:
        # Each shard must own whole GQA groups (a KV head and the query heads that read it).
        raise ValueError(f"tensor split K={k} must divide n_kv_heads={cfg.n_kv_heads}")
    if cfg.hidden_dim < k:
        raise ValueError(f"tensor split K={k} exceeds hidden_dim={cfg.hidden_dim}")


def split_bounds(n: int, rank: int, k: int) -> tuple[int, int]:
    """[start, end) of part ``rank`` when n items are split into k near-equal contiguous parts."""
    return rank * n // k, (rank + 1) * n // k


def shard_block_weights(block_state: dict[str, Tensor], cfg: LlamaConfig, rank: int, k: int) -> dict[str, Tensor]:
    """Slice a full block's state dict (keys as in ``Block``) for tensor-split shard ``rank`` of ``k``.

    Column-parallel in (q, k, v, gate, up: rows of the [out, in] weight), row-parallel out
    (o, down: columns), norms replicated. The result loads into ``Block(cfg.shard(rank, k))``.
    """
    _check_split(cfg, rank, k)
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    kv0, kv1 = split_bounds(cfg.n_kv_heads, rank, k)
    q0, q1 = kv0 * group * hd, kv1 * group * hd
    c0, c1 = split_bounds(cfg.hidden_dim, rank, k)
    rows = {"q": (q0, q1), "k": (kv0 * hd, kv1 * hd), "v": (kv0 * hd, kv1 * hd), "gate": (c0, c1), "up": (c0, c1)}
    cols = {"o": (q0, q1), "down": (c0, c1)}
    out = {}
    for key, t in block_state.items():
        name = key.split(".")[0]
        if name in rows:  # weight rows and bias entries of a column-parallel projection
            a, b = rows[name]
            out[key] = t[a:b].clone()
        elif name in cols:
            a, b = cols[name]
            out[key] = t[:, a:b].clone()
        elif name.endswith("norm"):  # per-dim (or per-head-dim) scales: every shard needs all of them
            out[key] = t.clone()
        else:
            raise ValueError(f"no tensor-split rule for block tensor {key}")
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 whatever the activation dtype (as the reference implementation does).
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(cfg: LlamaConfig, device: torch.device | str | None = None, local: bool = False) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in fp32, rotate-half layout (Su et al. 2021, RoFormer);
    ``local``: those of the sliding-window layers (``rope_local_theta`` when set: own base, no scaling)."""
    local = local and cfg.rope_local_theta > 0
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float()
                                / cfg.head_dim))
    if not local and cfg.rope_scale != 1.0:
        inv_freq = inv_freq / cfg.rope_scale
    freqs = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, hd]; cos/sin [B, 1, T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class StepContext:
    """What every block in one ``run_blocks`` call shares: rotary factors and the attention mask."""
    cos: Tensor                 # [B, 1, T, hd], activation dtype
    sin: Tensor
    mask: Tensor | None         # bool [B, 1, T, S], True = may attend; None -> see is_causal
    is_causal: bool             # with mask None: causal over T == S, or no mask at all when False
    local: "StepContext | None" = None  # what sliding-window layers use (set iff the model has them)


class LayerKV:
    """One layer's keys/values, [B, n_kv_heads, capacity, head_dim]; grows by doubling."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v, self.length = k, v, 0

    def append(self, k: Tensor, v: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            cap = min(max(end, 2 * self.k.shape[2]), max_len)
            pad = (0, 0, 0, cap - self.k.shape[2])
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys/values of a batch of sequences for the layers one model instance serves.

    Slots are shared by the batch; each slot also records every row's token position, with -1
    for padding. So rows of different lengths (left-padded) share one cache, and attention is
    masked by position, not slot. ``truncate(n)`` drops slots >= n (failover replay, rewinds).
    """

    def __init__(self, cfg: LlamaConfig, layers: Iterable[int], batch: int, capacity: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        capacity = max(1, min(capacity, cfg.max_seq_len))
        self.max_len = cfg.max_seq_len
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.layers = {i: LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for i in layers}
        self.positions = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.aligned = True  # every row's position == its slot index: masks can be implicit
        self.batch = batch

    @property
    def length(self) -> int:
        return max((lkv.length for lkv in self.layers.values()), default=0)

    def truncate(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot truncate a KV cache to {n}")
        for lkv in self.layers.values():
            lkv.length = min(lkv.length, n)
        self.positions[:, n:] = -1
        slots = torch.arange(min(n, self.positions.shape[1]), device=self.positions.device)
        self.aligned = bool((self.positions[:, :len(slots)] == slots).all())

    def _record(self, start: int, positions: Tensor) -> None:
        end = start + positions.shape[1]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len {self.max_len}")
        if end > self.positions.shape[1]:
            cap = min(max(end, 2 * self.positions.shape[1]), self.max_len)
            self.positions = F.pad(self.positions, (0, cap - self.positions.shape[1]), value=-1)
        self.positions[:, start:end] = positions
        if self.aligned:
            self.aligned = bool((positions == torch.arange(start, end, device=positions.device)).all())

    def context(self, start: int, positions: Tensor) -> tuple[Tensor | None, bool]:
        """Record positions of T new tokens written at slot ``start``; return (mask, is_causal)."""
        self._record(start, positions)
        t = positions.shape[1]
        if self.aligned:
            # Slots are positions: a single new token sees every slot, a prefill is plain causal.
            if t == 1:
                return None, False
            if start == 0:
                return None, True
        kpos = self.positions[:, :start + t]
        q = positions.clamp_min(0)
        mask = (kpos[:, None, :] <= q[:, :, None]) & (kpos[:, None, :] >= 0)
        # A pad query would see nothing (softmax of all -inf is NaN): let every slot see itself.
        slots = torch.arange(start + t, device=positions.device)
        mask |= slots[None, None, :] == (start + torch.arange(t, device=positions.device))[None, :, None]
        return mask[:, None], False


def window_mask(q: Tensor, keys: Tensor, mask: Tensor | None, causal: bool, window: int) -> Tensor:
    """Restrict a full-attention mask to a sliding window: query position q sees keys at
    positions in (q - window, q]. ``q`` [B, T] >= 0, ``keys`` [B, S] (-1 = padding); ``mask``
    bool [B, 1, T, S] or None with ``causal`` (T == S, slots are positions) or not (sees all)."""
    qq, kk = q[:, None, :, None], keys[:, None, None, :]
    if mask is None:
        mask = kk <= qq if causal else torch.ones(1, dtype=torch.bool, device=q.device)
    # Padding keys (-1) stay as the full mask has them (a pad query keeps its own slot).
    return mask & ((kk > qq - window) | (kk < 0))


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then h + mlp(norm(h)); with ``sandwich_norm``
    (Gemma 3) h + norm(attn(norm(h))) and h + norm(mlp(norm(h))).

    Built from a shard config, the same code computes partial outputs; ``forward`` sums them
    across peers with the injected ``all_reduce`` (identity for an unsplit block). The output
    norms of ``sandwich_norm`` act on the summed update, so they run after the reduce.
    ``layer`` is the block's index in the model: it decides whether it is a sliding-window layer.
    """

    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.sliding = layer in cfg.sliding_layers
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.q = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        # Optional parts exist only when the family has them (Llama's state dict is unchanged).
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.act = ACTIVATIONS[cfg.activation]

    def attn_partial(self, h: Tensor, ctx: StepContext, kv: LayerKV | None) -> Tensor:
        """This block's (or shard's) attention contribution to the residual, [B, T, dim]
        (before the output norm of ``sandwich_norm``)."""
        b, t, _ = h.shape
        hd = self.cfg.head_dim
        if self.sliding:
            if ctx.local is None:
                raise ValueError("a sliding-window layer needs a context built by the model (ctx.local)")
            ctx = ctx.local
        x = self.attn_norm(h)
        q = self.q(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v(x).view(b, t, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if kv is not None:
            k, v = kv.append(k, v, self.cfg.max_seq_len)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal and ctx.mask is None,
                                           scale=self.cfg.attn_scale or None,
                                           enable_gqa=self.cfg.n_heads != self.cfg.n_kv_heads)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def mlp_partial(self, h: Tensor) -> Tensor:
        """Gated MLP (SwiGLU / GeGLU, Shazeer 2020) contribution of this block's (or shard's)
        columns, [B, T, dim] (before the output norm of ``sandwich_norm``)."""
        x = self.mlp_norm(h)
        return self.down(self.act(self.gate(x)) * self.up(x))

    def forward(self, h: Tensor, ctx: StepContext, kv: LayerKV | None = None,
                all_reduce: AllReduce | None = None) -> Tensor:
        reduce = all_reduce or (lambda x: x)
        if self.cfg.sandwich_norm:
            h = h + self.post_attn_norm(reduce(self.attn_partial(h, ctx, kv)))
            return h + self.post_mlp_norm(reduce(self.mlp_partial(h)))
        h = h + reduce(self.attn_partial(h, ctx, kv))
        return h + reduce(self.mlp_partial(h))


class Llama(nn.Module):
    """A Llama decoder, or the part of it one peer serves.

    ``blocks`` picks the layer indices held (default all); state-dict keys keep global indices
    (``blocks.7.q.weight``) so any range loads from the same full checkpoint. ``with_embed`` /
    ``with_head`` default to holding the embedding with block 0 and the head with the last block.
    """

    def __init__(self, cfg: LlamaConfig, blocks: Iterable[int] | None = None,
                 with_embed: bool | None = None, with_head: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.block_ids = sorted(range(cfg.n_layers) if blocks is None else set(blocks))
        if any(not 0 <= i < cfg.n_layers for i in self.block_ids):
            raise ValueError(f"block indices must lie in [0, {cfg.n_layers})")
        self.with_embed = (0 in self.block_ids) if with_embed is None else with_embed
        self.with_head = (cfg.n_layers - 1 in self.block_ids) if with_head is None else with_head
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim) if self.with_embed else None
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in self.block_ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if self.with_head else None
        # Tied head with the embedding present reads embedding.weight; otherwise it has its own copy.
        self.lm_head = (nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
                        if self.with_head and not (cfg.tie_embeddings and self.with_embed) else None)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._set_local_rope()
        self._init_weights()

    def adopt(self, state: dict[str, Tensor]) -> "Llama":
        """Take ``state``'s tensors as the parameters (strict, no copy). Loaders build the model on
        the meta device (no random init), read exactly ``state_dict()``'s keys, then adopt them."""
        self.load_state_dict(state, strict=True, assign=True)
        ref = next(iter(state.values()))
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, ref.device)
        self._set_local_rope()
        return self

    def _set_local_rope(self) -> None:
        """Sliding layers' rotary tables: their own only when their base or scaling differs."""
        cfg = self.cfg
        if cfg.sliding_layers and cfg.rope_local_theta and (cfg.rope_local_theta != cfg.rope_theta or cfg.rope_scale != 1):
            cos, sin = rope_tables(cfg, self.rope_cos.device, local=True)
        else:
            cos, sin = self.rope_cos, self.rope_sin
        self.register_buffer("rope_cos_local", cos, persistent=False)
        self.register_buffer("rope_sin_local", sin, persistent=False)

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers).
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name.endswith(".bias"):
                nn.init.zeros_(p)
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o.weight", "down.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def new_cache(self, batch: int, capacity: int = 256, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for this instance's blocks, on the model's device and dtype by default."""
        # the activations' dtype: a float parameter's (quantized weights are integer buffers)
        ref = next((p for p in self.parameters() if p.is_floating_point()), self.rope_cos)
        return KVCache(self.cfg, self.block_ids, batch, capacity, device or ref.device, dtype or ref.dtype)

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> hidden states [B, T, dim]."""
        if self.embedding is None:
            raise RuntimeError("this model instance does not hold the embedding")
        return self.scale_embedding(self.embedding(tokens))

    def scale_embedding(self, h: Tensor) -> Tensor:
        """Gemma multiplies embeddings by sqrt(dim), rounded to the weights' dtype as it does."""
        if self.cfg.embed_scale == 1.0:
            return h
        return h * torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(h.dtype)

    def context(self, h: Tensor, positions: Tensor | None, cache: KVCache | None, start: int = 0) -> StepContext:
        """Rotary factors and mask for T new tokens written at cache slot ``start``;
        ``positions`` [B, T] (-1 = padding) default to the slot indices."""
        b, t, _ = h.shape
        if positions is None:
            positions = torch.arange(start, start + t, device=h.device).expand(b, t)
        if cache is None:
            mask, causal = None, True
            if bool((positions < 0).any()):
                raise ValueError("padding positions need a KV cache (it records which slots are padding)")
        else:
            mask, causal = cache.context(start, positions)
        keys = None
        if self.cfg.sliding_layers:  # key positions, for the window (only sliding layers need them)
            keys = positions.clamp_min(0) if cache is None else cache.positions[:, :start + t]
        return self.step_context(positions, mask, causal, keys, h.dtype)

    def step_context(self, positions: Tensor, mask: Tensor | None, causal: bool, keys: Tensor | None,
                     dtype: torch.dtype) -> StepContext:
        """The context of queries at ``positions`` [B, T] (-1 = padding) given the full-attention
        ``mask`` / ``causal`` over keys at ``keys`` [B, S] (-1 = padding; needed only with sliding
        layers): adds RoPE factors, and for sliding layers their own factors and windowed mask."""
        p = positions.clamp_min(0)
        if int(p.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(p.max())} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos = self.rope_cos[p].unsqueeze(1).to(dtype)
        sin = self.rope_sin[p].unsqueeze(1).to(dtype)
        ctx = StepContext(cos, sin, mask, causal)
        if not self.cfg.sliding_layers:
            return ctx
        if keys is None:
            raise ValueError("a model with sliding-window layers needs the key positions")
        local = StepContext(self.rope_cos_local[p].unsqueeze(1).to(dtype),
                            self.rope_sin_local[p].unsqueeze(1).to(dtype), mask, causal)
        if int(p.max()) >= self.cfg.sliding_window:  # some key may fall out of some query's window
            local.mask, local.is_causal = window_mask(p, keys, mask, causal, self.cfg.sliding_window), False
        ctx.local = local
        return ctx

    def run_blocks(self, h: Tensor, start: int, end: int, cache: KVCache | None = None,
                   positions: Tensor | None = None) -> Tensor:
        """Run blocks [start, end) on hidden states h [B, T, dim]; append to ``cache`` if given."""
        missing = [i for i in range(start, end) if str(i) not in self.blocks]
        if missing:
            raise ValueError(f"blocks {missing} are not held by this model instance")
        if start >= end:
            return h
        slot = cache.layers[start].length if cache is not None else 0
        ctx = self.context(h, positions, cache, slot)
        for i in range(start, end):
            h = self.blocks[str(i)](h, ctx, cache.layers[i] if cache is not None else None)
        return h

    def head(self, h: Tensor) -> Tensor:
        if not self.with_head:
            raise RuntimeError("this model instance does not hold the head")
        x = self.norm(h)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:  # tied: x @ table.T; a quantized table (pipeline.quant.QuantEmbedding) has its own, tiled
            attend = getattr(self.embedding, "attend", None)
            logits = attend(x) if attend is not None else F.linear(x, self.embedding.weight)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, tokens: Tensor) -> Tensor:
        """Training path: tokens [B, T] -> logits [B, T, vocab], causal, no cache."""
        if len(self.block_ids) != self.cfg.n_layers or not (self.with_embed and self.with_head):
            raise RuntimeError("forward() needs the whole model; use embed/run_blocks/head on a part")
        return self.head(self.run_blocks(self.embed(tokens), 0, self.cfg.n_layers))
