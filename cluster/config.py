"""The schema of a modelfleet Serve application's ``args`` (what ``cluster.app:build`` reads).

Every model gets one deployment named after it. Unknown keys are errors (a typo must not be ignored), and
features that later releases implement are accepted by the schema but rejected with a clear message.

Example:
    >>> cfg = ClusterConfig.model_validate({"models": [{"name": "m", "source": "models/tiny-code-llama"}]})
    >>> cfg.models[0].engine, cfg.models[0].resources.num_cpus
    ('native', 1.0)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.admission import AdmissionLimits
from deployments.ingress.stages import Limits
from parallel.config import CacheConfig, ModelConfig, SchedulerConfig

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineOptions(_Strict):
    """Engine settings shared by the native and vLLM engines: one vocabulary (vLLM's names), passed to both
    engines as is; defaults are the native engine's (parallel/config.py), stated there once and given
    explicitly to vLLM too, so both engines run the same settings."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = ModelConfig.dtype
    max_num_seqs: int = Field(SchedulerConfig.max_num_seqs, ge=1, le=4096)
    max_num_batched_tokens: int | None = Field(None, ge=16, description="per step; default: the engine's "
                                               f"(native {SchedulerConfig.max_num_batched_tokens}, vLLM its "
                                               "platform's)")
    max_model_len: int | None = Field(None, ge=16, description="default: the model's max_position_embeddings")
    block_size: int | None = Field(None, ge=1, description=f"KV block tokens; default: the engine's (native "
                                   f"{CacheConfig.block_size}, vLLM its attention backend's)")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="KV cache budget per replica; default "
                                              "1 GiB on CPU, gpu_memory_utilization on CUDA")
    enable_prefix_caching: bool = CacheConfig.enable_prefix_caching
    seed: int = Field(ModelConfig.seed, ge=0, le=2**32 - 1)
    stream_interval: int = Field(SchedulerConfig.stream_interval, ge=1, le=64,
                                 description="tokens per streamed chunk (vLLM's --stream-interval)")
    engine_process: bool = Field(True, description="native engine: step loop in a process of its own (own GIL), "
                                 "as vLLM's EngineCore; off: a thread of the replica")
    compile: bool = Field(False, description="native engine: torch.compile the decode and verification steps "
                          "(~15 s per graph at start; vLLM compiles by its own default, enforce_eager)")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError("block_size must be a power of two")
        return v


class SpeculativeSpec(_Strict):
    """A draft model proposing tokens for this model to verify. ``draft``: a folder, or another model's name."""

    draft: str
    num_speculative_tokens: int = Field(4, ge=1, le=16)
    placement: Literal["colocated", "separate"] = "colocated"
    compile_draft: bool = Field(False, description="native engine: the draft's k proposal passes as one "
                                "torch.compile'd graph (greedy) or compiled passes")


class AutoscalingSpec(_Strict):
    """Knobs of cluster.autoscaling.decide (queue depth, KV usage, GPU utilisation); min 0 scales to zero.

    ``policy: serve-default`` keeps Serve's own ongoing-requests policy (``target_ongoing_requests``), with
    the same bounds and delays: the baseline of benchmarks/autoscaling.py.
    """

    policy: Literal["modelfleet", "serve-default"] = "modelfleet"
    target_ongoing_requests: float = Field(2.0, gt=0, description="serve-default only")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_queue_depth: float = Field(4.0, gt=0)
    target_gpu_utilization: float | None = Field(None, gt=0, le=1)
    kv_usage_high_water: float = Field(0.9, gt=0, le=1)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    downscale_max_step: int = Field(1, ge=0, description="replicas removed per downscale decision; 0: no limit")


class AdmissionSpec(_Strict):
    """Per replica: refuse at once (503 + Retry-After) when this many requests already wait, or when the
    expected wait of a new one exceeds ``max_queue_wait_s`` (deployments/admission.py)."""

    max_waiting: int = Field(AdmissionLimits.max_waiting, ge=0)
    max_queue_wait_s: float = Field(AdmissionLimits.max_queue_wait_s, gt=0)

    def limits(self) -> AdmissionLimits:
        return AdmissionLimits(self.max_waiting, self.max_queue_wait_s)


