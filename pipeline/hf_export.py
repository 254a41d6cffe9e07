"""Write a ``pipeline.model.Llama`` state as a Hugging Face folder: the inverse of
``pipeline.loading.load_hf``, so what the swarm trains is what transformers and ``--serve`` load.

A folder is ``model.safetensors`` (HF tensor names), ``config.json`` and, when a tokenizer is
given, ``tokenizer.json`` + ``tokenizer_config.json``. Tensor names come from the loader's own
mapping (``pipeline.loading.hf_name``: internal key -> HF name), so export and load share one
table. The config is checked by reading it back with the loader's parser (``hf_config``): a model
whose ``LlamaConfig`` flags have no Hugging Face spelling here (Gemma 3's folded norms, sliding
layers on a plain llama) is refused instead of written as a different model.

Files are written under temporary names and renamed into place, ``config.json`` last, so a
reader never sees a folder whose config announces tensors not yet written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from pipeline.loading import ModelLoadError, hf_name, hf_config
from pipeline.model import Llama, LlamaConfig
from pipeline.tokenizer import Tokenizer

# our family -> (model_type, architecture) of the HF folder
HF_CLASSES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
              "qwen3": ("qwen3", "Qwen3ForCausalLM")}


class ExportError(ValueError):
    """A model state or config that cannot be written as a Hugging Face folder."""


def hf_config_dict(cfg: LlamaConfig, tokenizer: Tokenizer | None = None) -> dict:
    """``config.json`` of ``cfg`` (ExportError for a model this folder format cannot describe)."""
    if cfg.family not in HF_CLASSES:
        raise ExportError(f"exporting the {cfg.family} family is not supported (supported: {', '.join(HF_CLASSES)})")
    if cfg.family == "llama" and cfg.sliding_layers:
        raise ExportError("a llama with sliding-window layers has no Hugging Face LlamaConfig spelling")
    model_type, arch = HF_CLASSES[cfg.family]
    out = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": cfg.activation, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_bias": cfg.qkv_bias, "mlp_bias": False}
    if cfg.rope_scale != 1.0:
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scale}
    if cfg.sliding_layers:
        out.update(use_sliding_window=True, sliding_window=cfg.sliding_window,
                   layer_types=["sliding_attention" if i in cfg.sliding_layers else "full_attention"
                                for i in range(cfg.n_layers)])
    if tokenizer is not None:
        out["eos_token_id"] = tokenizer.eos_id
        if tokenizer.bos_id is not None:
            out["bos_token_id"] = tokenizer.bos_id
    return out


def hf_tensors(state: Mapping[str, Tensor], cfg: LlamaConfig, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``state`` (a whole ``Llama``'s internal names) under HF names, checked against the model
    ``cfg`` describes: every tensor present with its shape, nothing else (a tied model has no
    head tensor: HF ties it to the embedding from ``tie_word_embeddings``). ``dtype`` casts
    (e.g. bf16 for serving from an fp32 master copy)."""
    last = f"blocks.{cfg.n_layers - 1}.attn_norm.weight"
    if last not in state or f"blocks.{cfg.n_layers}.attn_norm.weight" in state:
        # before building: a config from an untrusted checkpoint may claim millions of blocks
        raise ExportError(f"state does not have the {cfg.n_layers} blocks the model config says")
    with torch.device("meta"):
        wanted = Llama(cfg).state_dict()
    extra = sorted(set(state) - set(wanted))
    missing = sorted(set(wanted) - set(state))
    if extra or missing:
        raise ExportError(f"state does not match the model config: missing {missing[:4]}, unexpected {extra[:4]}")
    out: dict[str, Tensor] = {}
    for key, meta in wanted.items():
        t = state[key]
        if tuple(t.shape) != tuple(meta.shape):
            raise ExportError(f"tensor {key} has shape {tuple(t.shape)}, the config says {tuple(meta.shape)}")
        if not t.is_floating_point():
            raise ExportError(f"tensor {key} is {t.dtype}, not a floating-point weight")
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        out[hf_name(key, cfg)] = t
    return out


def save_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int | None = None) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, chat template), what
    ``Tokenizer.from_file`` and transformers' ``AutoTokenizer`` read back."""
    conf: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.token_text(tokenizer.eos_id),
                  "add_bos_token": tokenizer.add_bos, "clean_up_tokenization_spaces": False}
    if tokenizer.bos_id is not None:
        conf["bos_token"] = tokenizer.token_text(tokenizer.bos_id)
    if tokenizer.chat_template:
        conf["chat_template"] = tokenizer.chat_template
    if max_length is not None:
        conf["model_max_length"] = max_length
    _write(folder / "tokenizer.json", tokenizer._tk.to_str(pretty=False).encode())
    _write(folder / "tokenizer_config.json", _json(conf))


def save_hf(folder: str | os.PathLike, state: Mapping[str, Tensor], cfg: LlamaConfig,
            tokenizer: Tokenizer | None = None, *, dtype: torch.dtype | None = None,
            metadata: Mapping[str, str] | None = None) -> Path:
    """Write the Hugging Face folder of ``state`` (see the module docstring); ``metadata`` goes
    into the safetensors header (provenance: run, step, state hash)."""
    from safetensors.torch import save_file

    config = hf_config_dict(cfg, tokenizer)
    tensors = hf_tensors(state, cfg, dtype)
    floats = {t.dtype for t in tensors.values()}
    config["torch_dtype"] = str(floats.pop()).removeprefix("torch.") if len(floats) == 1 else "float32"
    with tempfile.TemporaryDirectory() as probe:  # must read back as the same model
        (Path(probe) / "config.json").write_bytes(_json(config))
        try:
            back = hf_config(probe)
        except ModelLoadError as e:
            raise ExportError(f"model config {cfg} has no Hugging Face equivalent: {e}") from e
    if back != cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(back, f.name)}
        raise ExportError(f"model config has no Hugging Face equivalent here (ours, as read back): {diff}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in folder.glob("*.safetensors") if p.name != "model.safetensors")
    if others:  # the loader reads every *.safetensors of a folder
        raise ExportError(f"{folder} already holds other weights ({', '.join(others[:3])}): export to a new folder")
    (folder / "config.json").unlink(missing_ok=True)  # no old config beside the new weights meanwhile
    tmp = folder / f".model.{secrets.token_hex(4)}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, folder / "model.safetensors")
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, cfg.max_seq_len)
    _write(folder / "config.json", _json(config))
    return folder


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
