"""Train -> serve (issue 18, item 6): a train run's checkpoint exported with
``coordinator checkpoints export`` is a real Hugging Face folder.

The trainer state is built in-process (``diloco.run_config.build_model`` of the ``micro`` preset,
a few AdamW steps so the weights are not the seeded init), stored the way a train peer uploads it
(``diloco.state_io.build_manifest``: parameters + outer momenta, the model config, the run config
in meta) through the coordinator's ``CheckpointStore``, then exported. Oracles: transformers'
``from_pretrained`` (logits, tokenizer ids) and the serving loader (bit-identical logits); a real
`peer join --serve EXPORT` swarm of 2 stages generates the same greedy text as
``pipeline.generate`` on the trainer's own model object.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from coordinator.checkpoints import CheckpointStore, InvalidConfig, export_hf, open_backend, save_state
from diloco.run_config import ByteTokenizer, RunConfig, build_model, run_tokenizer
from diloco.state_io import MOMENTUM_PREFIX, build_manifest
from pipeline.hf_export import ExportError, save_hf, save_tokenizer
from pipeline.loading import load_hf
from pipeline.model import Llama, LlamaConfig
from pipeline.tokenizer import Tokenizer
from tests.harness import ROOT, Procs, start_coordinator, wait_until

TEXT = "To be, or not to be, that is the question: "
SAMPLE = "Whether 'tis nobler in the mind — to suffer\tthe slings… 日本\n"  # multi-byte UTF-8 too


def trained_model(cfg: RunConfig, steps: int = 20) -> Llama:
    """The run's initial model after a few inner steps on TEXT (so greedy output means something)."""
    model = build_model(cfg)
    ids = torch.tensor([ByteTokenizer().encode(TEXT * 4)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trainer_checkpoint(run: str, step: int, cfg: RunConfig, model: Llama):
    """(manifest, chunks) of ``model`` as a train peer uploads it (diloco/role.py:_checkpoint):
    fp32 params and momenta, the model config, the run config and the trainer hash in meta."""
    from coordinator.checkpoints import trainer_state_hash

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = {**params, **{MOMENTUM_PREFIX + n: torch.full_like(p, 0.5) for n, p in params.items()}}
    config = dataclasses.asdict(cfg.model_config)
    bare, chunks = build_manifest(run, step, tensors, config=config)
    meta = {"global_state_hash": trainer_state_hash(bare, lambda sha: bytes(chunks[sha])), "outer_step": step,
            "run_config": cfg.to_dict()}
    return build_manifest(run, step, tensors, config=config, meta=meta)


def store_checkpoint(data_dir, run: str, step: int, cfg: RunConfig, model: Llama) -> CheckpointStore:
    manifest, chunks = trainer_checkpoint(run, step, cfg, model)
    store = CheckpointStore(open_backend(data_dir), run)
    for sha, data in chunks.items():
        store.put_chunk(data, expected_sha=sha)
    store.put_manifest(step, manifest)
    return store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = RunConfig(preset="micro")
    model = trained_model(cfg)
    store = store_checkpoint(tmp / "data", "shakes", 7, cfg, model)
    out = export_hf(store, None, tmp / "export")
    return {"cfg": cfg, "model": model, "store": store, "out": out, "data": tmp / "data", "tmp": tmp}


def test_export_is_a_hugging_face_folder(trained):
    transformers = pytest.importorskip("transformers")
    out, model = trained["out"], trained["model"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["architectures"] == ["LlamaForCausalLM"]
    assert conf["num_hidden_layers"] == 2 and conf["tie_word_embeddings"] is True and conf["eos_token_id"] == 0

    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names, meta = set(f.keys()), f.metadata()
    assert "model.embed_tokens.weight" in names and "model.layers.1.self_attn.q_proj.weight" in names
    assert not any("blocks." in n or MOMENTUM_PREFIX in n for n in names)  # HF names; no optimizer state
    assert "lm_head.weight" not in names  # tied: stored once, as the embedding
    manifest = trained["store"].load_manifest(7)
    assert meta["lowband_step"] == "7" and meta["lowband_state_hash"] == manifest.state_hash

    ids = torch.tensor([ByteTokenizer().encode(TEXT + SAMPLE)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
        assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-4), (theirs - ours).abs().max()
        assert torch.equal(load_hf(out)(ids), ours)  # the serving loader: the very same numbers

    # the run trains on UTF-8 bytes: both tokenizers of the folder give exactly those ids
    want = ByteTokenizer().encode(SAMPLE)
    assert Tokenizer.from_file(out).encode(SAMPLE) == want
    assert Tokenizer.from_file(out).decode(want) == SAMPLE
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(SAMPLE, add_special_tokens=False) == want and hf_tok.eos_token_id == 0


def test_cli_export_bf16_and_errors(trained, capsys):
    transformers = pytest.importorskip("transformers")
    from coordinator.cli import main

    out, data = trained["tmp"] / "bf16", str(trained["data"])
    r = subprocess.run([sys.executable, "-m", "coordinator", "checkpoints", "export", "latest", str(out),
                        "--dtype", "bfloat16", "--data-dir", data], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "exported shakes@7" in r.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    capsys.readouterr()
    assert main(["checkpoints", "list", "--data-dir", data]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == [["shakes", "7"]]
    (trained["tmp"] / "afile").write_text("x")
    for step, where, message in [("seven", out, "STEP must be an integer or 'latest'"),
                                 ("8", out, "no checkpoint at step 8"), ("7", trained["tmp"] / "afile", "not a folder")]:
        assert main(["checkpoints", "export", step, str(where), "--data-dir", data]) == 1
        err = capsys.readouterr().err
        assert err.startswith("coordinator: ") and message in err, err


FAMILIES = {
    "llama-untied-scaled": LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                       max_seq_len=128, tie_embeddings=False, rope_scale=2.0, norm_eps=1e-6),
    "qwen2": LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                         max_seq_len=128, family="qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, head_dim=32,
                         max_seq_len=128, family="qwen3", qk_norm=True, tie_embeddings=False, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_families_load_in_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    cfg = FAMILIES[name]
    torch.manual_seed(1)
    model = Llama(cfg).eval()
    with torch.no_grad():  # nonzero biases and norm weights, so a dropped or misnamed tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf(tmp_path, model.state_dict(), cfg)
    assert load_hf(tmp_path).cfg == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = model(ids)
        assert torch.allclose(hf(ids).logits, ours, atol=1e-5, rtol=1e-4)
        assert torch.equal(load_hf(tmp_path)(ids), ours)


def test_reference_tokenizer_round_trips(tmp_path):
    """A smollm2-135m run trains on the reference (GGUF) tokenizer: its export ships it as
    tokenizer.json with the special tokens and chat template."""
    transformers = pytest.importorskip("transformers")
    from pipeline.loading import ModelLoadError
    try:
        ref = run_tokenizer(RunConfig(preset="smollm2-135m"))
    except ModelLoadError as e:
        pytest.skip(str(e))
    save_tokenizer(ref, tmp_path, 2048)
    chat = ref.apply_chat_template([{"role": "user", "content": "Hi there, 123 ünïcode!"}])
    back = Tokenizer.from_file(tmp_path)
    assert back.encode(chat) == ref.encode(chat) and back.eos_id == ref.eos_id
    assert back.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        ref.apply_chat_template([{"role": "user", "content": "Hi"}])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode(chat, add_special_tokens=False) == ref.encode(chat)


def test_bad_states_and_configs_are_refused(tmp_path, trained):
    cfg = RunConfig(preset="micro").model_config
    state = trained["model"].state_dict()
    with pytest.raises(ExportError, match="gemma3 family is not supported"):
        save_hf(tmp_path / "g", state, dataclasses.replace(cfg, family="gemma3"))
    with pytest.raises(ExportError, match="sliding-window"):
        save_hf(tmp_path / "s", state, dataclasses.replace(cfg, sliding_layers=(0,), sliding_window=8))
    with pytest.raises(ExportError, match="no Hugging Face equivalent"):  # a flag HF llama cannot say
        save_hf(tmp_path / "q", state, dataclasses.replace(cfg, logit_softcap=30.0))
    missing = {k: v for k, v in state.items() if k != "blocks.1.down.weight"}
    with pytest.raises(ExportError, match=r"missing \['blocks.1.down.weight'\]"):
        save_hf(tmp_path / "m", missing, cfg)
    with pytest.raises(ExportError, match="has shape"):
        save_hf(tmp_path / "w", {**state, "norm.weight": torch.ones(3)}, cfg)
    with pytest.raises(ExportError, match=r"unexpected \['lm_head.weight'\]"):  # tied: no head of its own
        save_hf(tmp_path / "t", {**state, "lm_head.weight": state["embedding.weight"].clone()}, cfg)
    with pytest.raises(ExportError, match="have the 1000000000 blocks"):  # refused before building them
        save_hf(tmp_path / "b", state, dataclasses.replace(cfg, n_layers=10**9))
    assert not any((tmp_path / d).exists() for d in "gsqmwtb")  # nothing half-written
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(ExportError, match="already holds other weights"):
        save_hf(tmp_path / "other", state, cfg)

    # checkpoints that are not a lowband train state: a typed error naming the checkpoint
    store = CheckpointStore(open_backend(tmp_path / "data"), "odd")
    save_state(store, 1, {"w": torch.zeros(3)})  # no model config
    with pytest.raises(InvalidConfig, match="odd@1: the checkpoint stores no model config"):
        export_hf(store, 1, tmp_path / "x")
    save_state(store, 2, {"w": torch.zeros(3)}, config={"dim": 3, "colour": "red"})
    with pytest.raises(InvalidConfig, match="not a lowband model config"):
        export_hf(store, 2, tmp_path / "x")
    save_state(store, 3, dict(state), {"run_config": {"preset": "huge"}}, config=dataclasses.asdict(cfg))
    with pytest.raises(InvalidConfig, match="run config is invalid"):
        export_hf(store, 3, tmp_path / "x")
    save_state(store, 4, {"blocks.0.q.weight": torch.zeros(2)}, config=dataclasses.asdict(cfg))
    with pytest.raises(InvalidConfig, match="odd@4: state does not have the 2 blocks"):
        export_hf(store, 4, tmp_path / "x")


@pytest.mark.slow
def test_peer_join_serves_the_export_over_two_stages(trained):
    """`peer join --serve EXPORT --blocks 0:1` and `1:2`: greedy text through the swarm equals
    pipeline.generate on the trainer's own model and the run's tokenizer."""
    from pipeline.client import InferenceClient
    from pipeline.generate import generate

    token = "export-serve-token-6f1c9a7e2b4d8c0f3a5e7b9d1c3f5a7e9b1d3f5a"
    out, tmp = str(trained["out"]), trained["tmp"]
    want = generate(trained["model"], ByteTokenizer.hf(), TEXT[:12], 24)
    assert want and generate(load_hf(out), Tokenizer.from_file(out), TEXT[:12], 24) == want
    procs = Procs()
    try:
        url = start_coordinator(procs, tmp / "coord", token).ready["url"]
        servers = [procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", token,
                                "--listen", "127.0.0.1:0", "--key", str(tmp / f"s{i}.key"), "--device", "cpu",
                                "--serve", out, "--blocks", span, wait_ready=False)
                   for i, span in enumerate(("0:1", "1:2"))]
        for s in servers:
            s.wait_for_line("READY ", timeout=120)
        client = InferenceClient(url, token)
        try:
            wait_until(lambda: len(client.call(client.servers, out)) == 2, 60, "both stages announced")
            assert client.generate(out, TEXT[:12], 24) == want
        finally:
            client.close()
    finally:
        procs.cleanup()


async def test_export_latest_from_the_coordinator(procs, tmp_path, trained):
    """`--serve RUN@latest`'s source: the run's latest checkpoint, fetched from a real coordinator
    over signed requests, exported once into the cache and reused."""
    from diloco.export import export_latest
    from diloco.run_client import RunClient
    from peer.identity import Identity

    token = "export-latest-token-0b7e5c3a9d1f4e6b8a2c0d9e7f5b3a1c8e6d4f2b"
    url = start_coordinator(procs, tmp_path / "coord", token).ready["url"]
    trainer = RunClient(url, token, Identity.generate(), timeout=30)
    server = RunClient(url, token, Identity.generate(), timeout=30)
    try:
        await server.join("127.0.0.1:9", {"roles": ["serve"]})
        with pytest.raises(ExportError, match="run shakes has no checkpoint yet"):
            await export_latest(server, "shakes", tmp_path / "cache")
        await trainer.join("127.0.0.1:9", {"roles": ["train"]})
        assert not (await trainer.join_run("shakes", {"preset": "micro", "sync_timeout_s": 5.0}, []))["conflicts"]
        manifest, chunks = trainer_checkpoint("shakes", 1, trained["cfg"], trained["model"])
        await trainer.sync("shakes", 1, "0" * 64, deadline_s=30)
        await trainer.report("shakes", 1, manifest.meta["global_state_hash"], {})
        await trainer.upload_checkpoint(manifest, chunks)

        folder = await export_latest(server, "shakes", tmp_path / "cache")
        assert folder.parent == tmp_path / "cache" / "exports" / "shakes" and folder.name.startswith("1-")
        ids = torch.tensor([ByteTokenizer().encode(TEXT)])
        with torch.no_grad():
            assert torch.equal(load_hf(folder)(ids), trained["model"](ids))
        assert Tokenizer.from_file(folder).encode(SAMPLE) == ByteTokenizer().encode(SAMPLE)
        stamp = (folder / "model.safetensors").stat().st_mtime_ns
        assert await export_latest(server, "shakes", tmp_path / "cache") == folder  # cached, not rewritten
        assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
        assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left
    finally:
        await trainer.close()
        await server.close()
