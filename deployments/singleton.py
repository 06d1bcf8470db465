"""The cluster's one actor of a kind (the metrics hub, the rate-limit state, the rollout keeper), behind one seam.

Detached (it outlives the application that made it, and every application shares it), found by name
(``get_if_exists``: whoever asks first creates it), restarted by Ray if its process dies (each such actor
starts again empty or from its own file), holding no CPU (it must never wait for one on a full machine).

Example (needs a Ray cluster):
    >>> hub = detached(MetricsHub, "modelfleet-metrics-hub-v1")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "modelfleet"
_REMOTE: dict[type, Any] = {}  # the remote class of each kind, made once per process


def detached(cls: type, name: str, *args: Any, namespace: str = NAMESPACE) -> Any:
    """A handle to the cluster's actor ``name`` of class ``cls``, created (with ``args``) if none exists."""
    import ray

    remote = _REMOTE.get(cls)
    if remote is None:
        remote = _REMOTE[cls] = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(cls)
    return remote.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True).remote(*args)
