"""The native engine's vLLM-named metrics: vLLM's buckets, vLLM's definitions, measured on a real engine."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from parallel.async_engine import AsyncEngine
from parallel.metrics import (
    COUNTERS,
    FOLD_EVERY_STEPS,
    GAUGES,
    HISTOGRAMS,
    INTER_TOKEN_LATENCY_BUCKETS,
    ITERATION_TOKENS_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    EngineMetrics,
    Histogram,
    request_tokens_buckets,
)
from parallel.outputs import OutputDelta
from parallel.sampling_params import SamplingParams
from tests.conftest import REPO


def test_buckets_are_vllms_own():
    buckets = pytest.importorskip("vllm.v1.metrics.buckets")
    assert list(REQUEST_LATENCY_BUCKETS) == buckets.histogram_buckets("request_latency")
    assert list(TIME_TO_FIRST_TOKEN_BUCKETS) == buckets.histogram_buckets("time_to_first_token")
    assert list(INTER_TOKEN_LATENCY_BUCKETS) == buckets.histogram_buckets("inter_token_latency")
    assert list(ITERATION_TOKENS_BUCKETS) == buckets.histogram_buckets("iteration_tokens")
    for n in (1, 7, 100, 2048, 131072):
        assert list(request_tokens_buckets(n)) == buckets.histogram_buckets("request_tokens", max_model_len=n)


def test_names_and_help_are_vllms():
    """Every family we export is one vLLM's PrometheusStatLogger registers, with the same type and help."""
    loggers = pytest.importorskip("vllm.v1.metrics.loggers")
    source = Path(loggers.__file__).read_text()
    spec_source = Path(pytest.importorskip("vllm.v1.spec_decode.metrics").__file__).read_text()
    for name, doc in {**GAUGES, **COUNTERS, **HISTOGRAMS}.items():
        text = source if not name.startswith("vllm:spec_decode") else spec_source
        assert f'"{name}"' in text, name
        assert doc in text, (name, doc)


def test_histogram_uses_le_semantics():
    h = Histogram((1.0, 2.0, 1e6))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.buckets() == [("1.0", 2.0), ("2.0", 3.0), ("1e+06", 4.0), ("+Inf", 4.0)]  # spelled as vLLM's are
    assert h.count == 4 and h.sum == 6.0


def test_per_request_times_follow_vllms_definitions():
    m = EngineMetrics("defs", max_model_len=64)
    m.on_arrival("r", now=10.0)
    m.on_step([OutputDelta("r", (), "", False)], now=10.2)  # a prefill chunk: no token yet
    m.on_step([OutputDelta("r", (5,), "a", False, num_prompt_tokens=8, num_output_tokens=1, num_cached_tokens=2,
                           scheduled_at=10.1)], now=10.5)
    m.on_step([OutputDelta("r", (6, 7), "bc", True, "length", num_prompt_tokens=8, num_output_tokens=3)], now=11.0)
    h = m.histograms
    assert h["vllm:time_to_first_token_seconds"].sum == pytest.approx(0.5)  # arrival -> first token
    assert h["vllm:inter_token_latency_seconds"].sum == pytest.approx(0.5)  # one per request per step
    assert h["vllm:e2e_request_latency_seconds"].sum == pytest.approx(1.0)
    assert h["vllm:request_queue_time_seconds"].sum == pytest.approx(0.1)  # arrival -> scheduled
    assert h["vllm:request_prefill_time_seconds"].sum == pytest.approx(0.4)  # scheduled -> first token
    assert h["vllm:request_decode_time_seconds"].sum == pytest.approx(0.5)  # first -> last token
    assert h["vllm:request_inference_time_seconds"].sum == pytest.approx(0.9)
    assert h["vllm:request_prompt_tokens"].sum == 8 and h["vllm:request_generation_tokens"].sum == 3
    # vLLM's step tokens: uncached prompt tokens of a prefill that ended, plus generated ones (8 - 2 + 1, 2)
    assert h["vllm:iteration_tokens_total"].count == 2 and h["vllm:iteration_tokens_total"].sum == 9
    assert (m.prompt_tokens, m.generation_tokens) == (8, 3)
    assert m.success["length"] == 1


def test_aborts_and_errors_count_as_vllm_counts_them():
    """vLLM counts what its engine finished (a failure it reports as ``error``), not a caller's abort."""
    from parallel.errors import RequestFailedError

    m = EngineMetrics("ends")
    for rid in ("a", "b", "c", "d"):
        m.on_arrival(rid, now=0.0)
    m.forget("a", None)  # the caller left (AsyncEngine.abort)
    m.forget("a", None)
    m.forget("b", None)  # refused at admission
    m.on_step([OutputDelta("c", (), "", True, "abort", error=RequestFailedError("x")),
               OutputDelta("d", (4,), "x", True, "abort", num_output_tokens=1)], now=1.0)
    m.forget("d", "abort")  # after its final delta: a no-op
    assert m.success == {"stop": 0, "length": 0, "abort": 1, "error": 1, "repetition": 0}
    assert m.histograms["vllm:e2e_request_latency_seconds"].count == 1  # only the one with output


