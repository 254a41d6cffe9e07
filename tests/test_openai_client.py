"""The official ``openai`` Python client against `peer gateway` (issue 17, item 6).

Unit tier: request parsing (``pipeline.openai_request``), stop strings and incremental text
(``pipeline.completion_text``, with a real tokenizer) and the default max_tokens clamp.
Process tier, over real TCP: a coordinator, a `peer join --serve smollm2-135m` server, a server of
a tiny random model (tests/tiny_serving.py: 64-token context, so "the rest of the context" is
short), and a `peer gateway` with an API keys file, driven by ``openai.OpenAI``: chat, stream,
``stop``, ``n``, usage, ``stream_options.include_usage``, list-of-parts content, ``seed``, the
default max_tokens, ``/v1/models`` with and without a key, and clear 400s for what is not
supported. Greedy answers equal single-process ``pipeline.generate``."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the official openai client is a test extra: pip install openai")

from pipeline.api_keys import Quota, QuotaExceeded, default_max_tokens  # noqa: E402
from pipeline.completion_text import ChoiceText, Choices  # noqa: E402
from pipeline.openai_request import BadParam, parse_request  # noqa: E402
from tests.harness import Procs, reference_model, start_coordinator, wait_until  # noqa: E402
from tests.tiny_serving import write_tiny_model  # noqa: E402

TOKEN = "openai-client-test-token-3c8e1f0a9b7d6e5c4a2f1b0e9d8c7a6b5f4e3d2c"
MODEL = "smollm2-135m"
NEW = 12
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
BATCH = ["Once upon a time", "The three primary colours are"]
TINY_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
TINY_MESSAGES = [{"role": "user", "content": "w1 w2 w3"}]
KEY = "openai-test-key-7d1f3b9e5a0c2e8f"
SMALL = "openai-small-key-4b2e9f1a7c3d5e0b"   # max_tokens=5
SHARE = "openai-share-key-9e5a1c7f3b0d2e6a"   # kv_slots=40 over 2 concurrent: 20 slots per request
KEYS_FILE = f"{KEY} name=main\n{SMALL} name=small max_tokens=5\n{SHARE} name=share concurrent=2 kv_slots=40\n"


# ------------------------------------------------------------------------------- unit tier
HI = [{"role": "user", "content": "hi"}]


def chat(**extra) -> tuple[bool, dict]:
    return True, {"model": "m", "messages": HI, **extra}


def text(**extra) -> tuple[bool, dict]:
    return False, {"model": "m", "prompt": "x", **extra}


@pytest.mark.fast
@pytest.mark.parametrize("request_,param,needle", [
    (chat(tools=[{"type": "function"}]), "tools", "not supported"),
    (chat(logprobs=True), "logprobs", "not supported"),
    (chat(presence_penalty=0.5), "presence_penalty", "not supported"),
    (chat(response_format={"type": "json_object"}), "response_format", "not supported"),
    (chat(frobnicate=1), "frobnicate", "Unrecognized request argument"),
    (chat(prompt="x"), "prompt", "Unrecognized"),
    (text(messages=HI), "messages", "Unrecognized"),
    (text(echo=True), "echo", "not supported"),
    (text(logprobs=2), "logprobs", "not supported"),
    (text(best_of=3), "best_of", "must equal n"),
    (text(prompt=[1, 2, 3]), "prompt", "token-id prompts"),
    (text(prompt=["a", ""]), "prompt", "non-empty"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]", "'image_url' part"),
    (chat(messages=[{"role": "user", "content": []}]), "messages[0].content", "non-empty list"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "string or"),
    (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages[0].tool_call_id",
     "does not support"),
    (chat(messages=[]), "messages", "non-empty list"),
    (chat(stop=""), "stop", "1..256"),
    (chat(stop=["a"] * 17), "stop", "at most 16"),
    (chat(stop=3), "stop", "string or a list"),
    (chat(n=0), "n", "integer in \\[1, 128\\]"),
    (chat(n=True), "n", "integer"),
    (chat(seed=1 << 64), "seed", "64-bit"),
    (chat(temperature=3), "temperature", "in \\[0, 2\\]"),
    (chat(stream="yes"), "stream", "boolean"),
    (chat(stream_options={"include_usage": True}), "stream_options", "only allowed when 'stream' is true"),
    (chat(stream=True, stream_options={"include_usage": 1}), "stream_options", "include_usage"),
    (chat(max_tokens=0), "max_tokens", ">= 1"),
    (chat(model=""), "model", "required"),
])
def test_refused_requests(request_, param, needle):
    is_chat, body = request_
    with pytest.raises(BadParam, match=needle) as e:
        parse_request(body, chat=is_chat)
    assert e.value.param == param


@pytest.mark.fast
def test_accepted_requests():
    req = parse_request({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"}],
        "n": 3, "stop": "END", "seed": 5, "stream": True, "stream_options": {"include_usage": True},
        "max_completion_tokens": 7, "temperature": 0, "logprobs": False, "presence_penalty": 0.0, "user": "u",
        "tools": [], "response_format": {"type": "text"}, "parallel_tool_calls": True}, chat=True)
    assert req.prompts == ([{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "a\nb", "name": "x"}],)
    assert (req.n, req.rows, req.stop, req.seed, req.max_tokens, req.include_usage) == (3, 3, ("END",), 5, 7, True)
    req = parse_request({"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 2, "stop": ["x", "y", "x"],
                         "max_tokens": None, "logprobs": None}, chat=False)
    assert (req.rows, req.stop, req.max_tokens, req.temperature) == (4, ("x", "y"), None, 1.0)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from pipeline.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tinytok") / "m"
    write_tiny_model(folder, TINY_TEMPLATE)
    return Tokenizer.from_file(folder)


def feed(choice: ChoiceText, ids: list[int]) -> list[str]:
    return [choice.add(i) for i in ids]


def test_stop_strings_on_decoded_text(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("w1 w2 w3 w4 w5 w6")
    assert tok.decode(ids) == "w1 w2 w3 w4 w5 w6"
    # A stop string spanning tokens and ending inside one: cut before it, not sent, "stop".
    c = ChoiceText(tok.decode, eos_id=tok.eos_id, max_tokens=100, stop=["3 w"])
    pieces = feed(c, ids)
    assert "".join(pieces) == "w1 w2 w" and c.finish == "stop" and c.tokens == 4
    assert pieces[2] == " w" and pieces[3] == ""  # "w1 w2 w3": the tail "3" (could start "3 w") is held back
    # The held-back prefix that never completes is sent later; the end token flushes, uncounted.
    c = ChoiceText(tok.decode, eos_id=tok.eos_id, max_tokens=100, stop=["w2 w9"])
    assert "".join(feed(c, ids + [tok.eos_id, 5])) == "w1 w2 w3 w4 w5 w6" and c.finish == "stop" and c.tokens == 6
    # Earliest occurrence among several; max_tokens ends with "length".
    c = ChoiceText(tok.decode, eos_id=tok.eos_id, max_tokens=100, stop=["w5", "w2"])
    assert "".join(feed(c, ids)) == "w1 " and c.finish == "stop"
    c = ChoiceText(tok.decode, eos_id=tok.eos_id, max_tokens=3, stop=["w3 w4"])
    assert "".join(feed(c, ids)) == "w1 w2 w3" and c.finish == "length" and c.tokens == 3
    # Choices: events per row, each finish reported once; close() ends the rest with "length".
    rows = Choices(2, tok.decode, eos_id=tok.eos_id, max_tokens=10, stop=["w2"])
    assert rows.add([1, 1]) == [(0, "w1", None), (1, "w1", None)]
    assert rows.add([2, tok.eos_id]) == [(0, " ", "stop"), (1, "", "stop")] and rows.done
    rows = Choices(2, tok.decode, eos_id=tok.eos_id, max_tokens=10)
    rows.add([tok.eos_id, 4])
    assert rows.close() == [(1, "", "length")] and [c.finish for c in rows.rows] == ["stop", "length"]


def test_stop_strings_with_a_byte_level_tokenizer():
    """SmolLM2's byte-level BPE: multi-byte characters arrive over several tokens; joined pieces
    equal the whole decode up to the first stop string, for every cut point."""
    from pipeline.loading import reference_model_path
    from pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(reference_model_path())
    text = "Hello, world! The capital of France is Paris. Ünïcödé 😀 end"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for stop in ([], ["Paris"], ["France is", "xyz"], ["😀"], ["end"], ["l"], ["d"], ["é 😀 e"]):
        c = ChoiceText(tok.decode, eos_id=tok.eos_id, max_tokens=1000, stop=stop)
        pieces = feed(c, ids) + [c.close()]
        cuts = [text.find(s) for s in stop if s in text]
        assert "".join(pieces) == text[:min(cuts, default=len(text))], stop
        assert "\ufffd" not in "".join(pieces)
        assert c.finish == ("stop" if cuts else "length")


@pytest.mark.fast
def test_default_max_tokens_clamp():
    q = Quota(concurrent=4, max_tokens=4096, kv_slots=1 << 14)
    assert default_max_tokens(q, room=8192 - 30, rows=1, longest=30, total_kv_slots=1 << 14) == 4066
    assert default_max_tokens(q, room=64 - 30, rows=1, longest=30, total_kv_slots=1 << 14) == 34
    assert default_max_tokens(Quota(max_tokens=5), room=34, rows=1, longest=30, total_kv_slots=1 << 14) == 5
    share = Quota(concurrent=2, kv_slots=40)
    assert default_max_tokens(share, room=61, rows=1, longest=3, total_kv_slots=1 << 14) == 17
    assert default_max_tokens(share, room=61, rows=2, longest=3, total_kv_slots=1 << 14) == 7
    with pytest.raises(QuotaExceeded, match="no room for a completion") as e:
        default_max_tokens(share, room=61, rows=4, longest=5, total_kv_slots=1 << 14)
    assert e.value.kind == "size"


# ---------------------------------------------------------------------------- process tier
@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    procs = Procs()
    tmp = tmp_path_factory.mktemp("openai")
    tiny = tmp / "tiny"
    write_tiny_model(tiny, TINY_TEMPLATE, seed=3)
    (tmp / "keys").write_text(KEYS_FILE)
    try:
        url = start_coordinator(procs, tmp / "coord", TOKEN).ready["url"]
        join = ["-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN, "--listen", "127.0.0.1:0",
                "--device", "cpu"]
        servers = [procs.python(*join, "--key", str(tmp / "s1.key"), "--serve", MODEL, wait_ready=False),
                   procs.python(*join, "--key", str(tmp / "s2.key"), "--serve", str(tiny), wait_ready=False)]
        gateway = procs.python("-m", "peer.cli", "gateway", "--coordinator", url, "--token", TOKEN, "--port", "0",
                               "--key", str(tmp / "g.key"), "--api-keys-file", str(tmp / "keys"), wait_ready=False)
        for child in (*servers, gateway):
            child.wait_for_line("READY ", timeout=240)
        yield {"base": gateway.ready["url"] + "/v1", "tiny": str(tiny)}
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def reference(swarm):
    from pipeline.generate import generate
    from pipeline.loading import load_model
    from pipeline.tokenizer import Tokenizer

    model, tok = reference_model()
    tiny, tiny_tok = load_model(swarm["tiny"]), Tokenizer.from_file(swarm["tiny"])
    tiny_prompt = len(tiny_tok.encode(tiny_tok.apply_chat_template(TINY_MESSAGES)))
    return {"chat": generate(model, tok, MESSAGES, NEW), "batch": generate(model, tok, BATCH, NEW),
            "prompt_tokens": len(tok.encode(tok.apply_chat_template(MESSAGES))),
            "tiny_prompt": tiny_prompt,
            "tiny_rest": generate(tiny, tiny_tok, TINY_MESSAGES, 64 - tiny_prompt),
            "tiny_5": generate(tiny, tiny_tok, TINY_MESSAGES, 5),
            "tiny_17": generate(tiny, tiny_tok, TINY_MESSAGES, 17)}


@pytest.fixture(scope="module")
def client(swarm):
    api = openai.OpenAI(base_url=swarm["base"], api_key=KEY, timeout=180, max_retries=0)

    def ready() -> bool:
        return sum(m.model_extra.get("ready", False) for m in api.models.list().data) == 2

    wait_until(ready, 120, "both models to be listed ready")
    return api


def test_models_need_the_key(swarm, client):
    # No key at all (the official client refuses to send none): a plain request.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(swarm["base"] + "/models", timeout=60)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    for key in ("wrong-key-0123456789abcdef", KEY[:-1], KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=swarm["base"], api_key=key, max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=swarm["base"], api_key=key, max_retries=0).models.retrieve(MODEL)
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == sorted([MODEL, swarm["tiny"]])
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "lowband" and m.model_extra["context_length"] == 8192
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"


def test_chat_equals_single_process(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == reference["chat"]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == reference["prompt_tokens"] and 0 < r.usage.completion_tokens <= NEW
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_with_usage(client, reference):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["chat"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage: no usage chunk.
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                                 stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_stop(client, reference):
    ref = reference["chat"]
    stop = ref[len(ref) // 2:len(ref) // 2 + 3]
    want = ref[:ref.find(stop)]
    assert 0 < len(want) < len(ref)
    for stops in (stop, ["never-in-the-text", stop]):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                           stop=stops)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop", stops
        assert r.usage.completion_tokens < NEW
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    batch = reference["batch"][0]
    stop = batch[len(batch) // 2:len(batch) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt=BATCH[0], max_tokens=NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == batch[:batch.find(stop)] and r.choices[0].finish_reason == "stop"


def test_n_choices(client, reference):
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [reference["chat"]] * 3  # greedy: identical
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0, n=2,
                                                 stream=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == \
            reference["chat"]
    # completions: a list of prompts x n, choice index = prompt index x n + j
    r = client.completions.create(model=MODEL, prompt=BATCH, max_tokens=NEW, temperature=0, n=2)
    assert [(c.index, c.text) for c in r.choices] == list(enumerate([t for t in reference["batch"] for _ in "ab"]))


def test_seeded_sampling(client, swarm):
    def sample(seed: int) -> list[str]:
        r = client.chat.completions.create(model=swarm["tiny"], messages=TINY_MESSAGES, max_tokens=8,
                                           temperature=1.5, n=3, seed=seed)
        return [c.message.content for c in r.choices]

    first = sample(7)
    assert sample(7) == first                   # reproducible
    assert len(set(first)) > 1                  # the choices are independent draws
    assert sample(8) != first


def test_list_of_parts_content(client, reference):
    parts = [{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}]
    r = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == reference["chat"]
    image = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                          {"type": "image_url", "image_url": {"url": "https://example.invalid/x"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=image, max_tokens=NEW)
    assert e.value.param == "messages[0].content[1]" and "only 'text' parts" in e.value.message


def test_default_max_tokens(swarm, client, reference):
    """No max_tokens: the rest of the 64-token context; clamped by a key's max_tokens, or by its
    share of KV slots per concurrent request."""
    tiny = swarm["tiny"]
    r = client.chat.completions.create(model=tiny, messages=TINY_MESSAGES, temperature=0)
    assert r.choices[0].message.content == reference["tiny_rest"]
    assert r.usage.prompt_tokens == reference["tiny_prompt"]
    if r.choices[0].finish_reason == "length":
        assert r.usage.total_tokens == 64
    for key, want, cap in ((SMALL, "tiny_5", 5), (SHARE, "tiny_17", 20 - reference["tiny_prompt"])):
        api = openai.OpenAI(base_url=swarm["base"], api_key=key, max_retries=0, timeout=120)
        r = api.chat.completions.create(model=tiny, messages=TINY_MESSAGES, temperature=0)
        assert r.choices[0].message.content == reference[want] and r.usage.completion_tokens <= cap, key
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == cap
        with pytest.raises(openai.BadRequestError) as e:  # an explicit max_tokens over the key's limit is refused
            api.chat.completions.create(model=tiny, messages=TINY_MESSAGES, max_tokens=cap + 30)
        assert e.value.param == "max_tokens" or e.value.code == "kv_quota_exceeded", e.value.message


@pytest.mark.parametrize("extra,param,code", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
     "unsupported_parameter"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"extra_body": {"guided_json": {}}}, "guided_json", "unknown_parameter"),
])
def test_unsupported_parameters_are_clear_400s(client, extra, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **extra)
    assert e.value.status_code == 400 and e.value.param == param and e.value.code == code, e.value.body


def test_harmless_defaults_are_accepted(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW, temperature=0, logprobs=False,
                                       presence_penalty=0, frequency_penalty=0.0, user="someone", n=1,
                                       parallel_tool_calls=False, stream=False)
    assert r.choices[0].message.content == reference["chat"]
