"""The OpenAI gateway as a public endpoint (issue 14, item 6).

Unit tier: the API keys file, constant-time lookup over every key, quota accounting, and the
bounded chat-template renderer (real worker processes). Process tier, over real TCP: a
coordinator, two `peer join --serve` servers of tiny models (tests/tiny_serving.py), one whose
tokenizer carries an honest chat template and one whose template loops for hours (a hostile
serving peer), and two `peer gateway` processes: one with an API keys file, one open with a
locally pinned --chat-template. Each attack fails with a clear error while an honest client
still gets the single-process answer."""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from pipeline import api_keys
from pipeline.api_keys import KeyRing, Quota, QuotaExceeded, Usage
from pipeline.chat_template import TemplateBoundExceeded, TemplateError, TemplateRenderer
from tests.harness import Procs, start_coordinator, wait_until
from tests.tiny_serving import write_tiny_model

TOKEN = "gateway-security-token-0d9f3a7c2e6b1f8a4d5c9e0b7a3f6d2c1e8b4a9f"
HONEST = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
HOSTILE = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}" + HONEST
MESSAGES = [{"role": "user", "content": "w1 w2 w3"}]
PROMPT = "w1 w2 w3 w4"
NEW = 8
ALICE = "alice-key-5f1c9a0e7b3d2f6a8c4e"
BOB = "bob-key-2a7e4c9f1b6d3e8a0c5f"
CAROL = "carol-key-9b3e6a1f4c8d2e7a5b0c"
KEYS_FILE = f"""# test keys
{ALICE} name=alice concurrent=1 prompts=2 max_tokens=16 kv_slots=40
{BOB}   name=bob
sha256:{hashlib.sha256(CAROL.encode()).hexdigest()} name=carol   # stored as its digest
"""
TEMPLATE_TIMEOUT = 3.0


# ------------------------------------------------------------------------------- unit tier
@pytest.mark.fast
def test_keys_file_format():
    ring = KeyRing.parse(KEYS_FILE, Quota(concurrent=3))
    assert [k.name for k in ring.keys] == ["alice", "bob", "carol"]
    assert ring.keys[0].quota == Quota(concurrent=1, prompts=2, max_tokens=16, kv_slots=40)
    assert ring.keys[1].quota == Quota(concurrent=3)
    assert ring.match(ALICE).name == "alice" and ring.match(CAROL).name == "carol"
    for wrong in ("", ALICE[:-1], ALICE + "x", "sha256:" + hashlib.sha256(CAROL.encode()).hexdigest()):
        assert ring.match(wrong) is None
    for text, needle in [("short-key", "line 1: a key needs at least 16"),
                         (f"{ALICE} concurrent=0", "concurrent must be an integer >= 1"),
                         (f"{ALICE} speed=3", "unknown field 'speed'"),
                         (f"{ALICE} concurrent", "expected NAME=VALUE"),
                         ("sha256:abc", "64 hex digits"),
                         (f"{ALICE}\n{ALICE}", "listed twice"),
                         ("# nothing\n", "at least one key")]:
        with pytest.raises(ValueError, match=needle):
            KeyRing.parse(text)


