"""Tokenizer for Llama-family models, built with Hugging Face ``tokenizers``.

From a GGUF file: the GPT-2 byte-level BPE vocabulary and merges stored in the metadata
(``tokenizer.ggml.*``), control tokens (token_type 3) registered as special tokens so chat markers
encode to one id, bos/eos ids, and ``tokenizer.chat_template`` (rendered with jinja2, as HF does).
From a ``tokenizer.json``: the file itself, plus ``tokenizer_config.json`` beside it if present.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from pipeline.chat_template import compile_template, render
from pipeline.loading import ModelLoadError, gguf_field, open_gguf

_CONTROL = 3  # llama.cpp token type of control tokens (<|im_start|>, <|endoftext|>, ...)

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the splitting they stand for.
# GPT-2's regex, with each digit first split off on its own (as llama.cpp's llama-vocab.cpp does):
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"default", "gpt2", "mpt", "olmo", "jais"}
# Llama 3's regex (contractions, letters, 1-3 digit groups, punctuation, newlines, spaces):
_LLAMA3 = {"llama-bpe", "llama3"}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    def __init__(self, tk: _HFTokenizer, *, eos_id: int, bos_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        self._tk = tk
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._template = None

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        reader = open_gguf(path)
        model = gguf_field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(f"unsupported GGUF tokenizer model {model!r} (only byte-level BPE 'gpt2')")
        tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
        types = list(gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
        tk = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
        pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3)
        if pre in _DIGIT_SPLIT:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _LLAMA3:
            split = pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated")
            tk.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        elif pre in _GPT2:
            tk.pre_tokenizer = byte_level
        else:
            raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}")
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, kind in enumerate(types) if kind == _CONTROL])
        bos = gguf_field(reader, "tokenizer.ggml.bos_token_id", -1)
        return cls(tk, eos_id=int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
                   bos_id=int(bos) if bos >= 0 else None,
                   add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
                   chat_template=gguf_field(reader, "tokenizer.chat_template", ""))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """A ``tokenizer.json`` (or a folder holding one), with ``tokenizer_config.json`` and
        ``chat_template.jinja`` beside it when present (special tokens, chat template)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            tk = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read tokenizer {path}: {e}") from e
        conf_path = path.parent / "tokenizer_config.json"
        try:
            conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        except ValueError as e:
            raise ModelLoadError(f"{conf_path} is not valid JSON: {e}") from e

        def token_id(name: str) -> int | None:
            tok = conf.get(name)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return tk.token_to_id(tok) if isinstance(tok, str) else None

        eos = token_id("eos_token")
        if eos is None:
            eos = next((tk.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "</s>")
                        if tk.token_to_id(t) is not None), None)
        if eos is None:
            raise ModelLoadError(f"cannot tell the end-of-sequence token of {path}")
        template = conf.get("chat_template") or ""
        if not template and (path.parent / "chat_template.jinja").is_file():
            template = (path.parent / "chat_template.jinja").read_text()
        return cls(tk, eos_id=eos, bos_id=token_id("bos_token"), add_bos=bool(conf.get("add_bos_token", False)),
                   chat_template=template)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Special-token strings in ``text`` (e.g. ``<|im_start|>``) encode to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template, in
        this thread and unbounded: for templates this process trusts (untrusted ones go through
        ``pipeline.chat_template.TemplateRenderer``)."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = compile_template(self.chat_template)
        return render(self._template, messages, add_generation_prompt=add_generation_prompt, **self.special_tokens())

    def special_tokens(self) -> dict[str, str]:
        """The token strings chat templates see as ``bos_token`` / ``eos_token``."""
        return {"bos_token": (self.token_text(self.bos_id) or "") if self.bos_id is not None else "",
                "eos_token": self.token_text(self.eos_id) or ""}
