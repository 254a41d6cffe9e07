"""Our Llama vs HF transformers on SmolLM2-135M (same GGUF), KV cache, block ranges, tensor split,
loaders' errors, generation. The HF model and ours are loaded once per module."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from pipeline.generate import Sampler, generate, generate_tokens, stream
from pipeline.loading import ModelLoadError, load_gguf, load_hf, load_model, reference_model_path
from pipeline.model import Block, KVCache, Llama, LlamaConfig, shard_block_weights
from pipeline.tokenizer import Tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def path():
    return reference_model_path()


@pytest.fixture(scope="module")
def model(path):
    return load_gguf(path)


@pytest.fixture(scope="module")
def tok(path):
    return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def hf(path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])),
            tok.encode("The quick brown fox jumps over the lazy dog. 1234 + 5678 ="),
            tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"),
            tok.encode("Once")]


def test_logits_match_transformers(model, hf, prompts):
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            ours, theirs = model(x), hf(x).logits
            assert ours.shape == theirs.shape == (1, len(ids), 49152)
            assert (ours - theirs).abs().max().item() < TOL


def test_config_from_metadata(model):
    # The file stores eps as float32 (9.9999997e-06).
    assert dataclasses.replace(model.cfg, norm_eps=1e-5) == LlamaConfig.smollm2_135m()
    assert model.cfg.norm_eps == pytest.approx(1e-5)


def test_kv_cache_decode_equals_full_forward_and_replay(model, prompts):
    ids = torch.tensor([prompts[1][:14]])
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(1, capacity=4)  # small on purpose: the cache must grow
        h = model.run_blocks(model.embed(ids[:, :5]), 0, 30, cache)
        steps = [model.head(h)]
        for t in range(5, ids.shape[1]):
            steps.append(model.head(model.run_blocks(model.embed(ids[:, t:t + 1]), 0, 30, cache)))
        assert (torch.cat(steps, 1) - full).abs().max().item() < TOL
        # Failover: drop everything after slot 7, replay the rest, get the same logits.
        cache.truncate(7)
        replay = model.head(model.run_blocks(model.embed(ids[:, 7:]), 0, 30, cache))
        assert (replay - full[:, 7:]).abs().max().item() < TOL


def test_three_stage_ranges_equal_full_model(path, model, prompts):
    ids = torch.tensor([prompts[0]])
    stages = [load_gguf(path, blocks=range(a, b)) for a, b in ((0, 10), (10, 20), (20, 30))]
    # Each stage holds only its blocks (+ embedding on the first, norm/head on the last).
    assert {k.split(".")[1] for k in stages[1].state_dict() if k.startswith("blocks.")} == {str(i) for i in range(10, 20)}
    assert stages[1].embedding is None and not stages[1].with_head
    assert stages[0].embedding is not None and stages[2].with_head and stages[2].lm_head is not None
    with pytest.raises(ValueError):
        stages[1].run_blocks(torch.zeros(1, 1, 576), 5, 15)
    with torch.inference_mode():
        full = model(ids)
        caches = [s.new_cache(1) for s in stages]
        h = stages[0].embed(ids[:, :-1])
        for s, c, (a, b) in zip(stages, caches, ((0, 10), (10, 20), (20, 30))):
            h = s.run_blocks(h, a, b, c)
        prefill = stages[2].head(h)
        h = stages[0].embed(ids[:, -1:])
        for s, c, (a, b) in zip(stages, caches, ((0, 10), (10, 20), (20, 30))):
            h = s.run_blocks(h, a, b, c)
        out = torch.cat([prefill, stages[2].head(h)], 1)
        # One cache shared by consecutive ranges of one model: each range keeps its own slot count.
        shared = model.new_cache(1)
        h = model.run_blocks(model.run_blocks(model.embed(ids), 0, 12, shared), 12, 30, shared)
        assert shared.length == ids.shape[1] and (model.head(h) - full).abs().max().item() < TOL
    assert (out - full).abs().max().item() < TOL


def test_tensor_split_three_way_matches(model, prompts):
    """Megatron split of every block over K=3 (3 q heads + 1 kv head + 512 MLP columns each), run
    in-process: the all-reduce is the sum of the shards' partials."""
    cfg, k = model.cfg, 3
    shards = []
    for i in range(cfg.n_layers):
        full_state = {n: t for n, t in model.blocks[str(i)].state_dict().items()}
        row = []
        for r in range(k):
            b = Block(cfg.shard(r, k))
            b.load_state_dict(shard_block_weights(full_state, cfg, r, k))
            row.append(b.eval())
        shards.append(row)
    assert shards[0][0].cfg.n_heads == 3 and shards[0][0].cfg.n_kv_heads == 1 and shards[0][0].cfg.hidden_dim == 512
    ids = torch.tensor([prompts[1]])
    with torch.inference_mode():
        full = model(ids)
        caches = [KVCache(cfg.shard(r, k), range(cfg.n_layers), batch=1) for r in range(k)]

        def run(x, positions):
            h = model.embed(x)
            ctxs = [model.context(h, positions, c, c.layers[0].length) for c in caches]
            for i in range(cfg.n_layers):
                h = h + sum(s.attn_partial(h, ctx, c.layers[i]) for s, ctx, c in zip(shards[i], ctxs, caches))
                h = h + sum(s.mlp_partial(h) for s in shards[i])
            return model.head(h)

        t = ids.shape[1]
        prefill = run(ids[:, :-1], torch.arange(t - 1)[None])
        last = run(ids[:, -1:], torch.tensor([[t - 1]]))
    assert (torch.cat([prefill, last], 1) - full).abs().max().item() < TOL
    with pytest.raises(ValueError):
        cfg.shard(0, 2)  # 3 KV heads cannot be split two ways