@pytest.mark.fast
def test_lookup_compares_every_key(monkeypatch):
    """No early exit: the first key, the last key and no key all cost one comparison per key."""
    ring = KeyRing.parse("\n".join(f"key-number-{i:08d}-padding" for i in range(5)))
    calls = []
    real = api_keys.hmac.compare_digest
    monkeypatch.setattr(api_keys.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for presented in ("key-number-00000000-padding", "key-number-00000004-padding", "nope"):
        calls.clear()
        ring.match(presented)
        assert len(calls) == 5, presented


@pytest.mark.fast
def test_usage_and_leases():
    usage = Usage(total_concurrent=3, total_kv_slots=100)
    q = Quota(concurrent=2, kv_slots=60)
    a1, a2 = usage.begin("a", q), usage.begin("a", q)
    with pytest.raises(QuotaExceeded, match="2 requests in flight") as e:
        usage.begin("a", q)
    assert e.value.kind == "requests"
    a1.charge_kv(50)
    with pytest.raises(QuotaExceeded, match="holds 50 of its 60") as e:
        a2.charge_kv(20)
    assert e.value.kind == "tokens"
    with pytest.raises(QuotaExceeded) as e:
        a2.charge_kv(61)                      # never fits: a 400, not a 429
    assert e.value.kind == "size"
    b = usage.begin("b", Quota(kv_slots=100))
    with pytest.raises(QuotaExceeded, match="gateway is serving 3"):
        usage.begin("c", q)
    with pytest.raises(QuotaExceeded, match="gateway holds 50 of its 100"):
        b.charge_kv(60)
    a1.release()
    a1.release()                              # idempotent
    b.charge_kv(60)
    a2.release()
    b.release()
    assert usage.requests == {} and usage.kv == {} and usage.all_requests == usage.all_kv == 0


def test_renderer_bounds():
    """Real worker processes: a hostile template is stopped by time, output or memory, is
    remembered, and the renderer keeps rendering honest templates."""
    async def run() -> None:
        r = TemplateRenderer(timeout_s=1.0, max_output=10_000, memory_bytes=512 << 20)
        try:
            assert await r.render(HONEST, MESSAGES) == "w1 w2 w3 "
            t0 = time.monotonic()
            with pytest.raises(TemplateBoundExceeded, match="within 1 s"):
                await r.render(HOSTILE, MESSAGES)
            assert 0.9 < time.monotonic() - t0 < 10
            t0 = time.monotonic()
            with pytest.raises(TemplateBoundExceeded, match="within 1 s"):   # remembered: at once
                await r.render(HOSTILE, MESSAGES)
            assert time.monotonic() - t0 < 0.5
            with pytest.raises(TemplateBoundExceeded, match="passed 10000 characters"):
                await r.render("{% for a in range(100000) %}xxxx{% endfor %}", MESSAGES)
            with pytest.raises(TemplateBoundExceeded, match="memory cap"):
                await r.render("{{ 'a' * 4000000000 }}", MESSAGES)
            with pytest.raises(TemplateError, match="no system role"):
                await r.render("{{ raise_exception('no system role') }}", MESSAGES)
            with pytest.raises(TemplateError, match="does not compile"):
                await r.render("{% for %}", MESSAGES)
            # Concurrent honest renders still work after all that.
            got = await asyncio.gather(*(r.render(HONEST, [{"role": "user", "content": f"w{i}"}]) for i in range(5)))
            assert got == [f"w{i} " for i in range(5)]
        finally:
            await r.aclose()

    asyncio.run(run())


# ---------------------------------------------------------------------------- process tier
@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("gwsec")
    models = {"good": tmp / "good", "evil": tmp / "evil"}
    write_tiny_model(models["good"], HONEST, seed=0)
    write_tiny_model(models["evil"], HOSTILE, seed=1)
    (tmp / "keys").write_text(KEYS_FILE)
    (tmp / "pinned.jinja").write_text(HONEST)
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        servers = [procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN, "--listen",
                                "127.0.0.1:0", "--key", str(tmp / f"{name}.key"), "--device", "cpu",
                                "--serve", str(path), wait_ready=False) for name, path in models.items()]
        common = ["-m", "peer.cli", "gateway", "--coordinator", url, "--token", TOKEN, "--port", "0",
                  "--template-timeout", str(TEMPLATE_TIMEOUT)]
        keyed = procs.python(*common, "--key", str(tmp / "g1.key"), "--api-keys-file", str(tmp / "keys"),
                             wait_ready=False)
        pinned = procs.python(*common, "--key", str(tmp / "g2.key"), "--chat-template", str(tmp / "pinned.jinja"),
                              wait_ready=False)
        for child in (*servers, keyed, pinned):
            child.wait_for_line("READY ", timeout=120)
        yield {"models": {k: str(v) for k, v in models.items()}, "keyed": keyed.ready["url"] + "/v1",
               "pinned": pinned.ready["url"] + "/v1"}
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def reference(swarm) -> dict:
    from pipeline.generate import generate
    from pipeline.loading import load_model
    from pipeline.tokenizer import Tokenizer

    out = {}
    for name, path in swarm["models"].items():
        model, tok = load_model(path), Tokenizer.from_file(path)
        tok.chat_template = HONEST  # the evil model's own template never finishes: use the pinned one
        out[name] = {"text": generate(model, tok, PROMPT, NEW), "chat": generate(model, tok, MESSAGES, NEW)}
    return out


