"""The OpenAI-compatible HTTP surface, on both engines, through a real Serve proxy and router."""

from __future__ import annotations

import base64
import json
import struct
import time

import httpx
import pytest

ENGINES = ["native", "vllm"]
CODE = "def fibonacci(n):"


def sse_events(response: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_and_health(client):
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert ids == {"native", "vllm", "tight", "tp2", "native-spec", "native-spec-sep", "vllm-spec",
                   "victim", "minilm"}
    health = client.get("/health")
    assert health.status_code == 200 and set(health.json()["models"].values()) == {"ready"}


@pytest.mark.parametrize("engine", ENGINES)
def test_completion(client, engine):
    r = client.post("/v1/completions", json={"model": engine, "prompt": CODE, "max_tokens": 16, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == engine
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16 and body["usage"]["prompt_tokens"] > 3


def test_both_engines_agree_greedy(client):
    texts = [client.post("/v1/completions", json={"model": e, "prompt": CODE, "max_tokens": 24,
                                                  "temperature": 0}).json()["choices"][0]["text"] for e in ENGINES]
    assert texts[0] == texts[1]


def test_logits_processing_with_speculative_decoding_is_refused_not_ignored(client):
    """vLLM ignores min_p and logit_bias under speculative decoding (it says so in its log): refused here."""
    def post(model: str, extra: dict) -> httpx.Response:
        return client.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]} | extra)

    for model, extra in [("vllm-spec", {"min_p": 0.2}), ("vllm-spec", {"frequency_penalty": -0.7}),
                         ("vllm-spec", {"logit_bias": {"5": 1}}), ("native-spec", {"presence_penalty": 1.0})]:
        r = post(model, extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra)), (model, r.text)
    assert post("native-spec", {"min_p": 0.2}).status_code == 200  # exact under rejection sampling: kept


def test_model_by_id_head_and_vllms_tokenize_detokenize(client):
    r = client.get("/v1/models/native")
    assert r.status_code == 200 and r.json()["id"] == "native" and r.json()["object"] == "model"
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    head = client.head("/v1/models")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "application/json"
    assert client.head("/v1/models/nope").status_code == 404
    for engine in ENGINES:  # the ids generation sees: the same count as the completion's usage
        tok = client.post("/tokenize", json={"model": engine, "prompt": CODE}).json()
        usage = client.post("/v1/completions", json={"model": engine, "prompt": CODE, "max_tokens": 1}).json()["usage"]
        assert tok["count"] == len(tok["tokens"]) == usage["prompt_tokens"] and tok["max_model_len"] > 0
        chat = {"model": engine, "messages": [{"role": "user", "content": "sort a list"}]}
        tok_chat = client.post("/tokenize", json=chat).json()
        used = client.post("/v1/chat/completions", json=chat | {"max_tokens": 1}).json()["usage"]["prompt_tokens"]
        assert tok_chat["count"] == used
        text = client.post("/detokenize", json={"model": engine, "tokens": tok["tokens"]}).json()["prompt"]
        assert text.endswith(CODE)
        bad = client.post("/detokenize", json={"model": engine, "tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    extra = client.post("/tokenize", json={"model": "native", "prompt": "x", "add_special_tokens": False})
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "add_special_tokens"


@pytest.mark.parametrize("settings", [
    {"presence_penalty": 1.5}, {"frequency_penalty": 1.0}, {"repetition_penalty": 1.3},
    {"presence_penalty": -0.5, "frequency_penalty": 0.7, "repetition_penalty": 0.8},
    {"logit_bias": "ban the first plain token"}, {"min_p": 0.3, "presence_penalty": 1.5},
])
def test_penalties_and_logit_bias_greedy_equal_to_vllms(client, settings):
    """The same model and settings on both engines: vLLM's own penalties and ours give the same greedy text
    (and differ from the unpenalised text, so the setting did something)."""
    def run(model: str, extra: dict) -> str:
        r = client.post("/v1/completions", json={"model": model, "prompt": CODE, "max_tokens": 32, "temperature": 0,
                                                 "ignore_eos": True} | extra)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    plain = run("native", {})
    if settings.get("logit_bias") == "ban the first plain token":  # and favour another one a little
        ids = client.post("/tokenize", json={"model": "native", "prompt": plain}).json()["tokens"]
        settings = {"logit_bias": {str(ids[1]): -100, str(ids[2]): 2.5}}  # (ids[0] is the BOS)
    native, vllm = run("native", settings), run("vllm", settings)
    assert native == vllm
    assert native != plain


@pytest.mark.parametrize("engine", ENGINES)
def test_streamed_completion_concatenates_to_unary(client, engine):
    req = {"model": engine, "prompt": CODE, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 32


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_unary_and_stream(client, engine):
    req = {"model": engine, "messages": [{"role": "system", "content": "You write Python."},
                                         {"role": "user", "content": "fibonacci"}],
           "max_tokens": 20, "temperature": 0}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and message["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 20
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
        events = sse_events(s)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == message["content"]
    assert events[-2]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


def test_embeddings(client):
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": ["A man is eating food.",
                                                                       "A man is eating bread."]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) == 384
    a, b = data[0]["embedding"], data[1]["embedding"]
    assert abs(sum(x * x for x in a) - 1) < 1e-4  # normalised
    assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.6  # similar sentences
    assert r.json()["usage"]["prompt_tokens"] > 8
    b64 = client.post("/v1/embeddings", json={"model": "minilm", "input": "A man is eating food.",
                                              "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(b64))
    assert max(abs(x - y) for x, y in zip(decoded, a, strict=True)) < 1e-6


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "native", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "native", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "native", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "native", "prompt": ""}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "native", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "native", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/embeddings", {"model": "native", "input": "x"}, 404, "model"),
    ("/v1/embeddings", {"model": "minilm", "input": ""}, 400, "input"),
    ("/v1/nothing", {}, 404, None),
])
def test_errors_are_openai_json(client, path, body, status, param):
    kwargs = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes)
              else {"json": body})
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param)


