"""The LLM autoscaling policy: a pure function of Serve's ``AutoscalingContext`` (Serve's custom autoscaling API).

Serve calls :func:`decide` by import path (``AutoscalingConfig.policy.policy_function``, see
``ray/serve/config.py`` ``AutoscalingPolicy``), once per controller tick, as ``decide(ctx)`` and
expects ``(num_replicas, policy_state)``; the state it returns comes back as ``ctx.policy_state``
on the next tick. Build the deployment's ``autoscaling_config`` with :func:`serve_autoscaling_config`.

Inputs (``ctx``): ``aggregated_metrics[name][replica_id]`` — each replica's
``record_autoscaling_stats()`` numbers (:func:`parallel.gpu.engine_load_metrics`: ``waiting``,
``running``, ``kv_usage`` and, where NVML works, ``gpu_utilization``/``gpu_memory_used_fraction``)
averaged by Serve over ``look_back_period_s``; ``total_queued_requests`` (requests queued at
handles, not yet in a replica); ``total_num_requests`` (Serve's own ongoing count);
``current_num_replicas`` (running), ``target_num_replicas`` (the standing decision),
``current_time``, ``capacity_adjusted_min/max_replicas`` and ``policy_state``.

Combination rule, with ``n`` = running replicas:

* queue depth: ``observed`` = max(Σ over replicas of waiting + running, plus requests queued at handles;
  Serve's ``total_num_requests``) / n → ``ceil(n × observed / target_queue_depth)``, i.e. total demand /
  target. The replicas' numbers arrive averaged and late (push interval, look-back window), Serve's handle
  count sooner: the max reacts to a burst as fast as Serve's default and still sees engine-side queues.
  A replica that has not reported yet (just started) counts as empty; with no reports at all,
  Serve's ``total_num_requests`` stands in.
* KV usage: ``ceil(n × mean kv_usage / kv_usage_high_water)``, which is at least ``n + 1`` whenever
  the mean is above the high-water mark (and holds replicas that KV pressure still needs).
* GPU utilisation, only when ``target_gpu_utilization`` is set *and* replicas report it:
  ``ceil(n × mean gpu_utilization / target_gpu_utilization)``. An absent GPU signal changes nothing.
* desired = the max over the available signals (the largest names the driver in the log line).
* zero replicas running: requests waiting (``total_num_requests`` > 0) with a target of 0 →
  ``max(1, ceil(requests / target_queue_depth))`` at once, no delay (Serve's own cold-start path
  does the same before it even calls the policy); replicas still starting → hold.
* clamp to ``[min_replicas, max_replicas]``, then to Serve's capacity-adjusted bounds.
* hysteresis against ``target_num_replicas``: scale up only once desired has stayed above it for
  ``upscale_delay_s``, down only once below it for ``downscale_delay_s``; a tick at or across the
  standing value restarts both timers (so alternating noise never acts). Timers live in the returned
  state (keys ``modelfleet_up_since`` / ``modelfleet_down_since``), so the function is pure given
  ``(ctx, state)``. Like Serve, a scale to zero passes through 1 (``3 -> 1`` then ``1 -> 0`` on the
  next tick, on the same timer).
* downscale steps: at most ``downscale_max_step`` replicas (default 1; 0 = no limit) go per decision, and
  each further step waits a whole ``downscale_delay_s`` again. A replica takes ~10 s to come back (actor,
  engine process, weights) and bursts come in trains: jumping 3 -> 1 after the first burst made the next
  burst pay two cold starts (benchmarks/autoscaling.py decision logs); Kubernetes' HPA rate-limits
  scale-down the same way (``behavior.scaleDown.policies``).

Every change is logged on the ``ray.serve`` logger with its driver, e.g.
``tiny-code-llama: 1 -> 2 (queue depth 9.5/replica > target 4)``. Serve calls :func:`serve_policy`, which
is :func:`decide` plus the export of each tick's desired replicas, signals and decisions to the metrics hub
(``modelfleet_autoscaler_*`` on ``/metrics``); :func:`decide` itself stays pure.

Serve wiring facts (Ray 2.60): Serve forwards ``policy_kwargs`` only to *class* policies, so
:func:`decide` reads its knobs from ``ctx.config.policy.policy_kwargs`` (the deployment's own
``AutoscalingConfig``). Serve wraps every custom policy with its own ``upscale_delay_s`` /
``downscale_delay_s`` (defaults 30 s / 600 s!) and scaling factors, then clamps to min/max:
:func:`serve_autoscaling_config` sets Serve's delays to 0 so these knobs are the only delays.
Serve pickles this module *by value* into the controller: :func:`decide` must only reach the
standard library and ray (the metric names below are plain strings, copied at pickle time).
Replicas build their stats with ``parallel.gpu.engine_load_metrics`` (re-exported here for
``cluster/``; ``deployments/`` must import it from ``parallel.gpu``: arrows point down).

>>> cfg = serve_autoscaling_config("tiny-code-llama", min_replicas=0, max_replicas=4)
>>> cfg["policy"]["policy_function"], cfg["initial_replicas"]
('cluster.autoscaling:serve_policy', 1)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from parallel.gpu import GPU_UTILIZATION, KV_USAGE, RUNNING, WAITING, engine_load_metrics

__all__ = ["POLICY_FUNCTION", "PolicyKnobs", "decide", "engine_load_metrics", "serve_autoscaling_config",
           "serve_policy"]

logger = logging.getLogger("ray.serve")

POLICY_FUNCTION = "cluster.autoscaling:serve_policy"
# deployments.metrics_hub's HUB_NAME / HUB_NAMESPACE, copied: this module is pickled into the controller by
# value and may import only the standard library and ray there (a unit test checks they are equal).
HUB = ("modelfleet-metrics-hub-v1", "modelfleet")
SIGNALS = "modelfleet_signals"
DESIRED = "modelfleet_desired"
DRIVER = "modelfleet_driver"
UP_SINCE = "modelfleet_up_since"
DOWN_SINCE = "modelfleet_down_since"
_EPS = 1e-9  # ceil(2.0000000001) must stay 2 when observed == target up to float noise


@dataclass(frozen=True)
class PolicyKnobs:
    """Per-model policy knobs: the JSON ``policy_kwargs`` of the deployment's autoscaling policy.

    >>> PolicyKnobs(model="m", min_replicas=0, max_replicas=3).to_kwargs()["max_replicas"]
    3
    """

    model: str = ""  # the name in log lines (default: the deployment name)
    target_queue_depth: float = 4.0  # (waiting + running) requests per replica
    target_gpu_utilization: float | None = None  # 0..1; None: the GPU signal is ignored
    kv_usage_high_water: float = 0.9  # mean KV-cache usage above which to add a replica
    min_replicas: int = 1  # 0: scale to zero when idle
    max_replicas: int = 1
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    downscale_max_step: int = 1  # replicas removed per downscale decision (0: no limit); each step waits the delay

    def __post_init__(self) -> None:
        problems = []
        if not self.target_queue_depth > 0:
            problems.append(f"target_queue_depth must be > 0, got {self.target_queue_depth}")
        if self.target_gpu_utilization is not None and not 0 < self.target_gpu_utilization <= 1:
            problems.append(f"target_gpu_utilization must be in (0, 1], got {self.target_gpu_utilization}")
        if not 0 < self.kv_usage_high_water <= 1:
            problems.append(f"kv_usage_high_water must be in (0, 1], got {self.kv_usage_high_water}")
        if self.min_replicas < 0 or self.max_replicas < 1 or self.max_replicas < self.min_replicas:
            problems.append(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                            f"got {self.min_replicas}..{self.max_replicas}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            problems.append("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.downscale_max_step < 0:
            problems.append(f"downscale_max_step must be >= 0, got {self.downscale_max_step}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> PolicyKnobs:
        """Knobs from ``policy_kwargs`` (unknown names raise); ``defaults`` fill what is missing."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown autoscaling policy_kwargs {unknown}; known: {sorted(known)}")
        return cls(**{**{k: v for k, v in (defaults or {}).items() if k in known}, **kwargs})

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def serve_autoscaling_config(model: str, *, min_replicas: int = 1, max_replicas: int = 1,
                             target_queue_depth: float = 4.0, target_gpu_utilization: float | None = None,
                             kv_usage_high_water: float = 0.9, upscale_delay_s: float = 10.0,
                             downscale_delay_s: float = 60.0, downscale_max_step: int = 1,
                             initial_replicas: int | None = None,
                             metrics_interval_s: float = 2.0, look_back_period_s: float = 10.0) -> dict[str, Any]:
    """The ``autoscaling_config`` dict for a deployment run by :func:`decide` (knobs validated here).

    ``initial_replicas`` defaults to ``max(1, min_replicas)``: a scale-to-zero model starts warm and
    goes to zero after ``downscale_delay_s`` idle. ``metrics_interval_s`` is how often replicas push
    (and record, with ``look_back_period_s / 5``) their stats; Serve averages over ``look_back_period_s``.
    (A 4 s window was measured too: no earlier first upscale and no fewer SLO misses on the benchmark trace;
    what the window changes there is drowned by replica start-up, see benchmarks/RESULTS.md.)
    Serve's own delays are 0: the policy's knobs are the delays. ``target_ongoing_requests`` only
    feeds Serve's gauge. Keyword names match ``cluster.config.AutoscalingSpec``, so
    ``serve_autoscaling_config(name, **spec.model_dump())`` works.
    """
    knobs = PolicyKnobs(model=model, target_queue_depth=target_queue_depth,
                        target_gpu_utilization=target_gpu_utilization, kv_usage_high_water=kv_usage_high_water,
                        min_replicas=min_replicas, max_replicas=max_replicas, upscale_delay_s=upscale_delay_s,
                        downscale_delay_s=downscale_delay_s, downscale_max_step=downscale_max_step)
    if initial_replicas is None:
        initial_replicas = min(max(1, min_replicas), max_replicas)
    if not min_replicas <= initial_replicas <= max_replicas:
        raise ValueError(f"initial_replicas {initial_replicas} outside {min_replicas}..{max_replicas}")
    if not 0 < metrics_interval_s < look_back_period_s:
        raise ValueError(f"need 0 < metrics_interval_s ({metrics_interval_s}) < look_back_period_s "
                         f"({look_back_period_s})")
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "target_ongoing_requests": target_queue_depth,
        "metrics_interval_s": metrics_interval_s,
        "look_back_period_s": look_back_period_s,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": POLICY_FUNCTION, "policy_kwargs": knobs.to_kwargs()},
    }


