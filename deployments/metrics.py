"""modelfleet's own metrics (``modelfleet_*``), recorded in the process that sees the event.

Each Serve process (router, model replica, embedding replica) records into prometheus_client's process
registry; ``deployments/metrics_hub.py`` carries every process's registry to the one ``/metrics``. The hub
itself adds what no replica knows alone (replicas per model, autoscaling decisions, replica starts, drift).
The names here are the contract of the Grafana dashboard (``cluster/dashboard.py`` checks it).

    where               series
    ingress (router     modelfleet_requests_total{model_name, route, status, ingress}
    or direct replica)  modelfleet_request_rejections_total{model_name, reason}
                        modelfleet_in_flight_streams{model_name, ingress}
                        modelfleet_rate_limit_leases_total{result}   (round trips to the limits state)
    router (versioned   modelfleet_shadow_requests_total{model_name, version, result}
    models)             modelfleet_shadow_greedy_pairs_total{model_name, version, exact}
                        modelfleet_shadow_first_diff_token / _length_delta_tokens / _latency_delta_seconds
                        modelfleet_version_weight{model_name, app}, modelfleet_canary_decisions_total{..., action}
    model replica       modelfleet_router_queue_seconds{model_name}   (admission -> the replica starts it)
                        modelfleet_engine_restarts_total{model_name}
                        modelfleet_gpu_utilization_ratio / _gpu_memory_used_bytes{model_name} (NVML only)
    embedding replica   modelfleet_embedding_batch_size{model_name}
    hub                 modelfleet_replicas{model_name, state}, modelfleet_replica_starts_total{model_name},
                        modelfleet_autoscaler_desired_replicas / _signal / _decisions_total, modelfleet_drift_psi

Example:
    >>> REQUESTS.labels("m", "/v1/completions", "200", "router").inc()
    >>> "modelfleet_requests" in MODELFLEET_METRIC_NAMES
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The router's queue: the ingress admitted the request, the replica has not started it (Serve's handle queue,
# a cold start). Seconds, vLLM's request-latency scale at the low end.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

REQUESTS = Counter("modelfleet_requests", "Requests answered, by route, model, HTTP status and ingress.",
                   ["model_name", "route", "status", "ingress"])
REJECTIONS = Counter("modelfleet_request_rejections", "Requests refused or failed, by reason (the OpenAI error "
                     "code: overloaded, request_too_large, invalid_value, timeout, ...).", ["model_name", "reason"])
IN_FLIGHT = Gauge("modelfleet_in_flight_streams", "Streaming responses being sent.", ["model_name", "ingress"])
ROUTER_QUEUE = Histogram("modelfleet_router_queue_seconds", "Time from admission at the ingress until the model "
                         "replica started the request.", ["model_name"], buckets=QUEUE_BUCKETS)
RATE_LIMIT_LEASES = Counter("modelfleet_rate_limit_leases", "Round trips of an ingress process to the cluster's "
                            "rate-limit state, by result (granted, refused, error: enforced locally instead).",
                            ["result"])
EMBEDDING_BATCH = Histogram("modelfleet_embedding_batch_size", "Inputs per embedding forward pass.",
                            ["model_name"], buckets=BATCH_BUCKETS)
# Shadow traffic and canary analysis (the router: deployments/ingress/mirror.py, rollout_keeper.py).
DELTA_TOKENS = (-256, -64, -16, -4, -1, 0, 1, 4, 16, 64, 256)
DELTA_SECONDS = (-10.0, -2.5, -1.0, -0.25, -0.05, 0.0, 0.05, 0.25, 1.0, 2.5, 10.0)
SHADOW_REQUESTS = Counter("modelfleet_shadow_requests", "Requests copied to a shadow version, by result: mirrored, "
                          "dropped (its queue was full), failed, compared, primary_failed (nothing to compare).",
                          ["model_name", "version", "result"])
SHADOW_GREEDY_PAIRS = Counter("modelfleet_shadow_greedy_pairs", "Greedy primary/shadow pairs compared, by whether "
                              "the token ids matched exactly.", ["model_name", "version", "exact"])
SHADOW_FIRST_DIFF = Histogram("modelfleet_shadow_first_diff_token", "Position of the first token where the shadow's "
                              "output differs from the primary's.", ["model_name", "version"],
                              buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
SHADOW_LENGTH_DELTA = Histogram("modelfleet_shadow_length_delta_tokens", "Shadow output tokens minus the "
                                "primary's.", ["model_name", "version"], buckets=DELTA_TOKENS)
SHADOW_LATENCY_DELTA = Histogram("modelfleet_shadow_latency_delta_seconds", "Shadow e2e latency minus the "
                                 "primary's.", ["model_name", "version"], buckets=DELTA_SECONDS)
CANARY_WEIGHT = Gauge("modelfleet_version_weight", "Traffic weight of each version of a model (after any canary "
                      "analysis).", ["model_name", "app"])
CANARY_DECISIONS = Counter("modelfleet_canary_decisions", "Canary-analysis decisions, by action (hold, step, "
                           "promote, rollback).", ["model_name", "canary", "action"])

# Recorded by the hub (metrics_hub.py), named here so that one list is the whole contract.
HUB_GAUGES = {
    "modelfleet_replicas": "Replicas per model: the controller's target and those running.",
    "modelfleet_autoscaler_desired_replicas": "The autoscaling policy's latest decision.",
    "modelfleet_autoscaler_signal": "Each autoscaling signal's latest value (queue depth per replica, KV usage, "
                                    "GPU utilisation).",
    "modelfleet_drift_psi": "Population stability index of a request feature, recent window vs baseline.",
}
HUB_COUNTERS = {
    "modelfleet_replica_starts": "Replicas started (first heard of by the metrics hub).",
    "modelfleet_autoscaler_decisions": "Scaling decisions that changed the target, by direction and driver.",
}
GPU_METRICS = ("modelfleet_gpu_utilization_ratio", "modelfleet_gpu_memory_used_bytes")

MODELFLEET_METRIC_NAMES: frozenset[str] = frozenset(
    {"modelfleet_requests", "modelfleet_request_rejections", "modelfleet_in_flight_streams",
     "modelfleet_router_queue_seconds", "modelfleet_engine_restarts", "modelfleet_embedding_batch_size",
     "modelfleet_rate_limit_leases", "modelfleet_shadow_requests", "modelfleet_shadow_greedy_pairs",
     "modelfleet_shadow_first_diff_token", "modelfleet_shadow_length_delta_tokens",
     "modelfleet_shadow_latency_delta_seconds", "modelfleet_version_weight", "modelfleet_canary_decisions",
     *GPU_METRICS, *HUB_GAUGES, *HUB_COUNTERS})


class GpuCollector:
    """NVML readings of this replica at collection time; yields nothing without a reading (absent, not 0).

    Example:
        >>> list(GpuCollector("m", lambda: None).collect())
        []
    """

    def __init__(self, model_name: str, read: Callable[[], object | None]) -> None:
        self.model_name, self.read = model_name, read

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = self.read()
        if reading is None:
            return
        util = GaugeMetricFamily(GPU_METRICS[0], "GPU utilisation of this replica's devices (NVML), 0..1.",
                                 labels=["model_name"])
        util.add_metric([self.model_name], float(reading.utilization))  # type: ignore[attr-defined]
        mem = GaugeMetricFamily(GPU_METRICS[1], "GPU memory used by this replica's devices (NVML), bytes.",
                                labels=["model_name"])
        mem.add_metric([self.model_name], float(reading.memory_used_bytes))  # type: ignore[attr-defined]
        yield util
        yield mem


def watch_gpu(model_name: str, read: Callable[[], object | None]) -> GpuCollector:
    collector = GpuCollector(model_name, read)
    REGISTRY.register(collector)
    return collector


class RestartCollector:
    """``modelfleet_engine_restarts_total``: this replica's engine restarts, read at collection (0 from the
    start: a series, not a gap).

    Example:
        >>> [s.value for m in RestartCollector("m", lambda: 2).collect() for s in m.samples]
        [2.0]
    """

    def __init__(self, model_name: str, read: Callable[[], int]) -> None:
        self.model_name, self.read = model_name, read

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("modelfleet_engine_restarts", "Engine processes restarted in place by their "
                                     "replica.", labels=["model_name"])
        family.add_metric([self.model_name], float(self.read()))
        yield family


def watch_restarts(model_name: str, read: Callable[[], int]) -> RestartCollector:
    collector = RestartCollector(model_name, read)
    REGISTRY.register(collector)
    return collector
