"""The Python path (DeploymentHandles) and client disconnects freeing KV blocks."""

from __future__ import annotations

import time

import httpx
import pytest
from ray import serve

from deployments.messages import ErrorInfo, GenerateRequest
from parallel.sampling_params import SamplingParams
from tests.integration.conftest import APP

CODE = "def fibonacci(n):"


def test_app_handle_unary_and_streaming(server):
    router = serve.get_app_handle(APP)
    body = {"model": "native", "prompt": CODE, "max_tokens": 12, "temperature": 0}
    whole = router.completions.remote(body).result()
    assert whole["choices"][0]["text"] and whole["usage"]["completion_tokens"] <= 12
    events = list(router.options(stream=True).completions_stream.remote(body))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole["choices"][0]["text"]
    chat = router.chat.remote({"model": "vllm", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 5}).result()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    emb = router.embeddings.remote({"model": "minilm", "input": "hello"}).result()
    assert len(emb["data"][0]["embedding"]) == 384


@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_deployment_handle_generate(server, engine):
    model = serve.get_deployment_handle(engine, app_name=APP)
    req = GenerateRequest("handle-test", prompt=CODE,
                          params=SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    whole = model.generate.remote(req).result()
    assert whole.completion_tokens == 10 and whole.finish_reason == "length"
    parts = list(model.options(stream=True).generate_stream.remote(req))
    assert "".join(p.text for p in parts) == whole.text
    assert sum(len(p.token_ids) for p in parts) == 10 and parts[-1].completion_tokens == 10
    # The same as a plain dict (``params``: SamplingParams fields), for callers without our types.
    as_dict = model.generate.remote({"prompt": CODE, "params": {"max_tokens": 10, "temperature": 0,
                                                                "ignore_eos": True}}).result()
    assert as_dict.text == whole.text
    bad = model.generate.remote({"prompt": CODE, "params": {"temperature": -1}}).result()
    assert isinstance(bad, ErrorInfo) and bad.status == 400 and bad.param == "temperature"


def test_embedding_deployment_handle(server):
    emb = serve.get_deployment_handle("minilm", app_name=APP)
    out = emb.embed.remote(["a", "b", "c"]).result()
    assert [d["index"] for d in out["data"]] == [0, 1, 2]


@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_disconnect_mid_stream_frees_blocks(server, engine):
    stats = serve.get_deployment_handle(engine, app_name=APP).stats
    aborted_before = stats.remote().result()["num_aborted"]
    with httpx.Client(base_url=server, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"model": engine, "prompt": CODE, "max_tokens": 1000,
                                             "ignore_eos": True, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    # Leaving the block closed the connection mid-stream: the engine must abort (not finish) the request.
    wait_aborted(stats, aborted_before)


@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_disconnect_while_waiting_for_a_unary_answer_frees_blocks(server, engine):
    """A unary request whose client leaves before the answer: the generation is aborted, not finished
    (on the direct path the replica watches the connection; on the router path Serve cancels the call)."""
    stats = serve.get_deployment_handle(engine, app_name=APP).stats
    aborted_before = stats.remote().result()["num_aborted"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{server}/v1/completions", timeout=httpx.Timeout(60, read=0.5),
                   json={"model": engine, "prompt": CODE, "max_tokens": 1000, "ignore_eos": True})
    wait_aborted(stats, aborted_before)


def wait_aborted(stats, aborted_before: int) -> None:
    """Until the replica's engine counts one more abort and holds no KV blocks and no running request."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = stats.remote().result()
        if now["kv_blocks_used"] == 0 and now["num_running"] == 0 and now["num_aborted"] > aborted_before:
            return
        time.sleep(0.2)
    raise AssertionError(f"request not aborted or blocks not freed after the client left: {now}")