# ---- the policy ----------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class _Signal:
    desired: int
    what: str  # e.g. "queue depth 9.5/replica"
    bound: str = ""  # e.g. "target 4"; empty for reasons that carry no comparison
    name: str = ""  # queue_depth, kv_usage, gpu_utilization (the metric's signal label); "" for no signal
    value: float = 0.0

    def describe(self, up: bool) -> str:
        if not self.bound:
            return self.what
        return f"{self.what} {'>' if up else '<'} {self.bound}"


def _mean(values: Mapping[Any, float] | None) -> float | None:
    if not values:
        return None
    return sum(float(v) for v in values.values()) / len(values)


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPS))


def _signals(ctx: Any, knobs: PolicyKnobs) -> list[_Signal]:
    """Each available signal's desired replica count, strongest reason first among equals."""
    n = int(ctx.current_num_replicas)
    metrics = ctx.aggregated_metrics or {}
    if n == 0:
        demand = float(ctx.total_num_requests or 0.0)
        if demand > 0 and ctx.target_num_replicas == 0:
            return [_Signal(max(1, _ceil(demand / knobs.target_queue_depth)),
                            f"{_fmt(demand)} requests waiting with 0 replicas")]
        starting = int(ctx.target_num_replicas)
        return [_Signal(starting, "replicas still starting" if starting else "no requests")]

    waiting, running = metrics.get(WAITING) or {}, metrics.get(RUNNING) or {}
    reporters = set(waiting) | set(running)
    serve_count = float(ctx.total_num_requests or 0.0)  # ongoing + queued, as the handles count them
    if reporters:
        engine = sum(float(waiting.get(r, 0.0)) + float(running.get(r, 0.0)) for r in reporters)
        # The engines' own queues see what Serve cannot (requests admitted but waiting for KV or a batch
        # slot), but they arrive averaged over the look-back window after a push interval; Serve's handle
        # count is fresher at the start of a burst. Demand = the larger: never slower than Serve's default.
        depth = max(engine + float(ctx.total_queued_requests or 0.0), serve_count) / n  # unreported: empty
    else:  # no replica has reported yet: Serve's own count of ongoing + queued requests
        depth = serve_count / n
    out = [_Signal(_ceil(n * depth / knobs.target_queue_depth), f"queue depth {_fmt(depth)}/replica",
                   f"target {_fmt(knobs.target_queue_depth)}", "queue_depth", depth)]

    kv = _mean(metrics.get(KV_USAGE))
    if kv is not None:
        desired = _ceil(n * kv / knobs.kv_usage_high_water)
        if kv > knobs.kv_usage_high_water:
            desired = max(desired, n + 1)
        out.append(_Signal(desired, f"kv usage {_fmt(kv)}", f"high-water {_fmt(knobs.kv_usage_high_water)}",
                           "kv_usage", kv))

    gpu = _mean(metrics.get(GPU_UTILIZATION))
    if gpu is not None and knobs.target_gpu_utilization is not None:
        out.append(_Signal(_ceil(n * gpu / knobs.target_gpu_utilization), f"gpu utilization {_fmt(gpu)}",
                           f"target {_fmt(knobs.target_gpu_utilization)}", "gpu_utilization", gpu))
    return out


