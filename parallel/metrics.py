"""The engine's Prometheus metrics under vLLM's names, types, labels and buckets, for the native engine.

Teams run vLLM's Grafana dashboards and KEDA scalers on these names, so the native engine exports exactly
what vLLM v1's ``PrometheusStatLogger`` exports (``vllm/v1/metrics/loggers.py``; buckets from
``vllm/v1/metrics/buckets.py``, copied below and checked against vLLM's own by a unit test), with the same
labels (``model_name``, ``engine``) and the same meaning. The vLLM engine needs none of this: its own
logger records them in the replica's process registry (``parallel/vllm_engine.py``).

Where each number comes from (vLLM's definitions, ``vllm/v1/metrics/stats.py``):

- gauges and engine counters (running, waiting, KV usage, prefix-cache queries and hits, preemptions,
  speculative drafts/accepted) are read from the engine's latest ``EngineStats`` at collection time: no
  per-step cost at all;
- per step (``on_step``, on the engine loop's thread, before any delta merging): generation tokens, the
  prompt tokens of requests that got their first token (vLLM counts the whole prompt then),
  ``iteration_tokens_total`` (as vLLM: the uncached prompt tokens of requests whose prefill ended in the
  step, plus the tokens it generated), TTFT (arrival -> first token) and inter-token latency (one
  observation per request per step: time since that request's previous tokens);
- per finished request: e2e (arrival -> last token), queue (arrival -> first scheduled; vLLM starts at its
  engine core's queue, microseconds later), prefill (first scheduled -> first token), decode (first -> last
  token), prompt and generation token counts, and ``request_success{finished_reason}`` (as vLLM: requests
  the engine finished, an engine-reported failure as ``error``; a caller's abort is not counted).

Times are ``time.monotonic()``: the engine process's and this process's are the same clock on Linux
(CLOCK_MONOTONIC is system-wide), so ``scheduled_at`` from the child compares with arrival here.

Recording is plain Python (a bisect and two additions per observation, under one lock per step) and
exported by a collector registered once per process; prometheus_client's own Histogram costs several times
more per observe and would refuse a second engine's registration of the same names.

Example:
    >>> m = EngineMetrics("tiny", max_model_len=64)
    >>> m.on_arrival("r1", now=0.0)
    >>> m.on_step([OutputDelta("r1", (5,), "a", False, num_prompt_tokens=3, num_output_tokens=1,
    ...                        scheduled_at=0.1)], now=0.5)
    >>> m.histograms["vllm:time_to_first_token_seconds"].count
    1
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from parallel.engine_stats import EngineStats
from parallel.outputs import OutputDelta

# vllm/v1/metrics/buckets.py (vLLM 0.32), verbatim.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def request_tokens_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's ``build_1_2_5_buckets(max_model_len)``: 1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


LABELS = ("model_name", "engine")
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's FinishReason strings

# family name -> (type, help); help strings are vLLM's.
GAUGES = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
COUNTERS = {
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:request_success": "Count of successfully processed requests.",
    "vllm:spec_decode_num_drafts": "Number of spec decoding drafts.",
    "vllm:spec_decode_num_draft_tokens": "Number of draft tokens.",
    "vllm:spec_decode_num_accepted_tokens": "Number of accepted tokens.",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "Accepted tokens per draft position.",
}
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "vllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "vllm:e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "vllm:request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "vllm:request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "vllm:request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "vllm:request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "vllm:request_prompt_tokens": "Number of prefill tokens processed.",
    "vllm:request_generation_tokens": "Number of generation tokens processed.",
    "vllm:iteration_tokens_total": "Histogram of number of tokens per engine_step.",
}
VLLM_METRIC_NAMES: frozenset[str] = frozenset(GAUGES) | frozenset(COUNTERS) | frozenset(HISTOGRAMS)
SPEC_METRICS = frozenset(n for n in COUNTERS if n.startswith("vllm:spec_decode"))


@dataclass
class Histogram:
    """Cumulative-at-export bucket counts; ``observe`` is a bisect and two additions."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le semantics: value <= bound
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf, as Prometheus exposes them."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else _le(bound), float(running)))
        return out


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)  # as prometheus_client spells vLLM's: "1.0", "1e+06"