def test_method_not_allowed(client):
    assert client.get("/v1/completions").status_code == 405


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stream", [False, True])
def test_context_length_errors(client, engine, stream):
    long_prompt = "x = 1\n" * 2000
    r = client.post("/v1/completions", json={"model": engine, "prompt": long_prompt, "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"model": engine, "prompt": CODE, "max_tokens": 100000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("path", ["server", "router_url"])
def test_overload_is_503_with_retry_after(request, path):
    import concurrent.futures

    base = request.getfixturevalue(path)  # the direct path (the replica refuses) and the router path (Serve's queue)

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/completions", timeout=120,
                          json={"model": "tight", "prompt": CODE, "max_tokens": 64, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["code"] == "overloaded"
    assert rejected.headers["retry-after-ms"]


def test_a_full_model_is_refused_at_the_ingress_without_asking_it(router_url):
    """Once a model refused for overload, the router answers the next 503s itself (no handle call) while
    as many of its requests are in flight as then; they carry the same body and Retry-After.

    The scenario needs the long stream to outlive the probes; when the machine ran it to its end first
    (the queued request then got its slot), it is tried again, up to three times."""
    import concurrent.futures

    from ray import serve

    from tests.integration.conftest import APP

    router = serve.get_app_handle(APP)
    stats = lambda: router.ingress_stats.remote().result()  # noqa: E731
    stats()  # the handle is ready before the clock-sensitive part starts
    body = {"model": "tight", "prompt": CODE, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    short = {**body, "stream": False, "max_tokens": 4}
    for _attempt in range(3):
        # A gate an earlier refusal shut (the test before this one overloads the same model) lasts its
        # Retry-After (2 s): the queued request would be shed by it. Start once it has expired.
        deadline = time.monotonic() + 60
        while stats()["in_flight"].get("tight", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)
        with httpx.Client(base_url=router_url, timeout=120) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
            with c.stream("POST", "/v1/completions", json=body) as long:
                assert long.status_code == 200
                lines = long.iter_lines()  # held: a dropped iterator closes the stream (a disconnect, an abort)
                assert next(line for line in lines if line.startswith("data: "))  # the one slot is taken
                queued = pool.submit(c.post, "/v1/completions", json=short)  # waits in Serve's queue (1 place)
                while stats()["in_flight"].get("tight", 0) < 2 and not queued.done():
                    pass
                before = stats()["shed"]
                answers = [c.post("/v1/completions", json=short) for _ in range(5)]
                shed = stats()["shed"] - before
                valid = not queued.done()  # both were still in flight while the five were answered
            # it ran once the stream closed, unless the first probe reached Serve's one queue place before it
            # (the router counts a request in flight just before its handle call): then try again
            valid = valid and queued.result().status_code == 200
        if valid:
            break
    assert valid, f"the long stream never outlived the probes (queued: {queued.result().text[:200]})"
    assert all(r.status_code == 503 for r in answers), [r.status_code for r in answers]
    assert all(r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "overloaded" for r in answers)
    assert shed >= 4, shed  # at most the first was refused by Serve's queue (the gate may be shut already)


def test_the_direct_path_answers_generation_and_the_router_the_rest(server, router_url):
    from deployments.front import haproxy_binary

    if haproxy_binary() is None:
        pytest.skip("no haproxy: the front proxy is off and every request takes the router path")
    body = {"prompt": CODE, "max_tokens": 4, "temperature": 0}
    for model in ["native", "vllm", "tp2", "native-spec", "native-spec-sep", "vllm-spec", "victim"]:
        r = httpx.post(f"{server}/v1/completions", json={**body, "model": model}, timeout=60)
        assert r.status_code == 200 and r.headers.get("x-modelfleet-path") == "direct", (model, r.headers)
        via_router = httpx.post(f"{router_url}/v1/completions", json={**body, "model": model}, timeout=60)
        assert "x-modelfleet-path" not in via_router.headers
        assert via_router.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]  # greedy: the same
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "native", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as s:
        assert s.headers.get("x-modelfleet-path") == "direct"
        assert [line for line in s.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    for r in (httpx.get(f"{server}/v1/models"), httpx.get(f"{server}/health"),
              httpx.post(f"{server}/v1/embeddings", json={"model": "minilm", "input": "x"})):
        assert r.status_code == 200 and "x-modelfleet-path" not in r.headers  # the router answers these
    unknown = httpx.post(f"{server}/v1/completions", json={**body, "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    broken = httpx.post(f"{server}/v1/completions", content=b'{"model": "native", "prompt": ',
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
