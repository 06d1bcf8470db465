"""What the router does for versioned models besides routing: shadows, canary analysis, the probe loop.

``Rollouts`` owns the router's ``Traffic`` table and, per versioned model, its ``Mirror`` (shadow) and its
analysis counts. One background task per router replica probes the versions' readiness every second and,
for each analysed model, syncs with the cluster's ``RolloutKeeper`` every ``interval_s`` and routes by the
weights it returns. For one request the router asks ``listeners(...)``: what must hear how the primary
ended (the shadow comparison, the analysis counts).

Example:
    >>> import asyncio
    >>> from deployments.ingress.versions import VersionTable
    >>> from deployments.ingress.generate import CallPolicy
    >>> async def demo():
    ...     r = Rollouts(Traffic([], {}, connect=lambda d, a: None), CallPolicy())
    ...     await r.apply(VersionTable.model_validate({"models": {"m": {"versions": {"a": 1, "b": 1},
    ...         "shadow": {"app": "s", "fraction": 1.0}}}}))
    ...     return sorted(r.mirrors), r.traffic.resolver.routes["m"].shadows[0].app
    >>> asyncio.run(demo())
    (['m'], 's')
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from deployments import metrics
from deployments.ingress.generate import CallPolicy
from deployments.ingress.mirror import Listener, Mirror
from deployments.ingress.resolve import Target
from deployments.ingress.rollout_keeper import KeeperClient
from deployments.ingress.traffic import Traffic
from deployments.ingress.versions import VersionTable
from deployments.messages import GenerateRequest

logger = logging.getLogger("ray.serve")
PROBE_EVERY_S = 1.0  # a version not ready yet: every second (a blue/green move waits on it)
READY_EVERY = 10  # a ready one: every 10th round (each probe is a logged call on its replica)


class Rollouts:
    def __init__(self, traffic: Traffic, policy: CallPolicy, log: Any = None, probe_timeout_s: float = 5.0) -> None:
        self.traffic, self.policy, self.log, self.probe_timeout_s = traffic, policy, log, probe_timeout_s
        self.mirrors: dict[str, Mirror] = {}
        self.keeper = KeeperClient()
        self._synced: dict[str, float] = {}
        self._shadow_seen: dict[str, tuple[int, int]] = {}  # model -> the mirror's (pairs, exact) at last sync
        self._task: asyncio.Task | None = None

    async def apply(self, table: VersionTable) -> None:
        """A new table: routes, then mirrors (a changed shadow spec gets a new mirror; the old one stops)."""
        self.traffic.apply(table)
        for model in list(self.mirrors):
            vm = table.models.get(model)
            if vm is None or vm.shadow != self.mirrors[model].spec:
                await self.mirrors.pop(model).close()
        for model, vm in table.models.items():
            if vm.shadow is not None and model not in self.mirrors:
                handle = self.traffic.handles[Target(model, 1.0, vm.shadow.app).key]
                self.mirrors[model] = Mirror(model, vm.shadow.app, vm.shadow, handle, self.policy, self.log)
        self._export_weights()
        if self._task is None and table.models:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for mirror in self.mirrors.values():
            await mirror.close()

    def listeners(self, model: str, target: Target, request: GenerateRequest,
                  started: float) -> tuple[list[Listener], Callable[[], None]]:
        """What must hear how this request's primary ends, and the callback for its first chunk (TTFT)."""
        out: list[Listener] = []
        mirror = self.mirrors.get(model)
        # (a request of several sequences is not mirrored: its interleaved choices compare to nothing)
        if mirror is not None and target.app != mirror.spec.app and not request.fans_out:
            listen = mirror.offer(request)
            if listen is not None:
                out.append(listen)
        first: list[float] = []
        vm = self.traffic.versioned(model)
        if vm is not None and vm.analysis is not None and target.app is not None:
            app = target.app

            def count(ids: tuple[int, ...] | None, how: str) -> None:
                if how != "cancelled":  # a client that left, or a 4xx, says nothing about the version
                    self.keeper.record(model, app, how == "ok", first[0] - started if first else None)

            out.append(count)
        return out, lambda: first.append(time.monotonic()) if not first else None

    # ---- the background loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self.traffic.probe(self.probe_timeout_s, READY_EVERY)
                await self._analyse()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the router's version loop failed once; it goes on")
            await asyncio.sleep(PROBE_EVERY_S)

    async def _analyse(self) -> None:
        now = time.monotonic()
        for model, vm in self.traffic.table.models.items():
            spec = vm.analysis
            if spec is None or now - self._synced.get(model, -1e9) < spec.interval_s:
                continue
            self._synced[model] = now
            try:
                weights, decision = await self.keeper.sync(model, spec, dict(vm.versions), self._shadow_delta(model))
            except Exception as err:  # the keeper is restarting: route by the weights held, count on
                logger.warning("canary analysis of %s: the rollout keeper is unreachable (%s)", model,
                               type(err).__name__)
                continue
            if decision is not None:
                metrics.CANARY_DECISIONS.labels(model, spec.canary, decision.action).inc()
            if weights != self.traffic.weights(model):
                self.traffic.override(model, weights)
                self._export_weights()

    def _shadow_delta(self, model: str) -> tuple[str, int, int] | None:
        mirror = self.mirrors.get(model)
        if mirror is None:
            return None
        seen = self._shadow_seen.get(model, (0, 0))
        self._shadow_seen[model] = (mirror.greedy_pairs, mirror.exact_pairs)
        return mirror.spec.app, mirror.greedy_pairs - seen[0], mirror.exact_pairs - seen[1]

    def _export_weights(self) -> None:
        for model in self.traffic.table.models:
            for app, w in self.traffic.weights(model).items():
                metrics.CANARY_WEIGHT.labels(model, app).set(w)
