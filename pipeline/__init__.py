"""Llama-family model (also Qwen2/2.5, Qwen3, Gemma 3 by config flags), loaders, tokenizer and
generation (model engineer); stage servers,
tensor-split shards, InferenceClient and the OpenAI gateway build on them.

- ``pipeline.model``: ``LlamaConfig``, ``Llama`` (whole model or a range of blocks), ``Block``,
  ``KVCache``, ``shard_block_weights`` (Megatron-style tensor split).
- ``pipeline.loading``: ``load_model`` / ``load_gguf`` / ``load_hf``, ``reference_model_path``,
  ``gemma3_270m_path``, ``ModelLoadError``.
- ``pipeline.tokenizer``: ``Tokenizer.from_gguf`` / ``.from_file``, chat template.
- ``pipeline.generate``: ``generate``, ``stream``, ``generate_tokens``, ``Sampler``.
"""
