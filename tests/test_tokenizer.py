"""Tokenizer built from the GGUF metadata vs HF transformers' tokenizer loaded from the same file."""
from __future__ import annotations

import os
import random

import pytest

from pipeline.loading import ModelLoadError, reference_model_path
from pipeline.tokenizer import Tokenizer

TEXTS = ["Hello world", "Hello 12345 world, it's 3.14159!", "  leading spaces\n\n\ttabs  ",
         "<|im_start|>user\nHi<|im_end|>\n", "ünïcödé 日本語 emoji 🤗🚀", "a1b2 c33 d 444 x",
         "def f(x):\n    return x**2  # comment\n", "I'm you're we'll they'd", "", " ", "1 2 3 10 100 1000"]


@pytest.fixture(scope="module")
def path():
    return reference_model_path()


@pytest.fixture(scope="module")
def tok(path):
    return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def hf_tok(path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _corpus() -> list[str]:
    rng = random.Random(0)
    chars = "abc XYZ 0123456789 .,!?'\"\n\t-é日🤗<|>"
    return TEXTS + ["".join(rng.choice(chars) for _ in range(rng.randint(1, 40))) for _ in range(300)]


def test_matches_transformers_tokenizer(tok, hf_tok):
    """transformers' GGUF converter omits the pre-tokenizer's digit split that llama.cpp applies for
    tokenizer.ggml.pre == "smollm" (and that SmolLM2's own tokenizer.json has); the two only differ
    when a run of whitespace precedes a digit. So: equal to transformers' tokenizer with that split
    restored on every text, and equal to it unchanged on texts without that pattern."""
    from tokenizers import pre_tokenizers

    backend = hf_tok.backend_tokenizer
    plain = [backend.encode(t, add_special_tokens=False).ids for t in _corpus()]
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     backend.pre_tokenizer])
    checked = 0
    for text, ref_plain in zip(_corpus(), plain):
        ids = tok.encode(text)
        assert ids == backend.encode(text, add_special_tokens=False).ids, text
        if not any(c.isspace() and d.isdigit() for c, d in zip(text, text[2:])):
            assert ids == ref_plain, text
            checked += 1
        assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert checked > 150
    assert tok.encode("  0") == [256, 32]  # "ĠĠ", "0" as llama.cpp splits it


def test_special_ids_and_chat_template(tok, hf_tok):
    assert (tok.eos_id, tok.bos_id) == (2, 1)
    assert tok.token_text(tok.eos_id) == "<|im_end|>"
    assert tok.encode("<|im_start|>user") == [1, 4093]
    for msgs in ([{"role": "user", "content": "What is 2+2?"}],
                 [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
        for gen in (True, False):
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == hf_tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")
    for bad in ([], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}]):
        with pytest.raises(ValueError):
            tok.apply_chat_template(bad)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_from_tokenizer_json(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    other = Tokenizer.from_file(tmp_path)
    assert other.eos_id == tok.eos_id
    for text in TEXTS:
        assert other.decode(other.encode(text)) == text
    msgs = [{"role": "user", "content": "Hi"}]
    assert other.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_file(tmp_path / "broken.json")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_file(tmp_path / "missing.json")