def test_recorded_events_fold_in_their_order():
    """Arrivals, steps and aborts are applied in the order they were recorded, whenever the fold runs: the
    tokens of a step before an abort count, and an id reused after its request finished is a new request."""
    m = EngineMetrics("order")
    m.on_arrival("r", now=0.0)
    m.on_step([OutputDelta("r", (1, 2), "ab", True, "length", num_prompt_tokens=4, num_output_tokens=2)], now=1.0)
    m.on_arrival("r", now=2.0)  # the same id again, for a new request
    m.on_step([OutputDelta("r", (3,), "c", False, num_prompt_tokens=4, num_output_tokens=1)], now=3.0)
    m.forget("r", "abort")
    m.on_step([OutputDelta("r", (4,), "d", True, "stop", num_output_tokens=2)], now=4.0)  # after the abort
    assert m.generation_tokens == 3 and m.prompt_tokens == 8
    assert m.success == {"stop": 0, "length": 1, "abort": 1, "error": 0, "repetition": 0}
    assert m.histograms["vllm:time_to_first_token_seconds"].sum == pytest.approx(1.0 + 1.0)


def test_steps_are_folded_in_bounded_batches():
    """The recording thread folds every FOLD_EVERY_STEPS steps: nothing keeps the deltas of more."""
    m = EngineMetrics("batches")
    m.on_arrival("r", now=0.0)
    for i in range(FOLD_EVERY_STEPS * 3):
        m.on_step([OutputDelta("r", (i,), "x", False, num_output_tokens=i + 1)], now=float(i))
        assert len(m._events) <= FOLD_EVERY_STEPS  # the arrival and at most FOLD_EVERY_STEPS - 1 steps
    assert m.generation_tokens == FOLD_EVERY_STEPS * 3


def test_a_collection_during_recording_loses_nothing():
    """The engine loop's thread records while the pusher's thread collects: every token is counted once."""
    m = EngineMetrics("threads")
    steps, per_step = 2000, 4
    for r in range(per_step):
        m.on_arrival(f"r{r}", now=0.0)

    def record() -> None:
        for i in range(steps):
            m.on_step([OutputDelta(f"r{r}", (i,), "x", False, num_output_tokens=i + 1) for r in range(per_step)],
                      now=float(i + 1))

    thread = threading.Thread(target=record)
    thread.start()
    seen = []
    while thread.is_alive():
        seen.append(next(v for _, name, _, v in m.samples() if name == "vllm:generation_tokens_total"))
    thread.join()
    assert seen == sorted(seen)  # counters never go back
    assert m.generation_tokens == steps * per_step
    assert m.histograms["vllm:inter_token_latency_seconds"].count == (steps - 1) * per_step


def _scrape(model: str) -> dict[str, list]:
    from prometheus_client import generate_latest

    families = text_string_to_metric_families(generate_latest(REGISTRY).decode())
    return {f.name: [s for s in f.samples if s.labels.get("model_name") == model] for f in families
            if f.name.startswith("vllm:")}


@pytest.mark.parametrize("engine_process", [False, True])
def test_a_real_engine_exports_what_it_did(engine_process):
    name = f"tiny-{'process' if engine_process else 'thread'}"
    engine = AsyncEngine.from_options(str(REPO / "models" / "tiny-code-llama"), engine_process=engine_process,
                                      dtype="float32", served_model_name=name, kv_cache_memory_bytes=64 << 20)

    async def run() -> list[int]:
        async def one(i: int) -> int:
            n = 0
            async for d in engine.generate(f"r{i}", engine.encode_prompt(f"def f{i}(x):"),
                                           SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)):
                n += len(d.token_ids)
            return n

        return await asyncio.gather(*(one(i) for i in range(4)))

    try:
        assert asyncio.run(run()) == [6] * 4
        families = _scrape(name)
        def one(sample: str) -> float:
            return sum(s.value for fam in families.values() for s in fam if s.name == sample)

        assert one("vllm:generation_tokens_total") == 24
        assert one("vllm:time_to_first_token_seconds_count") == 4
        assert one("vllm:inter_token_latency_seconds_count") >= 4  # merged steps observe less often
        assert one("vllm:e2e_request_latency_seconds_count") == 4
        assert one("vllm:request_generation_tokens_sum") == 24
        assert one("vllm:prompt_tokens_total") == one("vllm:request_prompt_tokens_sum") > 0
        assert one("vllm:prefix_cache_queries_total") >= one("vllm:prompt_tokens_total")
        assert one("vllm:num_requests_running") == 0
        succeeded = [s for s in families["vllm:request_success"] if s.labels["finished_reason"] == "length"]
        assert succeeded[0].value == 4 and succeeded[0].labels["engine"] == "0"
    finally:
        engine.shutdown()


def test_disable_log_stats_exports_nothing():
    engine = AsyncEngine.from_options(str(REPO / "models" / "tiny-code-llama"), dtype="float32",
                                      served_model_name="tiny-silent", disable_log_stats=True,
                                      kv_cache_memory_bytes=64 << 20)
    try:
        assert engine.metrics is None and not any(_scrape("tiny-silent").values())
    finally:
        engine.shutdown()
