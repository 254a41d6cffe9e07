"""Weights kept quantized (pipeline/quant.py): GGUF blocks unpacked bit-exactly, the reference
GGUF's greedy output and logits under q4/q8 equal to the dequantized-fp32 model's, memory and
time per token against fp32 measured in one process, float weights within a stated tolerance,
and bad formats refused."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pytest
import torch

from pipeline.generate import generate_tokens
from pipeline.loading import ModelLoadError, load_model, reference_model_path
from pipeline.model import Llama, LlamaConfig
from pipeline.quant import (UNPACKERS, GGUFBlocks, QuantEmbedding, QuantLinear, check_weights, unpack_gguf,
                            weight_stats)
from pipeline.serve_options import WEIGHT_FORMATS, add_arguments, config_values

gguf = pytest.importorskip("gguf")
PROMPTS = [[1, 504, 3458, 314, 260, 3491, 30], [1, 9690, 28, 2683, 2362]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded machine two OpenMP threads stall at every op's
    barrier, and the quantized path runs more (smaller) ops than fp32; the ratio is measured on
    equal terms either way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fp32():
    return load_model(reference_model_path())


@pytest.fixture(scope="module")
def q4():
    return load_model(reference_model_path(), weights="q4")


def _layer(codes_kind: str, raw: np.ndarray, cols: int) -> QuantLinear:
    return QuantLinear.from_codes(unpack_gguf(GGUFBlocks(codes_kind, raw, cols)), codes_kind, "cpu")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_unpacked_blocks_dequantize_bit_identical_to_gguf(qtype):
    """What the quantized module computes is exactly gguf's dequantized value, weight by weight
    (including blocks of all-equal values, zeros and a huge offset)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    w[3] = 0.0
    w[4] = 7.5
    w[5] = 1000.0 + rng.standard_normal(256).astype(np.float32) * 1e-3
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, t)
    layer = _layer(qtype, raw, 256)
    want = torch.from_numpy(gguf.quants.dequantize(raw, t).reshape(24, 256).astype(np.float32))
    assert torch.equal(layer.dequantize(), want)
    assert torch.equal(layer.dequantize(rows=torch.tensor([5, 0, 5])), want[[5, 0, 5]])
    assert layer.bits == (4 if qtype in ("Q4_0", "Q4_1") else 8)


def test_k_quants_of_the_gemma_file_bit_identical():
    """Q4_K and Q6_K (and the file's Q5_0 / Q8_0) from the real Gemma 3 270M Q4_K_M GGUF."""
    from pipeline.loading import gemma3_270m_path, open_gguf

    try:
        reader = open_gguf(gemma3_270m_path())
    except ModelLoadError as e:
        pytest.skip(str(e))
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in UNPACKERS and kind not in seen and len(t.shape) == 2 and int(t.shape[1]) <= 2048:
            seen.add(kind)
            raw = np.asarray(t.data)
            layer = _layer(kind, raw, int(t.shape[0]))
            want = gguf.quants.dequantize(raw, t.tensor_type).reshape(raw.shape[0], -1)
            assert torch.equal(layer.dequantize(), torch.from_numpy(np.array(want, dtype=np.float32))), kind
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= seen


def test_reference_gguf_q4_greedy_and_logits_identical_to_fp32(fp32, q4):
    """SmolLM2's Q4_1 GGUF (Q8_0 embedding) kept quantized computes what the dequantized fp32
    model computes: the same greedy tokens, and logits equal (the head is tiled; measured 0.0)."""
    assert isinstance(q4.embedding, QuantEmbedding) and q4.blocks["0"].q.kind == "Q4_1"
    with torch.inference_mode():
        ids = torch.tensor([PROMPTS[0]])
        diff = (fp32(ids) - q4(ids)).abs().max().item()
    assert diff <= 1e-5, diff
    want = torch.stack(list(generate_tokens(fp32, PROMPTS, 12)))
    got = torch.stack(list(generate_tokens(q4, PROMPTS, 12)))
    assert torch.equal(want, got)


