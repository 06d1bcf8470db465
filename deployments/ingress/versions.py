"""The router's version table: which Serve applications serve each version of a model, at what weight.

It is the router deployment's ``user_config``, so that a weight change is a *lightweight* Serve update
(``serve deploy`` calls ``Router.reconfigure``; no replica restarts, no request fails), while each version
runs in a Serve application of its own (``cluster.app:build_version``), so that bringing a version up or
removing it never rebuilds the others: Serve gives every deployment of an application one code version,
derived from the application's args, and restarts them all (stop first, then start) when it changes.

    deployments:
      - name: modelfleet-router
        user_config:
          models:
            tiny:
              versions: {tiny-v1: 90, tiny-v2: 10}      # Serve application -> weight
              shadow: {app: tiny-v3, fraction: 0.5}     # optional: mirror half of tiny's requests to tiny-v3
              analysis: {canary: tiny-v2, min_requests: 200, steps: [10, 25, 50, 100]}   # optional

Each version application's one deployment is named after the model (``tiny``); the router reaches it with
``serve.get_deployment_handle("tiny", app_name="tiny-v2")``.

Example:
    >>> t = VersionTable.model_validate({"models": {"tiny": {"versions": {"tiny-v1": 90, "tiny-v2": 10}}}})
    >>> t.models["tiny"].versions, t.models["tiny"].session_header
    ({'tiny-v1': 90.0, 'tiny-v2': 10.0}, 'x-session-id')
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

APP_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
HEADER = r"^[a-z0-9-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowSpec(_Strict):
    """Mirror a share of the model's requests to ``app``; only the primary answers the client."""

    app: str = Field(pattern=APP_NAME)
    fraction: float = Field(1.0, gt=0, le=1, description="share of requests mirrored")
    queue_size: int = Field(64, ge=1, le=4096, description="mirrored requests waiting; beyond, new copies are "
                            "dropped (counted)")
    concurrency: int = Field(4, ge=1, le=256, description="mirrored requests in flight to the shadow")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="a shadow answer slower than this counts as failed")


class AnalysisSpec(_Strict):
    """Automated canary analysis (``deployments.ingress.rollout.decide``) of ``canary`` against the primary
    (the other version with the highest weight). ``steps``: the canary's weights in percent, in order."""

    canary: str = Field(pattern=APP_NAME)
    interval_s: float = Field(5.0, gt=0, le=3600, description="how often the analysis looks")
    min_requests: int = Field(200, ge=1)
    max_wait_s: float = Field(600.0, gt=0)
    steps: tuple[float, ...] = Field((10.0, 25.0, 50.0, 100.0), min_length=1)
    max_error_rate_increase: float = Field(0.01, ge=0, le=1)
    error_z: float = Field(2.33, ge=0)
    max_ttft_p95_ratio: float = Field(1.25, gt=1)
    min_exact_match: float = Field(0.95, ge=0, le=1, description="with a shadow of the canary")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < w <= 100 for w in v) or list(v) != sorted(set(v)):
            raise ValueError("steps must be increasing percentages in (0, 100]")
        return v


class VersionedModel(_Strict):
    kind: Literal["llm", "embedding"] = "llm"
    versions: dict[str, float] = Field(min_length=1, max_length=16, description="Serve application -> weight")
    session_header: str = Field("x-session-id", pattern=HEADER, description="stickiness key when a request has "
                                "no user field")
    shadow: ShadowSpec | None = None
    analysis: AnalysisSpec | None = None

    @field_validator("versions")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for app, w in v.items():
            if not re.match(APP_NAME, app):
                raise ValueError(f"{app!r} is not a Serve application name")
            if not 0 <= w <= 1e6:
                raise ValueError(f"the weight of {app!r} must be in [0, 1e6], not {w}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one version needs a positive weight")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VersionedModel:
        canary = self.analysis.canary if self.analysis else None
        if self.shadow is not None and self.shadow.app in self.versions and self.shadow.app != canary:
            raise ValueError(f"the shadow {self.shadow.app!r} also takes live traffic: list it in versions or "
                             "shadow, not both (only an analysed canary may be both: it then gets copies of the "
                             "primary's requests, and its exact match counts in the analysis)")
        if self.shadow is not None and self.kind != "llm":
            raise ValueError("shadow traffic applies to llm models only")
        a = self.analysis
        if a is not None:
            if a.canary not in self.versions:
                raise ValueError(f"analysis.canary {a.canary!r} is not one of the versions")
            if len(self.versions) != 2:
                raise ValueError("canary analysis needs exactly two versions: the primary and the canary")
        return self


class VersionTable(_Strict):
    """The router's ``user_config``: ``models`` routed to version applications."""

    models: dict[str, VersionedModel] = Field(default_factory=dict, max_length=256)

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, VersionedModel]) -> dict[str, VersionedModel]:
        bad = [m for m in v if not re.match(APP_NAME, m)]
        if bad:
            raise ValueError(f"not model names: {bad}")
        return v
