"""How numbers leave many replica processes on many nodes: a push to one hub, one ``/metrics``.

A replica's prometheus_client registry is scraped by nothing, and Ray's metrics agent renames what goes
through it (``vllm:x`` becomes ``ray_vllm_x``), which breaks vLLM's dashboards. So every Serve process runs a
``MetricsPusher``: every ``interval_s`` it snapshots its registry (only ``vllm:*`` and ``modelfleet_*``
families, values as they stand: counters stay cumulative) and sends it to the ``MetricsHub``, a detached
named Ray actor (one per cluster, restarted by Ray if it dies; its state refills within one interval).
The ingress's ``GET /metrics`` asks the hub to render the latest snapshot of every live process, each
sample labelled with its ``replica``, in Prometheus text or OpenMetrics (by the scraper's Accept header).

Correct after a replica dies: a source not heard of for its ttl (max(15 s, 3 push intervals)) is dropped,
and a replacement is a new source with its own ``replica`` label, so no series is counted twice; a
restarted engine's counters start again from 0, a reset Prometheus handles. A replica that stops gracefully
pushes once more and is then left to expire, so a scrape still sees its last counts. Staleness is at most
one push interval (2 s by default; Prometheus scrapes every 15 s by default); a render is cached for 1 s and
the replica counts from Serve's controller for 5 s, so scrapers cannot load the hub or the controller.

Example:
    >>> snap = Snapshot("r1", (("replica", "r1"),), (Family("vllm:x", "gauge", "x", (("vllm:x", (), 2.0),)),))
    >>> render([snap])[0].decode().splitlines()[-1]
    'vllm:x{replica="r1"} 2.0'
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, openmetrics
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from deployments.metrics import HUB_COUNTERS, HUB_GAUGES

logger = logging.getLogger("ray.serve")

HUB_NAME = "modelfleet-metrics-hub-v1"  # the version: a hub left by older code never meets newer snapshots
HUB_NAMESPACE = "modelfleet"
PREFIXES = ("vllm:", "modelfleet_")

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]


@dataclass(frozen=True)
class Family:
    """One metric family as it crosses to the hub (plain tuples: small to pickle).

    Example:
        >>> Family("vllm:x", "gauge", "help", (("vllm:x", (("model_name", "m"),), 1.0),)).samples[0][2]
        1.0
    """

    name: str
    kind: str  # counter, gauge, histogram, ...
    help: str
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Snapshot:
    """A process's families at one moment, with the labels the hub adds to each of its samples.

    Example:
        >>> Snapshot("r1", (("replica", "r1"),), (), model="m").ttl_s
        15.0
    """

    source: str
    labels: Labels
    families: tuple[Family, ...]
    model: str | None = None  # the model this process serves (None for the router)
    drift: Any = None  # deployments.drift.DriftCounts observed since the previous push
    drift_windows: tuple[int, float, int] = (500, 600.0, 100)  # baseline requests, window s, min recent
    ttl_s: float = 15.0  # silent this long: the process is gone
    received_at: float = 0.0  # set by the hub


def snapshot_registry(registry: CollectorRegistry = REGISTRY, prefixes: tuple[str, ...] = PREFIXES
                      ) -> tuple[Family, ...]:
    """The registry's vllm:* and modelfleet_* families (``_created`` samples dropped: they are per process)."""
    out = []
    for metric in registry.collect():
        if not metric.name.startswith(prefixes):
            continue
        samples = tuple((s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in metric.samples
                        if not s.name.endswith("_created"))
        if samples:
            out.append(Family(metric.name, metric.type, metric.documentation, samples))
    return tuple(out)


def merge(snapshots: Iterable[Snapshot]) -> list[Metric]:
    """Every snapshot's families under one name each, every sample with its source's labels. A family a
    source reports with another type than the first source did is left out for that source (a mismatch
    would make the whole exposition unparseable)."""
    families: dict[str, Metric] = {}
    for snap in snapshots:
        extra = dict(snap.labels)
        for fam in snap.families:
            metric = families.get(fam.name)
            if metric is None:
                metric = families[fam.name] = Metric(fam.name, fam.help, fam.kind)
            elif metric.type != fam.kind:
                continue
            for name, labels, value in fam.samples:
                metric.add_sample(name, {**dict(labels), **extra}, value)
    return list(families.values())


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def render(snapshots: Iterable[Snapshot], extra: Iterable[Metric] = (), accept: str = "") -> tuple[bytes, str]:
    """The exposition (body, content type): Prometheus text, or OpenMetrics when ``accept`` asks for it.

    OpenMetrics is written without name escaping: ``vllm:x`` is a valid OpenMetrics name, but
    prometheus_client (0.26) turns colons into underscores unless the scraper asks for ``allow-utf-8``, and
    Prometheus asks for OpenMetrics by default: vLLM's names must survive the scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merge(snapshots) + list(extra)))  # type: ignore[arg-type]
    if "application/openmetrics-text" in accept:
        return openmetrics.exposition.generate_latest(registry, escaping="allow-utf-8"), OPENMETRICS
    return generate_latest(registry), CONTENT_TYPE_LATEST


MAX_SEEN = 4096  # sources remembered for counting starts (bounded; the oldest are forgotten first)
AUTOSCALER_TTL_S = 60.0  # a deployment's autoscaler gauges go once its policy stopped reporting


@dataclass
class HubState:
    """The hub's memory, Ray-free (unit-tested alone).

    Example:
        >>> state = HubState()
        >>> state.push(Snapshot("r1", (("replica", "r1"),), (), "m", ttl_s=15.0), now=0.0)
        >>> [s.source for s in state.live(now=10.0)], [s.source for s in state.live(now=16.0)], state.starts
        (['r1'], [], {'m': 1})
    """

    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    seen: dict[str, None] = field(default_factory=dict)  # every source heard of (insertion-ordered, bounded)
    starts: dict[str, int] = field(default_factory=dict)  # model -> replicas first heard of
    desired: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (value, at)
    signals: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (model, direction, driver)
    replicas: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, state) -> count

    def push(self, snap: Snapshot, now: float) -> None:
        if snap.source not in self.seen:  # a source that went silent and came back is no new start
            self.seen[snap.source] = None
            if len(self.seen) > MAX_SEEN:
                del self.seen[next(iter(self.seen))]
            if snap.model is not None:
                self.starts[snap.model] = self.starts.get(snap.model, 0) + 1
        self.snapshots[snap.source] = replace(snap, received_at=now, drift=None)

    def live(self, now: float) -> list[Snapshot]:
        for source in [s for s, snap in self.snapshots.items() if now - snap.received_at > snap.ttl_s]:
            del self.snapshots[source]  # silent too long: the process is gone
        return list(self.snapshots.values())

    def autoscaling(self, model: str, desired: float, signals: dict[str, float], direction: str | None,
                    driver: str, now: float) -> None:
        self.desired[model] = (desired, now)
        for name, value in signals.items():
            self.signals[(model, name)] = (value, now)
        if direction is not None:
            key = (model, direction, driver)
            self.decisions[key] = self.decisions.get(key, 0) + 1

    def expire(self, now: float) -> None:
        """Autoscaler gauges of deployments whose policy stopped reporting (deleted, or no longer scaled)."""
        for table in (self.desired, self.signals):
            for key in [k for k, (_, at) in table.items() if now - at > AUTOSCALER_TTL_S]:
                del table[key]

    def own(self) -> list[Metric]:
        """The series only the hub knows."""
        def family(name: str, kind: str) -> Metric:
            return Metric(name, HUB_GAUGES.get(name) or HUB_COUNTERS[name], kind)

        replicas = family("modelfleet_replicas", "gauge")
        for (model, state), n in self.replicas.items():
            replicas.add_sample("modelfleet_replicas", {"model_name": model, "state": state}, n)
        starts = family("modelfleet_replica_starts", "counter")
        for model, n in self.starts.items():
            starts.add_sample("modelfleet_replica_starts_total", {"model_name": model}, n)
        desired = family("modelfleet_autoscaler_desired_replicas", "gauge")
        for model, (n, _) in self.desired.items():
            desired.add_sample("modelfleet_autoscaler_desired_replicas", {"model_name": model}, n)
        signals = family("modelfleet_autoscaler_signal", "gauge")
        for (model, name), (v, _) in self.signals.items():
            signals.add_sample("modelfleet_autoscaler_signal", {"model_name": model, "signal": name}, v)
        decisions = family("modelfleet_autoscaler_decisions", "counter")
        for (model, direction, driver), n in self.decisions.items():
            decisions.add_sample("modelfleet_autoscaler_decisions_total",
                                 {"model_name": model, "direction": direction, "driver": driver}, n)
        return [m for m in (replicas, starts, desired, signals, decisions) if m.samples]


class MetricsHub:
    """The Ray actor behind ``/metrics`` (see the module docstring). Reach it with ``hub()``.

    Example:
        >>> body, ctype = ray.get(hub().render.remote(""))  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.state = HubState()
        self.drift: Any = None  # deployments.drift.DriftTracker, made on the first counts
        self._cache: dict[bool, tuple[float, tuple[bytes, str]]] = {}  # openmetrics? -> (at, rendered)
        self._replicas_at = 0.0

    def push(self, snap: Snapshot | bytes) -> None:
        if isinstance(snap, bytes):  # pickled by the pusher off its event loop (see MetricsPusher.push_once)
            snap = pickle.loads(snap)
        now = time.time()
        self.state.push(snap, now)
        if snap.drift is not None:
            if self.drift is None:
                from deployments.drift import DriftTracker

                baseline, window_s, min_recent = snap.drift_windows  # the first pusher's settings (one config)
                self.drift = DriftTracker(baseline_size=baseline, window_s=window_s, min_recent=min_recent)
            self.drift.merge(snap.drift, now)

    def forget(self, source: str) -> None:
        self.state.snapshots.pop(source, None)

    def autoscaling(self, model: str, desired: float, signals: dict[str, float], direction: str | None,
                    driver: str) -> None:
        self.state.autoscaling(model, desired, signals, direction, driver, time.time())

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        now = time.time()
        kind = "application/openmetrics-text" in accept
        cached = self._cache.get(kind)
        if cached is not None and now - cached[0] < RENDER_CACHE_S:
            return cached[1]
        if now - self._replicas_at >= REPLICAS_EVERY_S:
            self._replicas_at = now
            await self._refresh_replicas()
        self.state.expire(now)
        out = render(self.state.live(now), self.state.own() + self._drift_metrics(), accept)
        self._cache[kind] = (now, out)
        return out

    def sources(self) -> list[str]:
        return sorted(s.source for s in self.state.live(time.time()))

    async def listen(self, host: str, port: int) -> int:
        """``GET /metrics`` on a listener of the hub's own (``gateway.metrics: local``); idempotent."""
        if getattr(self, "_listener", None) is None:
            from deployments.metrics_listener import serve_metrics

            self._listener = await serve_metrics(self.render, host, port)
        return self._listener[1]

    def _drift_metrics(self) -> list[Metric]:
        if self.drift is None:
            return []
        metric = Metric("modelfleet_drift_psi", HUB_GAUGES["modelfleet_drift_psi"], "gauge")
        for (model, version, feature), value in self.drift.gauges(time.time()).items():
            metric.add_sample("modelfleet_drift_psi", {"model_name": model, "version": version,
                                                       "feature": feature}, value)
        return [metric] if metric.samples else []

    async def _refresh_replicas(self) -> None:
        """Target and running replicas per deployment, from Serve's controller (absent when it is)."""
        import ray

        try:
            controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
            details = await asyncio.wait_for(controller.get_serve_instance_details.remote(), timeout=5)
        except Exception as err:  # no Serve running, or the controller restarting: leave the last counts
            logger.debug("no replica counts from Serve's controller: %s", err)
            return
        counts: dict[tuple[str, str], float] = {}
        for app in (details.get("applications") or {}).values():
            for name, dep in (app.get("deployments") or {}).items():
                counts[(name, "target")] = float(dep.get("target_num_replicas") or 0)
                counts[(name, "running")] = float(sum(1 for r in dep.get("replicas") or []
                                                      if r.get("state") == "RUNNING"))
        self.state.replicas = counts


RENDER_CACHE_S = 1.0
REPLICAS_EVERY_S = 5.0
def hub() -> Any:
    """The hub's actor handle, created on first use (detached: it outlives the app that made it)."""
    from deployments.singleton import detached

    return detached(MetricsHub, HUB_NAME, namespace=HUB_NAMESPACE)


class MetricsPusher:
    """Sends this process's registry to the hub every ``interval_s`` (an asyncio task on the running loop).

    ``drift`` (a ``deployments.drift.DriftRecorder``) rides along: its counts since the previous push.

    Example:
        >>> MetricsPusher("replica-1", {"replica": "replica-1"}, "m").snapshot().labels
        (('replica', 'replica-1'),)
    """

    def __init__(self, source: str, labels: dict[str, str], model: str | None = None,
                 interval_s: float = 2.0, drift: Any = None,
                 drift_windows: tuple[int, float, int] = (500, 600.0, 100)) -> None:
        self.source, self.labels, self.model = source, tuple(sorted(labels.items())), model
        self.interval_s, self.drift, self.drift_windows = interval_s, drift, drift_windows
        self.ttl_s = max(15.0, 3 * interval_s)  # a late push or two is not a death
        self._task: asyncio.Task | None = None
        self._hub: Any = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def snapshot(self) -> Snapshot:
        counts = self.drift.take() if self.drift is not None else None
        return Snapshot(self.source, self.labels, snapshot_registry(), self.model, counts, self.drift_windows,
                        self.ttl_s)

    async def push_once(self) -> None:
        # Collecting and pickling the registry take milliseconds: both in a thread, so the event loop only
        # hands Ray one bytes object (profiled: pickling the Snapshot in .remote() held the loop ~20 ms a push).
        snap = await asyncio.to_thread(lambda: pickle.dumps(self.snapshot(), protocol=5))
        if self._hub is None:
            self._hub = await asyncio.to_thread(hub)
        try:
            await asyncio.wait_for(self._hub.push.remote(snap), timeout=10)
        except Exception:
            self._hub = None  # look it up again next time (Ray restarts it)
            raise

    async def _run(self) -> None:
        warned = False
        while True:
            try:
                await self.push_once()
                warned = False
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not warned:
                    logger.warning("metrics: cannot reach the metrics hub (%s: %s); retrying", type(err).__name__,
                                   err)
                    warned = True
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Leave: one last push (the counts since the previous one), then the hub lets it expire after its
        ttl, so a scrape in between still sees the final values."""
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.push_once(), timeout=5)
        except Exception as err:  # the hub is gone too (the app is being deleted)
            logger.info("metrics: no final push (%s)", type(err).__name__)