def test_q8_keeps_the_file_types_and_a_middle_span_matches(fp32):
    """q8 keeps the file's Q4_1 blocks too (no requantizing); a middle span (no embedding, no
    head) run with a KV cache equals fp32's, and weighs <= 0.3x."""
    span = range(10, 20)
    part = load_model(reference_model_path(), span, weights="q8")
    ref = load_model(reference_model_path(), span)
    assert part.blocks["10"].down.kind == "Q4_1"
    h = torch.randn(2, 6, part.cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = ref.run_blocks(h, 10, 20, ref.new_cache(2))
        b = part.run_blocks(h, 10, 20, part.new_cache(2))
    assert torch.equal(a, b)
    (p1, bytes_q), (p2, bytes_f) = weight_stats(part), weight_stats(ref)
    assert p1 == p2 and bytes_q <= 0.3 * bytes_f, (bytes_q, bytes_f)


def test_q4_weight_memory_and_time_per_token(fp32, q4, capsys):
    """Targets: q4 weight memory <= 0.3x fp32 (asserted); time per token <= 1.1x (measured and
    printed: both models decode back to back in this process, medians over rounds; the bound
    asserted is loose, 2.5x, because the machine is shared -- it catches a pathological path
    such as dequantizing the whole embedding per token)."""
    (params_q, bytes_q), (params_f, bytes_f) = weight_stats(q4), weight_stats(fp32)
    assert params_q == params_f == 134515008
    assert bytes_q <= 0.3 * bytes_f, (bytes_q, bytes_f)

    def per_token(model, n=12):
        ts, last = [], time.perf_counter()
        for _ in generate_tokens(model, PROMPTS[:1], n):
            now = time.perf_counter()
            ts.append(now - last)
            last = now
        return statistics.median(ts[1:])  # decode steps (the first is the prefill)

    rounds = {"fp32": [], "q4": []}
    for _ in range(3):
        rounds["fp32"].append(per_token(fp32))
        rounds["q4"].append(per_token(q4))
    ratio = statistics.median(rounds["q4"]) / statistics.median(rounds["fp32"])
    with capsys.disabled():
        print(f"\nq4 weights {bytes_q / 1e6:.1f} MB vs fp32 {bytes_f / 1e6:.1f} MB ({bytes_q / bytes_f:.3f}x); "
              f"ms/token fp32 {[round(t * 1e3, 1) for t in rounds['fp32']]} q4 "
              f"{[round(t * 1e3, 1) for t in rounds['q4']]}: {ratio:.2f}x")
    assert ratio <= 2.5, ratio


def _hf_folder(folder, ref: Llama):
    """Save ``ref`` as a Hugging Face Qwen2 folder (config.json + safetensors)."""
    from safetensors.torch import save_file

    from pipeline.loading import hf_name

    cfg = ref.cfg
    save_file({hf_name(k, cfg): v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "m.safetensors"))
    (folder / "config.json").write_text(
        '{"model_type": "qwen2", "vocab_size": %d, "hidden_size": %d, "num_hidden_layers": %d, '
        '"num_attention_heads": %d, "num_key_value_heads": %d, "intermediate_size": %d, "rms_norm_eps": %g, '
        '"max_position_embeddings": %d, "tie_word_embeddings": true, "rope_theta": %g}'
        % (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.norm_eps,
           cfg.max_seq_len, cfg.rope_theta))
    return folder


@pytest.mark.parametrize("weights,tol", [("bf16", 0.02), ("q8", 0.02), ("q4", 0.25)])
def test_float_weights_quantized_within_tolerance(tmp_path, weights, tol):
    """Float weights (a Qwen2 safetensors folder with q/k/v biases) are quantized at load: the
    softmax of the logits stays within ``tol`` (max abs) of the fp32 model's, and bf16 / Q8_0
    weights stay within their rounding bound of the originals."""
    import dataclasses

    cfg = dataclasses.replace(LlamaConfig.tiny(), n_layers=2, family="qwen2", qkv_bias=True)
    torch.manual_seed(0)
    ref = Llama(cfg).eval()
    with torch.no_grad():
        for b in ref.blocks.values():
            for lin in (b.q, b.k, b.v):
                lin.bias.normal_(0, 0.02)
    model = load_model(_hf_folder(tmp_path, ref), weights=weights)
    q = model.blocks["0"].q
    assert isinstance(q, QuantLinear) and q.kind == {"bf16": "BF16", "q8": "Q8_0", "q4": "Q4_1"}[weights]
    assert torch.equal(q.bias, ref.blocks["0"].q.bias)
    w, w_ref = q.dequantize(), ref.blocks["0"].q.weight
    if weights == "bf16":
        assert ((w - w_ref).abs() <= w_ref.abs() * 2 ** -8).all()
    elif weights == "q8":  # per block of 32: half a step (absmax / 254) + 127 x the fp16 scale's rounding
        amax = w_ref.view(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)
        assert ((w - w_ref).view(w.shape[0], -1, 32).abs() <= amax * (1 / 254 + 2 ** -11) * 1.001).all()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.inference_mode():
        err = (model(x).softmax(-1) - ref(x).softmax(-1)).abs().max().item()
    assert err <= tol, err


def test_bad_weight_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        load_model(reference_model_path(), [0], weights="int3")
    with pytest.raises(ValueError, match="choose one of fp32, bf16, q8, q4"):
        check_weights("Q4")
    with pytest.raises(ValueError, match="unknown weight format"):
        config_values({"serve_weights": "q2"})
    assert config_values({"serve_weights": "q4", "serve_max_sessions": None}) == {"weights": "q4"}
    parser = argparse.ArgumentParser(prog="peer join")
    add_arguments(parser)
    assert parser.parse_args(["--weights", "q8"]).serve_weights == "q8"
    assert parser.parse_args(["--serve-weights", "bf16"]).serve_weights == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--serve-weights", "int4"])
    assert WEIGHT_FORMATS == ("fp32", "bf16", "q8", "q4")
    # GGUF blocks whose size does not match the shape: a ModelLoadError, not a crash
    bad = GGUFBlocks("Q4_1", np.zeros((4, 19), dtype=np.uint8), 32)
    with pytest.raises(ValueError, match="cannot hold 32 columns"):
        unpack_gguf(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path is tested above)")
def test_cuda_q4_equals_dequantized_fp32_on_cuda():
    path = reference_model_path()
    a = load_model(path, device="cuda")
    b = load_model(path, device="cuda", weights="q4")
    assert b.blocks["0"].q.codes.is_cuda
    want = torch.stack(list(generate_tokens(a, PROMPTS, 16)))
    got = torch.stack(list(generate_tokens(b, PROMPTS, 16)))
    assert torch.equal(want, got)