def test_block_forward_all_reduce_hook(model):
    """Block.forward sums partials through the injected callable (here: x * 1 on an unsplit block)."""
    calls = []
    blk, h = model.blocks["0"], torch.randn(1, 4, 576)
    ctx = model.context(h, None, None)
    with torch.inference_mode():
        ref = blk(h, ctx)
        out = blk(h, ctx, all_reduce=lambda x: calls.append(x.shape) or x)
    assert len(calls) == 2 and torch.equal(ref, out)


def test_batch_left_padding_equals_single_rows(model, prompts):
    cfg = model.cfg
    with torch.inference_mode():
        w = max(map(len, prompts))
        cache = model.new_cache(len(prompts))
        tokens = torch.tensor([[0] * (w - len(p)) + p for p in prompts])
        pos = torch.tensor([[-1] * (w - len(p)) + list(range(len(p))) for p in prompts])
        last = model.head(model.run_blocks(model.embed(tokens), 0, cfg.n_layers, cache, pos)[:, -1])
        nxt = last.argmax(-1)
        step = model.head(model.run_blocks(model.embed(nxt[:, None]), 0, cfg.n_layers, cache,
                                           torch.tensor([[len(p)] for p in prompts]))[:, -1])
        for r, p in enumerate(prompts):
            single = model(torch.tensor([p + [int(nxt[r])]]))
            assert (single[0, -2] - last[r]).abs().max().item() < TOL
            assert (single[0, -1] - step[r]).abs().max().item() < TOL


def test_generate_matches_transformers_greedy(model, hf, tok):
    msgs = [{"role": "user", "content": "Name a color."}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
    ours = [int(t[0]) for t in generate_tokens(model, [ids], 8, stop_ids=[tok.eos_id])]
    assert ours == ref
    text = generate(model, tok, msgs, max_new_tokens=8)
    assert text == tok.decode([t for t in ref if t != tok.eos_id])
    assert "".join(stream(model, tok, msgs, max_new_tokens=8)) == text
    batch = generate(model, tok, [msgs, "Hello, my name is"], max_new_tokens=8)
    assert batch == [text, generate(model, tok, "Hello, my name is", max_new_tokens=8)]


def test_sampling_seeded_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]] * 4)
    a = Sampler(temperature=1.0, top_p=0.9, seed=3)(logits)
    b = Sampler(temperature=1.0, top_p=0.9, seed=3)(logits)
    assert torch.equal(a, b) and set(a.tolist()) <= {1, 2}
    assert Sampler(temperature=1.0, top_p=0.01, seed=0)(logits).tolist() == [1, 1, 1, 1]
    assert Sampler()(logits).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(max_new_tokens=0), dict(seed="x")])
def test_generate_bad_parameters(model, tok, kwargs):
    with pytest.raises(ValueError):
        generate(model, tok, "Hi", **{"max_new_tokens": 2, **kwargs})


def test_generate_prompt_over_context_limit(model, tok):
    with pytest.raises(ValueError, match="context limit"):
        generate_tokens(model, [[5] * 8190], 8).__next__()
    with pytest.raises(ValueError):
        generate(model, tok, [{"role": "user"}], max_new_tokens=2)
    with pytest.raises(ValueError):
        generate(model, tok, "", max_new_tokens=2)


