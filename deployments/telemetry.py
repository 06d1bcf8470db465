"""A Serve process's observability, composed once: the request observer (metrics, request log, drift) and
the metrics pusher. The router, each model replica and each embedding replica make one ``Telemetry``.

Example (in a Serve replica, on its event loop):
    >>> t = Telemetry.start(Observability(), ingress="router", model=None)  # doctest: +SKIP
    >>> out = t.observer.begin("r1", "/v1/completions")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from deployments import tracing
from deployments.drift import DriftRecorder
from deployments.ingress.observe import RequestObserver
from deployments.metrics_hub import MetricsPusher
from deployments.request_log import RequestLog, RequestLogConfig

logger = logging.getLogger("ray.serve")


APP_VERSION = "{app}"  # a version application of a plain folder: its version label is the application's name


def app_version(version: str) -> str:
    """The version label of a replica: the registry version, or (``APP_VERSION``) its Serve application's name.

    Example:
        >>> app_version("3")
        '3'
    """
    if version != APP_VERSION:
        return version
    from ray import serve

    return serve.get_replica_context().app_name


@dataclass(frozen=True)
class Observability:
    """Config: ``observability`` (cluster/config.py ObservabilitySpec).

    Example:
        >>> Observability(push_interval_s=0.5).request_log.privacy
        'off'
    """

    metrics: bool = True  # push this process's registry to the hub (what /metrics shows)
    push_interval_s: float = 2.0
    request_log: RequestLogConfig = field(default_factory=RequestLogConfig)
    drift: bool = True
    stats_interval_s: float = 10.0  # a busy native replica's stats line (vLLM's LoggingStatLogger); 0: off
    drift_windows: tuple[int, float, int] = (500, 600.0, 100)  # baseline requests, recent window s, min recent
    tracing: tracing.TracingConfig = field(default_factory=tracing.TracingConfig)  # off unless an endpoint


def process_id() -> str:
    """This Serve replica's id (unique per replica: the ``replica`` label), or host-pid outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{os.uname().nodename}-{os.getpid()}"


class Telemetry:
    """What one process records and exports.

    Example:
        >>> t = Telemetry(Observability(metrics=False, request_log=RequestLogConfig(enabled=False)), "router", None)
        >>> t.pusher is None and t.observer.log is None
        True
    """

    def __init__(self, config: Observability, ingress: str, model: str | None, version: str = "") -> None:
        """``version``: the registry version this process serves ("" for a plain folder): a label on every
        series it pushes and the version of its requests in the request log and drift."""
        self.config = config
        self.source = process_id()
        rl = config.request_log
        log = RequestLog(rl, f"{ingress}-{self.source}") if rl.enabled else None
        self.drift = DriftRecorder() if config.drift else None
        self.observer = RequestObserver(ingress, log, self.drift, version)
        self.pusher: MetricsPusher | None = None
        if config.metrics:
            labels = {"replica": self.source} | ({"version": version} if version else {})
            self.pusher = MetricsPusher(self.source, labels, model, config.push_interval_s, self.drift,
                                        config.drift_windows)

    @classmethod
    def start(cls, config: Observability, ingress: str, model: str | None, version: str = "") -> Telemetry:
        """Make it and start pushing (needs the running event loop)."""
        t = cls(config, ingress, model, version)
        if config.tracing.otlp_endpoint:
            tracing.setup(config.tracing)
        if t.pusher is not None:
            t.pusher.start()
        return t

    async def stop(self) -> None:
        if self.pusher is not None:
            await self.pusher.stop()
        if self.observer.log is not None:
            self.observer.log.close()
        tracing.shutdown()  # flushes the spans still queued
