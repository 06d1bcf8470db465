"""The router's live traffic table: the version table (``versions.py``) made into routes, handles, readiness.

The router's own models (its application's deployments) route as configured. A *versioned* model routes to
deployments in version applications, at the table's weights, sticky per caller (``split.choose``); a canary
analysis (``rollout_keeper.py``) may override a model's weights.

Readiness decides which versions take traffic (blue/green: "move the traffic once the new version is
healthy"). The router probes every versioned target's ``info`` in the background; then, for one request:

- the positive-weight targets that answered ready share the traffic by weight (a canary still starting
  takes none yet; its share goes to the ready ones);
- when none of them is ready (the new version of a blue/green move is still loading), the targets the model
  last routed to keep the traffic, even at weight 0 now: the old version answers until the new one is up;
- with neither (a router that just started, a version application that is gone), the positive-weight targets
  are called anyway: the call waits for a replica (bounded by the router's cold-start timeout), then 503.

Invariant: a weight change touches only this table (the router's ``user_config``), never a replica.

Example:
    >>> from deployments.ingress.versions import VersionTable
    >>> t = Traffic([], {}, connect=lambda deployment, app: f"handle of {app}")
    >>> t.apply(VersionTable.model_validate({"models": {"tiny": {"versions": {"v1": 90, "v2": 10}}}}))
    >>> t.mark_ready("v1/tiny", {"ready": True, "version": "1"})
    >>> t.choose("tiny", "llm", key="alice").app  # v2 is not ready yet: all of tiny's traffic goes to v1
    'v1'
    >>> t.handles["v2/tiny"]
    'handle of v2'
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from deployments.ingress.resolve import Kind, ModelRoute, Resolver, Target
from deployments.ingress.split import choose
from deployments.ingress.versions import VersionedModel, VersionTable

logger = logging.getLogger("ray.serve")


class Traffic:
    """Routes for the router's own models and its versioned ones; ``handles`` by target key."""

    def __init__(self, routes: Iterable[ModelRoute], handles: Mapping[str, Any],
                 connect: Callable[[str, str], Any]) -> None:
        self.fixed = {r.model: r for r in routes}
        self.handles: dict[str, Any] = dict(handles)
        self.connect = connect  # (deployment, app) -> a handle (no round trip: the app may not exist yet)
        self.table = VersionTable()
        self.overrides: dict[str, dict[str, float]] = {}  # model -> app -> weight, set by a canary analysis
        self.ready: dict[str, bool] = {}  # target key -> its replicas answered ready at the last probe
        self.info: dict[str, dict[str, Any]] = {}  # target key -> the replica's info (version, sha256, ...)
        self.last: dict[str, tuple[Target, ...]] = {}  # model -> the ready targets it last routed to
        self._probes = 0
        self.resolver = Resolver(self.fixed.values())

    # ---- the table ----------------------------------------------------------------------------------------
    def apply(self, table: VersionTable) -> None:
        """A new version table (``serve deploy`` of new weights): the routes change, no replica does."""
        clash = sorted(set(table.models) & set(self.fixed))
        if clash:
            raise ValueError(f"models {clash} are both the router's own and versioned: name each once")
        old = self.table.models
        self.table = table
        # an analysis' weights hold while its canary and steps stay as they were; a new spec starts afresh
        self.overrides = {m: w for m, w in self.overrides.items()
                          if m in table.models and old.get(m) is not None
                          and table.models[m].analysis == old[m].analysis and table.models[m].analysis}
        self._rebuild()

    def override(self, model: str, weights: dict[str, float]) -> None:
        """Weights decided by the canary analysis (app -> weight), kept until the table's analysis changes."""
        if model in self.table.models:
            self.overrides[model] = dict(weights)
            self._rebuild()

    def weights(self, model: str) -> dict[str, float]:
        vm = self.table.models[model]
        return {**vm.versions, **self.overrides.get(model, {})}

    def _rebuild(self) -> None:
        routes = dict(self.fixed)
        for model, vm in self.table.models.items():
            targets = tuple(Target(model, w, app) for app, w in self.weights(model).items())
            shadows = (Target(model, vm.shadow.fraction, vm.shadow.app),) if vm.shadow is not None else ()
            for t in (*targets, *shadows):
                if t.key not in self.handles:
                    self.handles[t.key] = self.connect(model, t.app or "")
            routes[model] = ModelRoute(model, vm.kind, targets, shadows, context_len=self._context_len(targets))
        self.resolver = Resolver(routes.values())
        # A version application that left the table may come back later as a new application of the same
        # name: a handle to the deleted one would stay broken, so forget it (requests holding it finish).
        keep = {t.key for r in routes.values() for t in (*r.targets, *r.shadows)}
        for key in [k for k in self.handles if k not in keep]:
            del self.handles[key]
            self.ready.pop(key, None)
            self.info.pop(key, None)

    def _context_len(self, targets: tuple[Target, ...]) -> int | None:
        known = [self.info[t.key].get("max_model_len") for t in targets if t.key in self.info]
        return max((n for n in known if isinstance(n, int)), default=None)

    # ---- one request --------------------------------------------------------------------------------------
    def choose(self, model: str, kind: Kind, key: str | None = None, principal: Any = None) -> Target:
        route = self.resolver.route(model, kind, principal)
        if model not in self.table.models:
            return choose(route.targets, key)
        live = tuple(t for t in route.targets if t.weight > 0 and self.ready.get(t.key))
        if live:
            if self.last.get(model) != live:
                self.last[model] = live
            return choose(live, key)
        present = {t.app for t in route.targets}
        held = tuple(t for t in self.last.get(model, ()) if t.app in present and self.ready.get(t.key))
        return choose(held or route.targets, key)

    def caller(self, model: str, user: str | None, headers: Mapping[str, str] | None) -> str | None:
        """The stickiness key of a request: its ``user``, else (a versioned model) its session header."""
        vm = self.table.models.get(model)
        if user or not headers or vm is None:
            return user
        return headers.get(vm.session_header)

    def versioned(self, model: str) -> VersionedModel | None:
        return self.table.models.get(model)

    def version_of(self, target: Target) -> str:
        """The registry version a target serves (its application's name for a plain folder)."""
        info = self.info.get(target.key) or {}
        return str(info.get("version") or target.app or "")

    # ---- readiness ----------------------------------------------------------------------------------------
    def mark_ready(self, key: str, info: dict[str, Any] | None) -> None:
        """A probe's answer (None: it failed or timed out)."""
        was = self.ready.get(key)
        self.ready[key] = info is not None and bool(info.get("ready", True))
        if info is not None:
            self.info[key] = info
        if was is not None and was != self.ready[key]:
            logger.info("version target %s is %s", key, "ready" if self.ready[key] else "not ready")
        if self.ready[key] and not was:
            self._rebuild()  # its max_model_len may be new

    def versioned_targets(self) -> list[Target]:
        return [t for m in self.table.models for t in (*self.resolver.routes[m].targets,
                                                        *self.resolver.routes[m].shadows)]

    async def probe(self, timeout_s: float, ready_every: int = 1) -> None:
        """Ask every versioned target whether its replicas are ready (concurrently, each bounded); one that
        is ready only every ``ready_every``-th call (a failing call to it is seen anyway)."""
        self._probes += 1

        async def one(t: Target) -> None:
            try:
                info = await asyncio.wait_for(self.handles[t.key].info.remote(), timeout=timeout_s)
            except TimeoutError:  # starting (or stuck): not ready
                info = None
            except Exception:  # not deployed yet, or gone: a fresh handle finds the application if it returns
                info = None
                self.handles[t.key] = self.connect(t.deployment, t.app or "")
            self.mark_ready(t.key, info if isinstance(info, dict) else None)

        due = [t for t in self.versioned_targets() if not self.ready.get(t.key) or self._probes % ready_every == 0]
        await asyncio.gather(*(one(t) for t in due))

    # ---- what /v1/models and the deploy tool see -----------------------------------------------------------
    def describe(self, model: str) -> list[dict[str, Any]]:
        """A versioned model's versions: application, weight, readiness, registry version and digest."""
        route = self.resolver.routes[model]
        out = []
        for role, targets in (("live", route.targets), ("shadow", route.shadows)):
            for t in targets:
                info = self.info.get(t.key) or {}
                out.append({"app": t.app, "role": role, "weight": t.weight, "ready": bool(self.ready.get(t.key)),
                            "version": self.version_of(t), "sha256": info.get("sha256") or None})
        return out

    def listing(self, model: str) -> dict[str, Any]:
        """A versioned model's part of its one ``/v1/models`` entry: its heaviest version, and every live one."""
        if model not in self.table.models:
            return {}
        live = [{k: v[k] for k in ("version", "sha256", "weight")} for v in self.describe(model) if v["role"] == "live"]
        heaviest = max(live, key=lambda v: v["weight"])
        return {"version": heaviest["version"], "sha256": heaviest["sha256"], "versions": live}