def test_tiny_config_trains():
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny()
    m = Llama(cfg)
    assert 1e6 < sum(p.numel() for p in m.parameters()) < 5e6
    x = torch.randint(0, cfg.vocab_size, (4, 33))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in m.parameters())
    assert losses[-1] < losses[0] - 0.5
    # The untied variant has its own head.
    assert Llama(LlamaConfig(**{**cfg.__dict__, "tie_embeddings": False})).lm_head is not None
    with pytest.raises(ValueError):
        LlamaConfig(n_heads=9, n_kv_heads=2)


def test_malformed_files_raise_model_load_error(path, tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    with open(path, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    with pytest.raises(ModelLoadError):
        load_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelLoadError):
        load_gguf(garbage)
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(garbage)
    gguf = pytest.importorskip("gguf")
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture"):
        load_gguf(other)


@pytest.mark.slow
def test_hf_folder_loader(model, hf, tmp_path):
    # A HF folder written from transformers' own state dict and config (its GGUF-quantized model
    # refuses save_pretrained, so write the two files directly).
    from safetensors.torch import save_file

    conf = hf.config.to_dict()
    conf.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = load_hf(tmp_path)
    part = load_model(tmp_path, blocks=range(25, 30))
    assert part.cfg == model.cfg
    x = torch.tensor([[1, 2, 3, 400, 5000]])
    with torch.inference_mode():
        assert (ours(x) - model(x)).abs().max().item() < TOL
        h = model.run_blocks(model.embed(x), 0, 25)
        assert (part.head(part.run_blocks(h, 25, 30)) - model(x)).abs().max().item() < TOL
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_hf(bad)
    shutil.copy(tmp_path / "config.json", bad / "config.json")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_hf(bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError):
        load_hf(bad)
    with open(tmp_path / "model.safetensors", "rb") as src:
        (bad / "model.safetensors").write_bytes(src.read(1_000_000))
    with pytest.raises(ModelLoadError):
        load_hf(bad)


def _permute_rope_rows(w, n_heads):
    """llama.cpp's converter layout for attn_q/attn_k (rotary pairs adjacent)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_quant_types_and_untied_head(tmp_path):
    """A tiny llama GGUF written with several tensor types (as llama.cpp lays them out) loads back
    to the original weights within each type's quantization error."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    torch.manual_seed(0)
    cfg = dataclasses.replace(LlamaConfig.tiny(), tie_embeddings=False, n_layers=2)
    ref = Llama(cfg)
    types = {"q": Q.Q4_0, "k": Q.Q4_1, "v": Q.Q5_0, "o": Q.F16, "gate": Q.Q8_0, "up": Q.BF16, "down": Q.Q8_0}
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, cfg.n_layers), (w.add_context_length, cfg.max_seq_len),
                       (w.add_embedding_length, cfg.dim), (w.add_feed_forward_length, cfg.hidden_dim),
                       (w.add_head_count, cfg.n_heads), (w.add_head_count_kv, cfg.n_kv_heads),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_layer_norm_rms_eps, cfg.norm_eps),
                       (w.add_vocab_size, cfg.vocab_size)):
        add(value)

    def put(name, t, qtype):
        a = t.detach().numpy()
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    put("token_embd.weight", ref.embedding.weight, Q.Q8_0)
    put("output.weight", ref.lm_head.weight, Q.Q8_0)
    put("output_norm.weight", ref.norm.weight, Q.F32)
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
             "up": "ffn_up", "down": "ffn_down"}
    for i in range(cfg.n_layers):
        b = ref.blocks[str(i)]
        put(f"blk.{i}.attn_norm.weight", b.attn_norm.weight, Q.F32)
        put(f"blk.{i}.ffn_norm.weight", b.mlp_norm.weight, Q.F32)
        for ours, theirs in names.items():
            t = getattr(b, ours).weight
            t = _permute_rope_rows(t, cfg.n_heads if ours == "q" else cfg.n_kv_heads) if ours in "qk" else t
            put(f"blk.{i}.{theirs}.weight", t, types[ours])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    loaded = load_gguf(path)
    assert dataclasses.replace(loaded.cfg, norm_eps=cfg.norm_eps) == cfg and loaded.lm_head is not None
    for name, t in ref.state_dict().items():
        err = (loaded.state_dict()[name] - t).abs().max().item()
        assert err <= 0.15 * t.abs().max().item() + 1e-6, name  # a wrong row order would be ~100%
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.inference_mode():
        assert torch.allclose(loaded(x).softmax(-1), ref(x).softmax(-1), atol=2e-3)
    head_only = load_gguf(path, blocks=[1])
    assert head_only.embedding is None and set(head_only.blocks) == {"1"}