def call(url: str, body: dict | None = None, key: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def api(swarm):
    base = swarm["keyed"]

    def ready() -> bool:
        status, body = call(base + "/models", key=BOB)
        return status == 200 and sum(m["ready"] for m in body["data"]) == 2

    wait_until(ready, 60, "both models to be listed ready")
    return base


def completion(model: str, prompt=PROMPT, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, **extra}


def test_api_keys_are_required(swarm, api, reference):
    good = swarm["models"]["good"]
    for key in (None, "", "wrong-key-0123456789abcdef", ALICE[:-1], ALICE + "x",
                "sha256:" + hashlib.sha256(CAROL.encode()).hexdigest()):
        status, body = call(api + "/completions", completion(good), key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (key, body)
    assert call(api + "/models")[0] == 401
    for key in (BOB, CAROL):
        status, body = call(api + "/completions", completion(good), key)
        assert status == 200 and body["choices"][0]["text"] == reference["good"]["text"], body


def test_per_key_quotas(swarm, api, reference):
    good = swarm["models"]["good"]
    status, body = call(api + "/completions", completion(good, ["w1", "w2", "w3"]), ALICE)
    assert status == 400 and body["error"]["param"] == "prompt" and "limit of 2" in body["error"]["message"], body
    status, body = call(api + "/completions", completion(good, max_tokens=17), ALICE)
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    # KV: 2 rows x (4 + 16) = 40 slots fits alice's 40; 2 x (5 + 16) = 42 never will.
    status, body = call(api + "/completions", completion(good, [PROMPT, "w5 w6"], max_tokens=16), ALICE)
    assert status == 200 and len(body["choices"]) == 2, body
    status, body = call(api + "/completions", completion(good, [PROMPT + " w5", "w6"], max_tokens=16), ALICE)
    assert status == 400 and body["error"]["code"] == "kv_quota_exceeded" and "42 KV slots" in body["error"]["message"]
    status, body = call(api + "/completions", completion(good), BOB)  # others are unaffected
    assert status == 200 and body["choices"][0]["text"] == reference["good"]["text"]


def test_hostile_template_cannot_stall_the_gateway(swarm, api, reference):
    """A serving peer's template that loops for hours: the chat fails after the template timeout
    (then at once), while the gateway keeps answering everyone else in the meantime; the request
    in flight also holds alice's one concurrent slot (429 for her second request)."""
    evil, good = swarm["models"]["evil"], swarm["models"]["good"]
    result: dict = {}

    def hostile_chat() -> None:
        t0 = time.monotonic()
        result["answer"] = call(api + "/chat/completions", {"model": evil, "messages": MESSAGES}, ALICE)
        result["seconds"] = time.monotonic() - t0

    attack = threading.Thread(target=hostile_chat)
    attack.start()
    try:
        time.sleep(0.5)
        status, body = call(api + "/completions", completion(good), ALICE)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
        status, body = call(api + "/chat/completions", {"model": good, "messages": MESSAGES, "max_tokens": NEW,
                                                        "temperature": 0}, BOB)
        assert status == 200 and body["choices"][0]["message"]["content"] == reference["good"]["chat"], body
        assert call(api + "/models", key=BOB)[0] == 200
        assert attack.is_alive(), "the honest requests should have been answered while the template ran"
    finally:
        attack.join(60)
    status, body = result["answer"]
    assert status == 503 and "did not render within" in body["error"]["message"], body
    assert TEMPLATE_TIMEOUT - 0.5 < result["seconds"] < TEMPLATE_TIMEOUT + 10
    t0 = time.monotonic()
    status, body = call(api + "/chat/completions", {"model": evil, "messages": MESSAGES}, BOB)
    assert status == 503 and time.monotonic() - t0 < 1.0, body  # remembered: no worker burnt again
    status, body = call(api + "/completions", completion(evil), BOB)  # the model itself still serves
    assert status == 200 and body["choices"][0]["text"] == reference["evil"]["text"], body


def test_pinned_template_replaces_the_servers(swarm, reference):
    base = swarm["pinned"]
    wait_until(lambda: sum(m["ready"] for m in call(base + "/models")[1]["data"]) == 2, 60, "both models ready")
    status, body = call(base + "/chat/completions", {"model": swarm["models"]["evil"], "messages": MESSAGES,
                                                     "max_tokens": NEW, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == reference["evil"]["chat"], body
