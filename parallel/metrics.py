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
- per step (``on_step``, from the engine loop's thread, before any delta merging): generation tokens, the
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

Recording is plain Python (a bisect and two additions per observation, folded 16 steps at a time: see
``EngineMetrics``) exported by a collector registered once per process; prometheus_client's own Histogram
costs several times more per observe (a lock and a labels lookup unless the child is cached, as vLLM's
``create_metric_per_engine`` does) and would refuse a second engine's registration of the same names. vLLM
records each step as it comes, in AsyncLLM's output handler ("make into a coroutine and launch it in
background thread once Prometheus overhead is non-trivial", vllm/v1/engine/async_llm.py).

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
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
    les: tuple[str, ...] = field(default=(), repr=False)  # bucket labels, spelled once (not per collection)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.les = (*(_le(b) for b in self.bounds), "+Inf")

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le semantics: value <= bound
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf, as Prometheus exposes them."""
        return list(zip(self.les, map(float, itertools.accumulate(self.counts)), strict=True))


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)  # as prometheus_client spells vLLM's: "1.0", "1e+06"


_ARRIVAL, _STEP, _FORGET = 0, 1, 2  # the kinds of recorded events


@dataclass(slots=True)
class _Timing:
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


FOLD_EVERY_STEPS = 16  # steps recorded before the recording thread folds them (see EngineMetrics)
MAX_EVENTS = 4096  # a bound for arrivals and aborts without steps, folded by whoever records the next one


class EngineMetrics:
    """One engine's metrics (labels ``model_name``, ``engine``); exported through the process's collector.

    ``on_arrival`` from the caller's thread when a request is added, ``on_step`` from the engine loop's
    thread with each step's deltas, ``forget`` from either; ``stats`` is the engine's snapshot getter, read
    at collection.

    The three append an event to a deque (atomic under the GIL), folded into the counters and histograms in
    order ``FOLD_EVERY_STEPS`` steps at a time by the recording thread, and before any read (``samples()``,
    ``histograms``, ...). Why batches: one step's bookkeeping alone between two engine steps finds its dict,
    timings and buckets evicted from the caches, and costs ~5x what it costs warm (benchmarks/recording_cost.py:
    ~29 us per step of 16 requests on the relay thread, ~6 us replayed); in a batch only the first step pays.
    Not larger ones (one per 2 s collection): the deltas kept alive would survive young collections, and a
    full collection of a replica's heap holds the GIL ~100 ms; 16 steps keep a few hundred objects ~0.2 s.
    """

    def __init__(self, model_name: str, engine: str = "0", max_model_len: int = 2048,
                 stats: Callable[[], EngineStats] | None = None, speculative: bool = False) -> None:
        self.labels = (model_name, engine)
        self.stats = stats
        self.speculative = speculative
        self._lock = threading.Lock()  # one folder at a time, and a consistent view for samples()
        self._events: deque[tuple[int, Any, Any]] = deque()
        self._steps = 0  # steps among the events (read without the lock: a hint)
        self._timing: dict[str, _Timing] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._success = dict.fromkeys(FINISHED_REASONS, 0)
        tokens = request_tokens_buckets(max_model_len)
        bounds = {"vllm:time_to_first_token_seconds": TIME_TO_FIRST_TOKEN_BUCKETS,
                  "vllm:inter_token_latency_seconds": INTER_TOKEN_LATENCY_BUCKETS,
                  "vllm:request_prompt_tokens": tokens, "vllm:request_generation_tokens": tokens,
                  "vllm:iteration_tokens_total": ITERATION_TOKENS_BUCKETS}
        self._histograms = {name: Histogram(bounds.get(name, REQUEST_LATENCY_BUCKETS)) for name in HISTOGRAMS}
        self._ttft = self._histograms["vllm:time_to_first_token_seconds"]
        self._itl = self._histograms["vllm:inter_token_latency_seconds"]
        self._iteration = self._histograms["vllm:iteration_tokens_total"]
        _COLLECTOR.add(self)

    # ---- recording (any thread) -------------------------------------------------------------------------
    def on_arrival(self, request_id: str, now: float) -> None:
        self._record((_ARRIVAL, request_id, now))

    def on_step(self, deltas: Iterable[OutputDelta], now: float) -> None:
        """One engine step's deltas (all of them, unmerged), at ``now``. Kept as given until folded: the
        engine loops hand over a fresh list per step and never touch it again."""
        self._events.append((_STEP, deltas, now))
        self._steps += 1
        if self._steps >= FOLD_EVERY_STEPS:
            self.fold()

    def forget(self, request_id: str, reason: str | None = "abort") -> None:
        """A request that ended without a final delta here (aborted by its caller, or lost with a dead
        engine process): counted under ``reason`` (None: not at all, a request the engine refused), no
        latencies. Idempotent, and a no-op once the final delta was recorded."""
        self._record((_FORGET, request_id, reason))

    def _record(self, event: tuple[int, Any, Any]) -> None:
        self._events.append(event)
        if len(self._events) > MAX_EVENTS:
            self.fold()

    # ---- the folded values ------------------------------------------------------------------------------
    @property
    def histograms(self) -> dict[str, Histogram]:
        self.fold()
        return self._histograms

    @property
    def prompt_tokens(self) -> int:
        self.fold()
        return self._prompt_tokens

    @property
    def generation_tokens(self) -> int:
        self.fold()
        return self._generation_tokens

    @property
    def success(self) -> dict[str, int]:
        self.fold()
        return self._success

    def fold(self) -> None:
        """Apply the events recorded so far, in their order."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        events, timing = self._events, self._timing
        self._steps = 0
        for _ in range(len(events)):  # those queued now; one appended meanwhile waits for the next fold
            kind, a, b = events.popleft()
            if kind == _STEP:
                self._step(a, b)
            elif kind == _ARRIVAL:
                timing[a] = _Timing(b)
            elif timing.pop(a, None) is not None and b is not None:
                self._success[b] += 1

    def _step(self, deltas: Iterable[OutputDelta], now: float) -> None:
        timing, ttft, itl = self._timing, self._ttft, self._itl
        itl_counts, itl_bounds, bisect_left = itl.counts, itl.bounds, bisect.bisect_left
        generated = prefilled = itl_n = 0
        itl_sum = 0.0
        for d in deltas:
            t = timing.get(d.request_id)
            if t is None:
                continue  # arrived before metrics were attached, or already finished
            n = len(d.token_ids)
            generated += n
            if d.scheduled_at is not None and t.scheduled is None:
                t.scheduled = d.scheduled_at
            if n:
                if t.first_token is None:
                    t.first_token = now
                    self._prompt_tokens += d.num_prompt_tokens
                    prefilled += d.num_prompt_tokens - d.num_cached_tokens
                    ttft.observe(now - t.arrival)
                else:  # Histogram.observe inlined, its sum and count once per step: the per-token line
                    gap = now - t.last_token  # type: ignore[operator]  (set with first_token)
                    itl_counts[bisect_left(itl_bounds, gap)] += 1
                    itl_sum += gap
                    itl_n += 1
                t.last_token = now
            if d.finished:
                del timing[d.request_id]
                self._finish(d, t, now)
        itl.sum += itl_sum
        itl.count += itl_n
        self._generation_tokens += generated
        if prefilled or generated:
            self._iteration.observe(prefilled + generated)

    def _finish(self, d: OutputDelta, t: _Timing, now: float) -> None:
        h = self._histograms
        reason = "error" if d.error is not None else (d.finish_reason or "abort")
        self._success[reason if reason in self._success else "stop"] += 1
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
        with self._lock:  # a consistent copy; yielded after the lock is released (a fold waits on it)
            self._fold()
            rows = [("vllm:prompt_tokens", "vllm:prompt_tokens_total", (), float(self._prompt_tokens)),
                    ("vllm:generation_tokens", "vllm:generation_tokens_total", (), float(self._generation_tokens))]
            rows += [("vllm:request_success", "vllm:request_success_total", (("finished_reason", reason),),
                      float(n)) for reason, n in self._success.items()]
            for name, hist in self._histograms.items():
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
            labels = dict(zip(LABELS, engine.labels, strict=True))
            for family, sample, extra, value in engine.samples():
                metric = families.get(family)
                if metric is None:
                    kind = "gauge" if family in GAUGES else "counter" if family in COUNTERS else "histogram"
                    metric = families[family] = Metric(family, _help(family), kind)
                metric.add_sample(sample, labels | dict(extra) if extra else labels.copy(), value)
        yield from families.values()


def _help(family: str) -> str:
    return GAUGES.get(family) or COUNTERS.get(family) or HISTOGRAMS[family]


_COLLECTOR = _Collector()