def _knobs_from(ctx: Any) -> PolicyKnobs:
    config = ctx.config
    policy = getattr(config, "policy", None)
    kwargs = dict(getattr(policy, "policy_kwargs", None) or {})
    defaults = {"model": ctx.deployment_name}
    for name in ("min_replicas", "max_replicas"):
        if getattr(config, name, None) is not None:
            defaults[name] = getattr(config, name)
    return PolicyKnobs.from_kwargs(kwargs, defaults)


def decide(ctx: Any, knobs: PolicyKnobs | None = None) -> tuple[int, dict[str, Any]]:
    """Serve's custom autoscaling policy: ``(replicas, policy_state)`` from an ``AutoscalingContext``.

    ``knobs`` default to ``ctx.config.policy.policy_kwargs`` (how Serve's config reaches a plain
    function policy). Pure: the result depends only on ``ctx`` (its ``current_time`` and
    ``policy_state`` included); the returned state carries ``ctx.policy_state``'s other keys along.

    >>> from types import SimpleNamespace as NS
    >>> ctx = NS(current_num_replicas=1, target_num_replicas=1, total_num_requests=9.0, total_queued_requests=0.0,
    ...          aggregated_metrics={"waiting": {"r1": 5.0}, "running": {"r1": 4.0}}, capacity_adjusted_min_replicas=0,
    ...          capacity_adjusted_max_replicas=4, policy_state={}, current_time=100.0, deployment_name="m")
    >>> decide(ctx, PolicyKnobs(model="m", max_replicas=4, upscale_delay_s=0))[0]
    3
    """
    if knobs is None:
        knobs = _knobs_from(ctx)
    name = knobs.model or ctx.deployment_name
    now = float(ctx.current_time) if ctx.current_time is not None else time.time()
    state = dict(ctx.policy_state or {})
    baseline = int(ctx.target_num_replicas)

    signals = _signals(ctx, knobs)
    driver = max(signals, key=lambda s: s.desired)  # first of the largest: queue, then kv, then gpu
    desired, reason = driver.desired, driver.describe(driver.desired > baseline)
    lo, hi = knobs.min_replicas, knobs.max_replicas
    cap_lo, cap_hi = int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas)
    for bound_lo, bound_hi, label in ((lo, hi, ""), (cap_lo, cap_hi, "capacity-adjusted ")):
        if desired < bound_lo:
            desired, reason = bound_lo, f"{reason}; raised to {label}min_replicas {bound_lo}"
        elif desired > bound_hi:
            desired, reason = bound_hi, f"{reason}; capped at {label}max_replicas {bound_hi}"

    decision = baseline
    if desired > baseline and baseline == 0 and int(ctx.current_num_replicas) == 0:
        decision = desired  # scale from zero: requests are waiting on nothing, no delay
        state[UP_SINCE] = state[DOWN_SINCE] = None
    elif desired > baseline:
        since = state.get(UP_SINCE)
        since = now if since is None else float(since)
        state[DOWN_SINCE] = None
        if now - since + 1e-6 >= knobs.upscale_delay_s:
            decision, state[UP_SINCE] = desired, None
        else:
            state[UP_SINCE] = since
    elif desired < baseline:
        since = state.get(DOWN_SINCE)
        since = now if since is None else float(since)
        state[UP_SINCE] = None
        if now - since + 1e-6 >= knobs.downscale_delay_s:
            step = knobs.downscale_max_step
            if step and baseline - desired > step:  # one step now; the next waits a whole delay again
                decision, state[DOWN_SINCE] = baseline - step, now
                reason = f"{reason}; stepping down by {step}"
            elif desired == 0 and baseline > 1:  # Serve only goes to zero from one: 1 now, 0 next tick
                decision, state[DOWN_SINCE] = 1, since
            else:
                decision, state[DOWN_SINCE] = desired, None
        else:
            state[DOWN_SINCE] = since
    else:
        state[UP_SINCE] = state[DOWN_SINCE] = None

    if decision != baseline:
        logger.info("%s: %d -> %d (%s)", name, baseline, decision, reason)
    state[SIGNALS] = {s.name: s.value for s in signals if s.name}
    state[DESIRED] = desired
    state[DRIVER] = driver.name or ("cold_start" if decision != baseline else "")
    return decision, state