class Resources(_Strict):
    """Per replica. Fractions are fine: a 2-core machine holds a model at 1 CPU and embeddings at 0.5."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class ModelSpec(_Strict):
    """One served model, one Serve deployment of the same name."""

    name: str = Field(pattern=_NAME)
    kind: Literal["llm", "embedding"] = "llm"
    source: str = Field(min_length=1, description="local HF folder, package:<module> for packaged models, or a "
                        "registered version: models:/NAME/VERSION, models:/NAME@ALIAS (python -m cluster.registry)")
    engine: Literal["native", "vllm"] = "native"
    engine_options: EngineOptions = Field(default_factory=EngineOptions)
    tensor_parallel_size: int = Field(1, ge=1, description="ranks per replica, each in its own bundle")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per tensor-parallel rank")
    speculative: SpeculativeSpec | None = None
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSpec | None = None
    resources: Resources = Field(default_factory=Resources)
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec)
    max_ongoing_requests: int = Field(256, ge=1, description="per replica, before Serve queues at the caller; "
                                      "high, so requests reach the replica's admission at once")
    max_queued_requests: int = Field(256, ge=-1, description="beyond this Serve rejects with 503 (-1: no limit)")
    health_check_period_s: float = Field(10.0, gt=0, description="how often Serve checks the replica (and its ranks)")

    @model_validator(mode="after")
    def _not_yet(self) -> ModelSpec:
        if self.tensor_parallel_size > 1 and self.kind == "embedding":
            raise ValueError("tensor_parallel_size applies to llm models only")
        if self.speculative is not None and self.kind != "llm":
            raise ValueError("speculative applies to llm models only")
        if self.speculative is not None and self.tensor_parallel_size > 1 and self.engine == "native":
            raise ValueError("speculative decoding with tensor_parallel_size > 1 needs engine: vllm")
        if self.speculative is not None and self.speculative.placement == "separate" and self.engine != "native":
            raise ValueError("speculative placement 'separate' needs engine: native (vLLM runs its draft inside)")
        if self.autoscaling is not None and self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        if self.kind == "embedding" and self.engine != "native":
            raise ValueError("embedding models run on the built-in encoder: leave engine as 'native'")
        return self


class RouterSpec(_Strict):
    mode: Literal["serve", "direct"] = Field("serve", description="serve: every request through Serve's proxy "
                                             "and the router; direct: a front HAProxy sends each request to a "
                                             "replica of its model, which answers it itself (README: the "
                                             "streaming path)")
    direct_host: str = Field("127.0.0.1", description="mode direct: the address model replicas' own listeners "
                             "bind; 'node': each replica's node address (multi-node clusters)")
    direct_listen: str = Field("127.0.0.1", description="mode direct: the address the front proxy listens on")
    direct_port: int = Field(8000, ge=1, le=65535, description="mode direct: the front proxy's port, the one "
                             "clients use (Serve's own http_options.port must then be another)")
    num_cpus: float = Field(0.25, ge=0)
    num_replicas: int = Field(1, ge=1)
    request_timeout_s: float = Field(Limits.request_timeout_s, gt=0, description="per-request deadline: past "
                                     "it the generation is aborted and the client gets 504 (or an error event)")
    max_body_bytes: int = Field(Limits.max_body_bytes, ge=1024, le=1 << 30, description="larger bodies: 413")
    max_json_depth: int = Field(Limits.max_json_depth, ge=4, le=1000, description="deeper JSON: 400")
    health_timeout_s: float = Field(5.0, gt=0)
    cold_start_timeout_s: float = Field(120.0, gt=0, description="how long a request waits for a first token "
                                        "(e.g. while a model scales up from zero) before a 503")
    retry_after_s: int = Field(1, ge=0)


class RequestLogSpec(_Strict):
    enabled: bool = True
    dir: str | None = Field(None, description="folder of the request logs (one file per process); default: "
                            "modelfleet/ in the Ray session's log folder")
    privacy: Literal["off", "hashed", "full"] = Field("off", description="prompt and completion content: off "
                                                      "(none), hashed (sha256), full (text)")
    max_bytes: int = Field(64 << 20, ge=4096, description="a file rotates at this size")
    backups: int = Field(3, ge=0, le=100, description="rotated files kept per process")


class TracingSpec(_Strict):
    otlp_endpoint: str | None = Field(None, description="OTLP collector (http/protobuf: a URL such as "
                                      "http://collector:4318; grpc: http(s)://host:4317); unset: tracing off")
    protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    service_name: str = Field("modelfleet", min_length=1, max_length=128)
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of traces recorded (the ingress decides)")


class ObservabilitySpec(_Strict):
    metrics: bool = Field(True, description="every process pushes its metrics to the hub behind GET /metrics")
    push_interval_s: float = Field(2.0, ge=0.1, le=60, description="how stale /metrics may be")
    request_log: RequestLogSpec = Field(default_factory=RequestLogSpec)
    drift: bool = Field(True, description="modelfleet_drift_psi gauges per model and version")
    drift_baseline_requests: int = Field(500, ge=10, description="the first N requests of a model version are "
                                         "its baseline")
    drift_min_recent: int = Field(100, ge=10, description="a PSI needs this many requests in the recent window")
    drift_window_s: float = Field(600.0, ge=10, description="the recent window")
    tracing: TracingSpec = Field(default_factory=TracingSpec)
    stats_interval_s: float = Field(10.0, ge=0, description="a busy native replica logs vLLM's stats line this "
                                    "often (0: never; the vLLM engine logs its own)")


class AuthSpec(_Strict):
    keys_file: str = Field(min_length=1, description="the API key file (python -m cluster.keys create ...); "
                           "relative to the working directory or the repository")
    reload_s: float = Field(1.0, gt=0, le=60, description="how often each ingress process checks the file "
                            "for changes (created, revoked, rotated keys apply without a restart)")


class RateLimitSpec(_Strict):
    lease_fraction: float = Field(0.05, gt=0, le=1, description="share of a limit one ingress process leases "
                                  "at a time (README: the lease slack)")
    lease_ttl_s: float = Field(2.0, gt=0, le=60, description="an idle lease returns to the cluster's state")
    usage_file: str | None = Field(None, description="quota use is saved here, to survive a restart")


class CorsSpec(_Strict):
    allow_origins: list[str] = Field(default_factory=list, description="browser origins that may call the API "
                                     "('https://app.example.com', 'https://*.example.com', '*'); empty: CORS off")
    allow_credentials: bool = False
    max_age_s: int = Field(600, ge=0, le=86400)


class GatewaySpec(_Strict):
    """API keys, their limits, and what browsers and Host headers may do (README: "The gateway")."""

    auth: AuthSpec | None = Field(None, description="unset: no keys, every caller anonymous (local use only)")
    metrics: Literal["keys", "public", "local"] = Field("keys", description="with auth: /metrics needs any "
                                                        "valid key (keys), answers everyone (public), or only on "
                                                        "metrics_listen (local)")
    metrics_listen: str = Field("127.0.0.1:9464", pattern=r"^[^\s:]+:\d{1,5}$",
                                description="metrics: local: host:port of the metrics hub's own listener")
    rate_limits: RateLimitSpec = Field(default_factory=RateLimitSpec)
    cors: CorsSpec = Field(default_factory=CorsSpec)
    allowed_hosts: list[str] = Field(default_factory=list, description="Host headers answered (DNS-rebinding "
                                     "protection: 'api.example.com', '*.example.com', 'localhost'); empty: any")


class ClusterConfig(_Strict):
    """The whole application: models and the router in front of them."""

    name: str = Field("modelfleet", pattern=_NAME)
    models: list[ModelSpec] = Field(default_factory=list, description="the router's own models; versioned ones "
                                    "run in version applications (VersionAppConfig) named in the router's "
                                    "user_config")
    router: RouterSpec = Field(default_factory=RouterSpec)
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    registry: str | None = Field(None, description="the model registry (sqlite) that models:/NAME/VERSION and "
                                 "models:/NAME@ALIAS sources resolve in; default $MODELFLEET_REGISTRY, else "
                                 "registry.db in the working directory")

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {', '.join(dupes)}")
        if "modelfleet-router" in names:
            raise ValueError("'modelfleet-router' is reserved for the router deployment")
        taken = {f"{m.name}-draft-server" for m in self.models} & set(names)
        if taken:
            raise ValueError(f"names ending in '-draft-server' are reserved for draft deployments: {sorted(taken)}")
        return self


class VersionAppConfig(_Strict):
    """The ``args`` of a version application (``cluster.app:build_version``): one version of one model, in a
    Serve application of its own, so that bringing it up, changing or removing it never restarts another
    version; the router's ``user_config`` (``deployments/ingress/versions.py``) routes to it by weight.

    Example:
        >>> VersionAppConfig.model_validate({"model": {"name": "m", "source": "models/tiny-code-llama"}}).model.name
        'm'
    """

    model: ModelSpec
    registry: str | None = Field(None, description="as ClusterConfig.registry")
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)
    retry_after_s: int = Field(1, ge=0, description="Retry-After of the replica's own 503s")

    @model_validator(mode="after")
    def _alone(self) -> VersionAppConfig:
        if self.model.speculative is not None and self.model.speculative.placement == "separate":
            raise ValueError("a version application runs one deployment: speculative placement 'separate' is "
                             "not available there (use 'colocated')")
        return self
