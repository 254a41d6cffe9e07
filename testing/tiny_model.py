"""A tiny 2-block Llama written as a GGUF file and as a Hugging Face folder, for loader tests and
the file fuzzer (no download: the reference model is not needed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_tiny_gguf(path: Path, meta: dict[str, Any] | None = None) -> None:
    """A 2-block llama GGUF (F32, F16 and Q8_0 tensors) that ``load_model`` accepts, with the
    llama.* metadata values in ``meta`` replaced (any type; None drops the key)."""
    import gguf
    import numpy as np

    vocab, dim, hidden, heads, kv = 64, 32, 64, 4, 2
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    values = {"block_count": 2, "context_length": 64, "embedding_length": dim, "feed_forward_length": hidden,
              "attention.head_count": heads, "attention.head_count_kv": kv,
              "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "vocab_size": vocab}
    values.update(meta or {})
    for key, value in values.items():
        key = "llama." + key
        if value is None:
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_int32 if value < 0 else w.add_uint32 if value < 2**32 else w.add_uint64)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, dim), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    head = dim // heads
    shapes = {"attn_norm": (dim,), "attn_q": (dim, dim), "attn_k": (kv * head, dim), "attn_v": (kv * head, dim),
              "attn_output": (dim, dim), "ffn_norm": (dim,), "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim),
              "ffn_down": (dim, hidden)}
    for b in range(2):
        for name, shape in shapes.items():
            arr = rng.standard_normal(shape, dtype=np.float32)
            if name == "ffn_up":  # one quantized and one half tensor exercise dequantize
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{b}.{name}.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif name == "ffn_gate":
                w.add_tensor(f"blk.{b}.{name}.weight", arr.astype(np.float16))
            else:
                w.add_tensor(f"blk.{b}.{name}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_hf(folder: Path, gguf_path: Path) -> None:
    """The same model as a Hugging Face folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    from pipeline.loading import _TO_HF, load_gguf

    model = load_gguf(gguf_path)
    cfg = model.cfg
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings}))
    state = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if key == "embedding.weight":
            name = "model.embed_tokens.weight"
        elif key == "norm.weight":
            name = "model.norm.weight"
        else:
            _, b, part, _ = key.split(".")
            name = f"model.layers.{b}.{_TO_HF[part]}.weight"
        state[name] = t.contiguous().clone()
    save_file(state, str(folder / "model.safetensors"))
