"""A tiny served model as a Hugging Face folder, for serving tests and benches.

``write_tiny_model(folder, chat_template)``: a random 6-block llama (vocab 64, context 64) with a
word-level tokenizer ("w0".."w63"; "w63" ends a completion) and the given chat template in
``tokenizer_config.json``, exactly what a real serving peer reads and sends to clients.
"""
from __future__ import annotations

import json
from pathlib import Path

WORDS = 64


def write_tiny_model(folder: Path, chat_template: str = "", seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline.loading import hf_name
    from pipeline.model import Llama, LlamaConfig

    cfg = LlamaConfig.tiny(vocab_size=WORDS, max_seq_len=64)
    torch.manual_seed(seed)
    model = Llama(cfg)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings}))
    save_file({hf_name(k, cfg): v.contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(WORDS)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w63", "chat_template": chat_template}))
