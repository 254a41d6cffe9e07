"""`peer gateway` (OpenAI-compatible HTTP) and `peer generate` as real processes, in front of a
swarm of one `peer join --serve smollm2-135m` server (no --blocks: it places itself, here on
every block). Greedy answers must equal single-process ``pipeline.generate``."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.harness import ROOT, Procs, reference_model, start_coordinator

TOKEN = "gateway-test-token-7f0a6f740958c90b5f51f88c1fdf2d3f4b2d1491"
MODEL = "smollm2-135m"
NEW = 8
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
BATCH = ["Once upon a time", "The three primary colours are"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("gateway")
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        server = procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                              "--listen", "127.0.0.1:0", "--key", str(tmp / "s.key"), "--device", "cpu",
                              "--serve", MODEL, wait_ready=False)
        gateway = procs.python("-m", "peer.cli", "gateway", "--coordinator", url, "--token", TOKEN,
                               "--port", "0", "--key", str(tmp / "g.key"), wait_ready=False)
        yield url, server, gateway, tmp
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def reference():
    from pipeline.generate import generate

    model, tok = reference_model()
    return {"chat": generate(model, tok, MESSAGES, NEW), "text": generate(model, tok, "Once upon a time", NEW),
            "batch": generate(model, tok, BATCH, NEW)}


@pytest.fixture(scope="module")
def api(swarm, reference):
    _, server, gateway, _ = swarm
    server.wait_for_line("READY ", timeout=240)
    base = gateway.wait_for_line("READY ", timeout=120) and gateway.ready["url"] + "/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        models = get(base + "/models")[1]["data"]
        if models and models[0]["ready"]:
            return base
        time.sleep(0.3)
    raise AssertionError("the gateway never listed a ready model")


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, json.loads(r.read())


def post(url: str, body, raw: bool = False) -> tuple[int, dict | list[str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            text = r.read().decode()
            return r.status, ([line[6:] for line in text.split("\n") if line.startswith("data: ")] if raw
                              else json.loads(text))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models(api):
    status, body = get(api + "/models")
    assert status == 200 and body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == MODEL and m["ready"] and m["context_length"] == 8192


def test_chat_completion_matches_single_process(api, reference):
    status, body = post(api + "/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": NEW,
                                                    "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": reference["chat"]}
    assert body["usage"]["completion_tokens"] <= NEW and body["usage"]["prompt_tokens"] > 5
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_events(api, reference):
    status, events = post(api + "/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": NEW,
                                                 "temperature": 0, "stream": True}, raw=True)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    status, events = post(api + "/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": NEW,
                                                      "temperature": 0, "stream": True}, raw=True)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference["chat"]


def test_batched_prompts(api, reference):
    """A list of prompts is one batched session; choice i equals single-process batched greedy."""
    status, body = post(api + "/completions", {"model": MODEL, "prompt": BATCH, "max_tokens": NEW, "temperature": 0})
    assert status == 200, body
    assert [(c["index"], c["text"]) for c in body["choices"]] == list(enumerate(reference["batch"]))
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert 0 < body["usage"]["completion_tokens"] <= 2 * NEW and body["usage"]["prompt_tokens"] >= 8
    # Streamed, each chunk names its choice; joined per index they are the same completions.
    status, events = post(api + "/completions", {"model": MODEL, "prompt": BATCH, "max_tokens": NEW, "temperature": 0,
                                                 "stream": True}, raw=True)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert ["".join(c["text"] for c in chunks if c["index"] == i) for i in range(2)] == reference["batch"]


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "prompt": "hi"}, 404, "nope"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 9000}, 400, "max_tokens"),  # over the default quota
    ({"model": MODEL, "prompt": "hi " * 9000, "max_tokens": 1}, 400, "context limit"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["hi", ""]}, 400, "prompt"),
    ({"prompt": "hi"}, 400, "model"),
    (b"{not json", 400, "JSON"),
])
def test_errors(api, body, status, needle):
    got, answer = post(api + "/completions", body)
    assert got == status and needle in answer["error"]["message"], answer


def test_cli_generate(swarm, api, reference):
    url, key = swarm[0], str(swarm[3] / "c.key")
    run = subprocess.run([sys.executable, "-m", "peer.cli", "generate", "--coordinator", url, "--token", TOKEN,
                          "--key", key, "--model", MODEL, "--max-new-tokens", str(NEW), "--chat",
                          MESSAGES[0]["content"]],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference["chat"] + "\n"
    run = subprocess.run([sys.executable, "-m", "peer.cli", "generate", "--coordinator", url, "--token", TOKEN,
                          "--key", key, "--model", "nope", "hi"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 2 and "nope" in run.stderr
