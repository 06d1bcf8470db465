"""The plain values the cluster hands the router (config: ``router``), and a small helper of its streams.

Example:
    >>> RouterSettings().health_timeout_s
    5.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.gateway.settings import GatewaySettings
from deployments.ingress.generate import CallPolicy
from deployments.ingress.stages import Limits
from deployments.telemetry import Observability


@dataclass(frozen=True)
class RouterSettings:
    """Plain values the cluster hands the ingress (config: ``router``)."""

    limits: Limits = field(default_factory=Limits)
    call: CallPolicy = field(default_factory=CallPolicy)
    health_timeout_s: float = 5.0
    observability: Observability = field(default_factory=Observability)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)


def once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` that runs at most once however often it is called."""
    ran = False

    def call() -> None:
        nonlocal ran
        if not ran:
            ran = True
            fn()

    return call