@dataclass
class _Timing:
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class EngineMetrics:
    """One engine's metrics (labels ``model_name``, ``engine``); exported through the process's collector.

    ``on_arrival`` from the caller's thread when a request is added, ``on_step`` from the engine loop's
    thread with each step's deltas; ``stats`` is the engine's snapshot getter, read at collection.
    """

    def __init__(self, model_name: str, engine: str = "0", max_model_len: int = 2048,
                 stats: Callable[[], EngineStats] | None = None, speculative: bool = False) -> None:
        self.labels = (model_name, engine)
        self.stats = stats
        self.speculative = speculative
        self._lock = threading.Lock()
        self._timing: dict[str, _Timing] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        tokens = request_tokens_buckets(max_model_len)
        bounds = {"vllm:time_to_first_token_seconds": TIME_TO_FIRST_TOKEN_BUCKETS,
                  "vllm:inter_token_latency_seconds": INTER_TOKEN_LATENCY_BUCKETS,
                  "vllm:request_prompt_tokens": tokens, "vllm:request_generation_tokens": tokens,
                  "vllm:iteration_tokens_total": ITERATION_TOKENS_BUCKETS}
        self.histograms = {name: Histogram(bounds.get(name, REQUEST_LATENCY_BUCKETS)) for name in HISTOGRAMS}
        _COLLECTOR.add(self)

    def on_arrival(self, request_id: str, now: float) -> None:
        with self._lock:
            self._timing[request_id] = _Timing(now)

    def on_step(self, deltas: Iterable[OutputDelta], now: float) -> None:
        """One engine step's deltas (all of them, unmerged), at ``now``."""
        h = self.histograms
        ttft, itl = h["vllm:time_to_first_token_seconds"], h["vllm:inter_token_latency_seconds"]
        generated = prefilled = 0
        with self._lock:
            for d in deltas:
                t = self._timing.get(d.request_id)
                if t is None:
                    continue  # arrived before metrics were attached, or already finished
                n = len(d.token_ids)
                generated += n
                if d.scheduled_at is not None and t.scheduled is None:
                    t.scheduled = d.scheduled_at
                if n:
                    if t.first_token is None:
                        t.first_token = now
                        self.prompt_tokens += d.num_prompt_tokens
                        prefilled += d.num_prompt_tokens - d.num_cached_tokens
                        ttft.observe(now - t.arrival)
                    else:
                        itl.observe(now - (t.last_token or now))
                    t.last_token = now
                if d.finished:
                    del self._timing[d.request_id]
                    self._finish(d, t, now)
            self.generation_tokens += generated
            if prefilled or generated:
                h["vllm:iteration_tokens_total"].observe(prefilled + generated)

    def forget(self, request_id: str, reason: str | None = "abort") -> None:
        """A request that ended without a final delta here (aborted by its caller, or lost with a dead
        engine process): counted under ``reason`` (None: not at all, a request the engine refused), no
        latencies. Idempotent, and a no-op once the final delta was recorded."""
        with self._lock:
            if self._timing.pop(request_id, None) is not None and reason is not None:
                self.success[reason] += 1

    def _finish(self, d: OutputDelta, t: _Timing, now: float) -> None:
        h = self.histograms
        reason = "error" if d.error is not None else (d.finish_reason or "abort")
        self.success[reason if reason in self.success else "stop"] += 1
        if d.error is not None or t.first_token is None:
            return  # vLLM records latencies only for requests that produced output
        scheduled = t.scheduled if t.scheduled is not None else t.arrival
        last = t.last_token or now
        h["vllm:e2e_request_latency_seconds"].observe(now - t.arrival)
        h["vllm:request_queue_time_seconds"].observe(max(0.0, scheduled - t.arrival))
        h["vllm:request_prefill_time_seconds"].observe(max(0.0, t.first_token - scheduled))
        h["vllm:request_decode_time_seconds"].observe(last - t.first_token)
        h["vllm:request_inference_time_seconds"].observe(max(0.0, last - scheduled))
        h["vllm:request_prompt_tokens"].observe(d.num_prompt_tokens)
        h["vllm:request_generation_tokens"].observe(d.num_output_tokens)

    def samples(self) -> Iterator[tuple[str, str, tuple[tuple[str, str], ...], float]]:
        """(family, sample name, extra labels, value) of every series, under the lock (a consistent view)."""
        s = self.stats() if self.stats is not None else None
        if s is not None:
            yield "vllm:num_requests_running", "vllm:num_requests_running", (), float(s.num_running)
            yield "vllm:num_requests_waiting", "vllm:num_requests_waiting", (), float(s.num_waiting)
            yield "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", (), float(s.kv_usage)
            for name, value in (("vllm:prefix_cache_queries", s.prefix_queried_tokens),
                                ("vllm:prefix_cache_hits", s.prefix_hit_tokens),
                                ("vllm:num_preemptions", s.num_preemptions)):
                yield name, name + "_total", (), float(value)
            if self.speculative:
                for name, value in (("vllm:spec_decode_num_drafts", s.spec_num_drafts),
                                    ("vllm:spec_decode_num_draft_tokens", s.spec_num_draft_tokens),
                                    ("vllm:spec_decode_num_accepted_tokens", s.spec_num_accepted_tokens)):
                    yield name, name + "_total", (), float(value)
                for pos, value in enumerate(s.spec_accepted_per_pos):
                    name = "vllm:spec_decode_num_accepted_tokens_per_pos"
                    yield name, name + "_total", (("position", str(pos)),), float(value)
        with self._lock:  # a consistent copy; yielded after the lock is released (the step thread waits on it)
            rows = [("vllm:prompt_tokens", "vllm:prompt_tokens_total", (), float(self.prompt_tokens)),
                    ("vllm:generation_tokens", "vllm:generation_tokens_total", (), float(self.generation_tokens))]
            rows += [("vllm:request_success", "vllm:request_success_total", (("finished_reason", reason),),
                      float(n)) for reason, n in self.success.items()]
            for name, hist in self.histograms.items():
                rows += [(name, name + "_bucket", (("le", le),), n) for le, n in hist.buckets()]
                rows += [(name, name + "_count", (), float(hist.count)), (name, name + "_sum", (), hist.sum)]
        yield from rows


class _Collector:
    """The process's one prometheus_client collector over every live EngineMetrics (weakly held)."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[EngineMetrics] = weakref.WeakSet()
        self._registered = False
        self._lock = threading.Lock()

    def add(self, metrics: EngineMetrics) -> None:
        with self._lock:
            self._engines.add(metrics)
            if not self._registered:
                from prometheus_client import REGISTRY

                REGISTRY.register(self)
                self._registered = True

    def describe(self) -> list:
        return []  # no names claimed: vLLM's logger may register the same names in a process without us

    def collect(self) -> Iterator:
        from prometheus_client.core import Metric

        families: dict[str, Metric] = {}
        for engine in list(self._engines):
            for family, sample, extra, value in engine.samples():
                metric = families.get(family)
                if metric is None:
                    kind = "gauge" if family in GAUGES else "counter" if family in COUNTERS else "histogram"
                    metric = families[family] = Metric(family, _help(family), kind)
                metric.add_sample(sample, dict(zip(LABELS, engine.labels, strict=True)) | dict(extra), value)
        yield from families.values()


def _help(family: str) -> str:
    return GAUGES.get(family) or COUNTERS.get(family) or HISTOGRAMS[family]


_COLLECTOR = _Collector()
