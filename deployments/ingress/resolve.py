"""Model resolution: the ``model`` field of a request -> the deployment that answers it.

A pure table, without Ray: the ingress holds handles by deployment name and asks ``Resolver.resolve`` which
one to call. A model's targets carry weights:
``split.choose`` picks one per request, sticky per caller (weighted rendezvous hashing); shadows are the
table's other column.

Example:
    >>> r = Resolver([ModelRoute("tiny", "llm", (Target("tiny"),))])
    >>> r.resolve("tiny", "llm").deployment
    'tiny'
    >>> r.resolve("tiny", "embedding")
    Traceback (most recent call last):
    ...
    deployments.messages.ServeError: model 'tiny' is a llm model; it does not serve embedding requests
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from deployments.ingress.split import choose
from deployments.messages import ErrorInfo, ServeError

Kind = Literal["llm", "embedding"]


@dataclass(frozen=True)
class Target:
    """A deployment that serves (one version of) a model: in the router's own application (``app`` None) or
    in a version application of its own (``versions.py``), where the deployment is named after the model."""

    deployment: str
    weight: float = 1.0
    app: str | None = None

    @property
    def key(self) -> str:
        """Unique among the router's targets (two versions share a deployment name, not an application)."""
        return f"{self.app}/{self.deployment}" if self.app else self.deployment


@dataclass(frozen=True)
class ModelRoute:
    model: str
    kind: Kind
    targets: tuple[Target, ...]
    shadows: tuple[Target, ...] = ()
    on_demand: bool = False  # may sit at zero replicas (health must not wake it)
    context_len: int | None = None  # the model's max_model_len, when known (rate limits reserve by it)
    version: str = ""  # the registry version served ("" for a plain folder source)
    sha256: str = ""  # that version's content digest


class Resolver:
    def __init__(self, routes: Iterable[ModelRoute]) -> None:
        self.routes = {r.model: r for r in routes}

    def route(self, model: str, kind: Kind, principal: Any = None) -> ModelRoute:
        """``principal``: the caller's key grant; a 404 then lists only the models that key may use."""
        route = self.routes.get(model)
        if route is None:
            may_use = getattr(principal, "may_use", lambda m: True)
            served = sorted(m for m, r in self.routes.items() if r.kind == kind and may_use(m))
            raise ServeError(ErrorInfo(404, f"model {model!r} not found; available: {', '.join(served) or 'none'}",
                                       type="invalid_request_error", param="model", code="model_not_found"))
        if route.kind != kind:
            raise ServeError(ErrorInfo(404, f"model {model!r} is a {route.kind} model; it does not serve {kind} "
                                       "requests", param="model", code="model_not_found"))
        return route

    def resolve(self, model: str, kind: Kind, key: str | None = None, principal: Any = None) -> Target:
        return choose(self.route(model, kind, principal).targets, key)

    def deployments(self) -> set[str]:
        return {t.key for r in self.routes.values() for t in (*r.targets, *r.shadows)}
