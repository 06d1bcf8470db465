"""Hostile but fair clients, with bystander streams running: no request may crash an engine, stall other
requests or change what they get. Each case: the hostile request gets its typed 4xx, the bystanders keep
receiving chunks and finish with exactly the output of a quiet run (orderings and counts, never wall-clock).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

CODE = "def fibonacci(n):"
BYSTANDER = {"prompt": CODE, "max_tokens": 96, "temperature": 0, "ignore_eos": True, "stream": True}


class Bystanders:
    """Greedy streams running in threads; ``chunks`` counts what each has received so far."""

    def __init__(self, base: str, model: str, n: int = 3) -> None:
        self.base, self.model = base, model
        self.chunks = [0] * n
        self.texts: list[str | None] = [None] * n
        self.started = threading.Barrier(n + 1)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        text = []
        with httpx.Client(base_url=self.base, timeout=300) as c, c.stream(
                "POST", "/v1/completions", json={**BYSTANDER, "model": self.model}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                text.append(event["choices"][0]["text"] if event.get("choices") else "")
                self.chunks[i] += 1
                if self.chunks[i] == 2:
                    self.started.wait()
        self.texts[i] = "".join(text)

    def __enter__(self) -> Bystanders:
        for t in self.threads:
            t.start()
        self.started.wait(timeout=120)  # every bystander is streaming
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.threads:
            t.join(timeout=300)


@pytest.fixture(scope="module")
def quiet_text(server) -> str:
    with httpx.Client(base_url=server, timeout=120) as c:
        r = c.post("/v1/completions", json={**BYSTANDER, "model": "native", "stream": False})
    return r.json()["choices"][0]["text"]


def hostile_cases() -> list[tuple[str, str, dict | bytes, dict[str, str], int, str | None]]:
    big = "x" * (10 << 20)
    under_limit = "y = 1\n" * 500_000  # 3.5 MB as JSON: passes the body limit, far over the context
    deep = b'{"model": "native", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    cases = [
        ("huge seed", "/v1/completions", {"prompt": "x", "max_tokens": 4, "seed": 1180591620717411303424}, {}, 400,
         "seed"),
        ("top_k 2**63", "/v1/completions", {"prompt": "x", "max_tokens": 4, "top_k": 2**63}, {}, 400, "top_k"),
        ("10 MiB prompt", "/v1/completions", {"prompt": big}, {}, 413, None),
        ("3 MB prompt", "/v1/completions", {"prompt": under_limit}, {}, 400, "prompt"),
        ("3 MB chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": under_limit}]}, {}, 400,
         "messages"),
        ("nested 10,000 deep", "/v1/completions", deep, {}, 400, None),
        ("text/plain body", "/v1/completions", json.dumps({"model": "native", "prompt": "x"}).encode(),
         {"content-type": "text/plain"}, 415, None),
        ("invalid utf-8", "/v1/completions", b'{"model": "native", "prompt": "\xff\xfe"}', {}, 400, None),
        ("token ids out of vocab", "/v1/completions", {"prompt": [1, 2, 10**9]}, {}, 400, "prompt"),
        ("stop token out of vocab", "/v1/completions", {"prompt": "x", "stop_token_ids": [10**9]}, {}, 400,
         "stop_token_ids"),
        ("max_tokens past context", "/v1/completions", {"prompt": "x", "max_tokens": 2**31 - 1}, {}, 400,
         "max_tokens"),
    ]
    for field, value in [("logit_bias", {"1": 500}), ("logit_bias", {"1000000000": 1}), ("presence_penalty", 3.0),
                         ("repetition_penalty", -1), ("min_p", 2)]:
        body = {"prompt": [1, 2], "max_tokens": 2, field: value}
        cases.append((f"out of range {field} {value}", "/v1/completions", body, {}, 400, field))
    cases += [  # vLLM's extra routes take the same bounds
        ("tokenize ids out of vocab", "/tokenize", {"prompt": [1, 10**9]}, {}, 400, "prompt"),
        ("tokenize 3 MB chat", "/tokenize", {"messages": [{"role": "user", "content": under_limit}]}, {}, 400,
         "messages"),
        ("tokenize unknown field", "/tokenize", {"prompt": "x", "add_bos": True}, {}, 400, "add_bos"),
        ("detokenize ids out of vocab", "/detokenize", {"tokens": [1, 2**31 - 1]}, {}, 400, "tokens"),
        ("detokenize no ids", "/detokenize", {"tokens": []}, {}, 400, "tokens"),
    ]
    for field, value in [("best_of", 0), ("n", 129), ("suffix", "x"), ("max_tokens", 0), ("bad_words", [""]),
                         ("bad_words", ["x" * 257]), ("prompt", [[1]] * 257)]:
        body = {"prompt": [1, 2], "max_tokens": 2, field: value}
        cases.append((f"unsupported {field}", "/v1/completions", body, {}, 400, field))
    tools = [{"type": "function", "function": {"name": "f"}}]
    for name, fields, param in [  # structured output: refused at the ingress or at the engine's admission
            ("unknown response_format", {"response_format": {"type": "xml"}}, "response_format"),
            ("uncompilable regex", {"guided_regex": "(unclosed"}, "guided_regex"),
            ("undefined grammar rule", {"guided_grammar": "root ::= nothing"}, "guided_grammar"),
            ("unknown schema type", {"structured_outputs": {"json": {"type": "foo"}}}, "structured_outputs"),
            ("70 KB schema", {"guided_json": {"enum": ["v" * 1000] * 70}}, "guided_json"),
            ("tool_choice names no tool", {"tools": tools, "tool_choice": {"type": "function",
                                                                        "function": {"name": "g"}}}, "tool_choice"),
            ("tool name with a space", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools")]:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **fields}
        cases.append((name, "/v1/chat/completions", body, {}, 400, param))
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    cases.append(("image part", "/v1/chat/completions", image, {}, 400, "messages"))
    return cases


CASES = hostile_cases()


@pytest.mark.parametrize("engine", ["native", "vllm"])
@pytest.mark.parametrize(("name", "path", "body", "headers", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_hostile_request_harms_no_one(server, quiet_text, engine, name, path, body, headers, status, param):
    if isinstance(body, dict):
        content = json.dumps({"model": engine, **body}).encode()
    else:
        content = body.replace(b'"native"', json.dumps(engine).encode())
    with Bystanders(server, "native") as b, httpx.Client(base_url=server, timeout=300) as c:
        r = c.post(path, content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and error["param"].split(".")[0] == param, error
    assert r.headers["x-request-id"]
    assert all(t == quiet_text for t in b.texts), "a bystander's output changed"
    # The engine that saw the hostile request still serves.
    ok = httpx.post(f"{server}/v1/completions", json={"model": engine, "prompt": CODE, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_bystanders_stream_while_a_large_prompt_is_refused(server, quiet_text):
    """A prompt that passes the body limit is read, parsed and refused for length while streams flow."""
    big = "def f(x):\n    return x\n" * 150_000  # 3.6 MB
    with Bystanders(server, "native") as b:
        seen = []
        for _ in range(3):
            before = list(b.chunks)
            r = httpx.post(f"{server}/v1/completions", json={"model": "native", "prompt": big}, timeout=120)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            seen.append(sum(b.chunks) - sum(before))
    assert sum(seen) > 0, "no bystander chunk arrived while the large prompts were being refused"
    assert all(t == quiet_text for t in b.texts)


def test_large_embedding_request_does_not_starve_a_small_one(server):
    """2,048 inputs (the limit) and a one-string request sent behind it: the small one finishes first."""
    order: list[str] = []
    texts = [f"sentence number {i} about food" for i in range(2048)]

    def call(name: str, payload: object) -> None:
        r = httpx.post(f"{server}/v1/embeddings", json={"model": "minilm", "input": payload}, timeout=300)
        assert r.status_code == 200, r.text
        order.append(name)

    big = threading.Thread(target=call, args=("big", texts))
    big.start()
    time.sleep(0.5)  # ordering only: the big request is in the replica's batch queue before the small one
    call("small", "one sentence")
    big.join()
    assert order == ["small", "big"]
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "minilm", "input": ["x"] * 2049}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")