_LAST: dict[str, tuple] = {}  # per deployment: the last export (ticks come ~10 per second; most change nothing)
_HUB: list = [None, 0.0]  # the hub's handle (looked up once) and when to look again after a failed lookup


def serve_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """What Serve calls: :func:`decide`, then its tick exported to the metrics hub: fire and forget, at most
    once a second per deployment unless the decision changes, and a missing hub looked up again only every
    10 s (this runs in the controller's loop: no blocking lookup per tick)."""
    decision, state = decide(ctx)
    baseline = int(ctx.target_num_replicas)
    direction = "up" if decision > baseline else "down" if decision < baseline else None
    signals = {k: round(float(v), 3) for k, v in (state.get(SIGNALS) or {}).items()}
    now = time.monotonic()
    key, last = str(ctx.deployment_name), _LAST.get(str(ctx.deployment_name))
    if direction is None and last is not None and now - last < 1.0:
        return decision, state
    _LAST[key] = now
    try:
        import ray

        if _HUB[0] is None:
            if not ray.is_initialized() or now < _HUB[1]:
                return decision, state
            _HUB[1] = now + 10.0
            _HUB[0] = ray.get_actor(HUB[0], namespace=HUB[1])
        _HUB[0].autoscaling.remote(key, float(state.get(DESIRED, decision)), signals, direction,
                                   str(state.get(DRIVER) or "none"))
    except Exception:  # no hub yet (no replica has pushed) or it is gone: look again in 10 s
        _HUB[0] = None
    return decision, state
