"""The gateway's plain settings (what ``cluster.app`` hands every process that answers HTTP) and the one
place that turns them into the pipeline's stages, so the router and the direct path gate alike.

Example:
    >>> g = GatewaySettings()
    >>> g.auth_on, type(g.authenticator()).__name__, g.rate_limiter() is None
    (False, 'NoneType', True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from deployments.gateway.auth import PUBLIC_ROUTES, KeyAuthenticator
from deployments.gateway.http_policy import CorsPolicy, HostPolicy, HttpPolicy
from deployments.gateway.limits_state import ActorState
from deployments.gateway.ratelimit import LeaseLimiter

MetricsAccess = Literal["public", "keys", "local"]


@dataclass(frozen=True)
class GatewaySettings:
    """``keys_file`` set: every route but ``/health`` needs a valid key. ``metrics``: who may read
    ``/metrics`` with auth on: ``keys`` (any valid key), ``public``, or ``local`` (only the metrics hub's own
    listener at ``metrics_listen``; the ingress answers 404)."""

    keys_file: str | None = None
    reload_s: float = 1.0
    metrics: MetricsAccess = "keys"
    metrics_listen: str = "127.0.0.1:9464"
    lease_fraction: float = 0.05
    lease_ttl_s: float = 2.0
    usage_file: str | None = None
    cors: CorsPolicy = field(default_factory=CorsPolicy)
    hosts: HostPolicy = field(default_factory=HostPolicy)

    @property
    def auth_on(self) -> bool:
        return self.keys_file is not None

    def public_routes(self) -> frozenset[str]:
        return PUBLIC_ROUTES | ({"/metrics"} if self.metrics == "public" else set())

    def authenticator(self) -> KeyAuthenticator | None:
        if self.keys_file is None:
            return None
        return KeyAuthenticator(self.keys_file, self.reload_s, self.public_routes())

    def rate_limiter(self, context_len: Callable[[str], int | None] = lambda m: None) -> LeaseLimiter | None:
        """Limits come with keys (a key's rpm/tpm/quota): no keys, no limiter."""
        if self.keys_file is None:
            return None
        return LeaseLimiter(ActorState(self.usage_file), self.lease_fraction, self.lease_ttl_s, context_len)

    def http_policy(self) -> HttpPolicy:
        return HttpPolicy(self.cors, self.hosts)
