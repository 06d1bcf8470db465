"""The autoscaling policy on Ray's real AutoscalingContext: each signal, hysteresis, bounds, scale from zero, logs."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from cluster.autoscaling import (
    DOWN_SINCE,
    POLICY_FUNCTION,
    UP_SINCE,
    PolicyKnobs,
    decide,
    engine_load_metrics,
    serve_autoscaling_config,
)
from parallel.gpu import GpuReading

DEP = DeploymentID(name="LLMReplica-tiny", app_name="fleet")
KNOBS = PolicyKnobs(model="tiny-code-llama", target_queue_depth=4, target_gpu_utilization=0.7,
                    kv_usage_high_water=0.9, min_replicas=1, max_replicas=8, upscale_delay_s=10, downscale_delay_s=30)
NOW = PolicyKnobs(**{**KNOBS.to_kwargs(), "upscale_delay_s": 0, "downscale_delay_s": 0})


def rid(i: int) -> ReplicaID:
    return ReplicaID(unique_id=f"r{i}", deployment_id=DEP)


def make_ctx(n: int, *, target: int | None = None, waiting: list[float] | None = None,
             running: list[float] | None = None, kv: list[float] | None = None, gpu: list[float] | None = None,
             queued: float = 0.0, total: float | None = None, state: dict | None = None, now: float = 1000.0,
             config: AutoscalingConfig | None = None, cap: tuple[int, int] = (0, 100)) -> AutoscalingContext:
    """A real AutoscalingContext; per-replica metric lists are indexed by replica (r0, r1, ...)."""
    metrics: dict[str, dict[ReplicaID, float]] = {}
    for name, values in (("waiting", waiting), ("running", running), ("kv_usage", kv), ("gpu_utilization", gpu)):
        if values is not None:
            assert len(values) == n
            metrics[name] = {rid(i): float(v) for i, v in enumerate(values)}
    if total is None:
        total = sum(waiting or []) + sum(running or []) + queued
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=n,
        target_num_replicas=n if target is None else target, running_replicas=[rid(i) for i in range(n)],
        total_num_requests=total, total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=cap[0], capacity_adjusted_max_replicas=cap[1], policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


@pytest.fixture
def serve_log() -> Iterator[list[str]]:
    """Messages on the "ray.serve" logger (it does not propagate to the root, so caplog misses it)."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("ray.serve")
    handler, level = _Collect(level=logging.DEBUG), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)


def simulate(knobs: PolicyKnobs, start: int, load: Callable[[int, float], dict], ticks: int,
             period_s: float = 2.0) -> list[int]:
    """Run the policy tick by tick; Serve applies each decision at once. ``load(n, t)`` -> make_ctx kwargs."""
    n, state, decisions = start, {}, []
    for k in range(ticks):
        t = 1000.0 + k * period_s
        n, state = decide(make_ctx(n, state=state, now=t, **load(n, t)), knobs)
        decisions.append(n)
    return decisions


def spread(n: int, total: float, kv: float = 0.1) -> dict:
    """``total`` requests spread over ``n`` replicas, half waiting and half running in each engine."""
    depth = total / n if n else 0.0
    return {"waiting": [depth / 2] * n, "running": [depth / 2] * n, "kv": [kv] * n, "total": total}


# ---- each signal alone drives scale-up -----------------------------------------------------------------
def test_queue_depth_alone_scales_up(serve_log):
    ctx = make_ctx(2, waiting=[6, 5], running=[4, 4], kv=[0.1, 0.1])  # 9.5 per replica vs 4: ceil(2 * 9.5 / 4) = 5
    assert decide(ctx, NOW)[0] == 5
    assert serve_log == ["tiny-code-llama: 2 -> 5 (queue depth 9.5/replica > target 4)"]


def test_requests_queued_at_handles_count_as_depth():
    ctx = make_ctx(1, waiting=[0], running=[4], kv=[0.2], queued=4)  # 4 in the engine + 4 at handles
    assert decide(ctx, NOW)[0] == 2


def test_replica_yet_to_report_counts_as_empty():
    ctx = make_ctx(3, total=12)  # 12 requests on r0; r1 and r2 just started and have not reported
    ctx.aggregated_metrics.update({"waiting": {rid(0): 8.0}, "running": {rid(0): 4.0}, "kv_usage": {rid(0): 0.5}})
    assert decide(ctx, NOW)[0] == 3  # total demand 12 / target 4, not 3 x 12 / 4


def test_serve_request_count_stands_in_before_replicas_report():
    assert decide(make_ctx(2, total=24), NOW)[0] == 6  # 12 per replica, no custom metrics yet


def test_a_burst_serve_already_counts_is_not_missed_while_replica_stats_lag():
    # the replica's averaged stats still show the quiet before the burst; Serve's handles count 12 ongoing
    ctx = make_ctx(1, waiting=[0], running=[1], kv=[0.05], total=12)
    assert decide(ctx, NOW)[0] == 3  # 12 / target 4, not 1 / 4
    # and the engine's own queue still counts when it is the larger
    assert decide(make_ctx(1, waiting=[7], running=[4], kv=[0.3], total=4), NOW)[0] == 3


def test_kv_usage_alone_scales_up(serve_log):
    ctx = make_ctx(2, waiting=[0, 0], running=[2, 2], kv=[0.94, 0.96])  # queue alone says 1
    assert decide(ctx, NOW)[0] == 3
    assert serve_log == ["tiny-code-llama: 2 -> 3 (kv usage 0.95 > high-water 0.9)"]


@pytest.mark.parametrize("kv, expected", [(0.9 + 1e-12, 5), (0.9, 4), (0.7, 4)])  # a hair above high-water: +1
def test_kv_high_water_boundary(kv, expected):
    ctx = make_ctx(4, waiting=[0] * 4, running=[1] * 4, kv=[kv] * 4)
    assert decide(ctx, NOW)[0] == expected


def test_gpu_utilization_alone_scales_up(serve_log):
    ctx = make_ctx(2, waiting=[0, 0], running=[4, 4], kv=[0.5, 0.5], gpu=[0.96, 1.0])  # queue and kv say 2
    assert decide(ctx, NOW)[0] == 3  # ceil(2 * 0.98 / 0.7)
    assert serve_log == ["tiny-code-llama: 2 -> 3 (gpu utilization 0.98 > target 0.7)"]


def test_gpu_ignored_without_a_target():
    ctx = make_ctx(2, waiting=[0, 0], running=[4, 4], kv=[0.5, 0.5], gpu=[1.0, 1.0])
    assert decide(ctx, PolicyKnobs(**{**NOW.to_kwargs(), "target_gpu_utilization": None}))[0] == 2


@pytest.mark.parametrize("waiting, expected", [([2, 2], 3), ([0, 0], 2)])  # queue drives up / queue at target
def test_absent_gpu_signal_changes_nothing_vs_gpu_at_target(waiting, expected):
    common = dict(waiting=waiting, running=[4, 4], kv=[0.3, 0.3])
    absent = decide(make_ctx(2, **common), NOW)[0]
    at_target = decide(make_ctx(2, gpu=[0.7, 0.7], **common), NOW)[0]
    assert absent == at_target == expected


def test_largest_signal_wins_and_is_named(serve_log):
    ctx = make_ctx(2, waiting=[2, 2], running=[4, 4], kv=[0.95, 0.95], gpu=[0.99, 0.99])  # queue 3, kv 3, gpu 3
    assert decide(ctx, NOW)[0] == 3
    assert serve_log == ["tiny-code-llama: 2 -> 3 (queue depth 6/replica > target 4)"]  # ties: queue first


# ---- hysteresis and delays -----------------------------------------------------------------------------
def test_no_upscale_before_upscale_delay(serve_log):
    decisions = simulate(KNOBS, 2, lambda n, t: spread(n, 12), ticks=8)  # 6/replica: desired 3; delay 10 s, tick 2 s
    assert decisions == [2, 2, 2, 2, 2, 3, 3, 3]  # acts at t=10 exactly, then holds (4/replica at 3: at target)
    assert serve_log == ["tiny-code-llama: 2 -> 3 (queue depth 6/replica > target 4)"]


def test_no_downscale_before_downscale_delay(serve_log):
    decisions = simulate(KNOBS, 3, lambda n, t: spread(n, 0, kv=0.0), ticks=33)  # idle; delay 30 s, tick 2 s
    assert decisions == [3] * 15 + [2] * 15 + [1] * 3  # one replica per downscale delay: t=30, then t=60
    assert serve_log == [
        "tiny-code-llama: 3 -> 2 (queue depth 0/replica < target 4; raised to min_replicas 1; stepping down by 1)",
        "tiny-code-llama: 2 -> 1 (queue depth 0/replica < target 4; raised to min_replicas 1)"]


def test_unlimited_downscale_step_goes_straight_to_the_floor(serve_log):
    knobs = PolicyKnobs(**{**KNOBS.to_kwargs(), "downscale_max_step": 0})
    decisions = simulate(knobs, 3, lambda n, t: spread(n, 0, kv=0.0), ticks=18)
    assert decisions == [3] * 15 + [1, 1, 1]
    assert serve_log == ["tiny-code-llama: 3 -> 1 (queue depth 0/replica < target 4; raised to min_replicas 1)"]


def test_load_returning_between_steps_stops_the_downscale():
    busy = lambda n, t: spread(n, 0 if t < 1040 else 8, kv=0.0)  # noqa: E731  idle, then 8 requests from t=40
    assert simulate(KNOBS, 3, busy, ticks=40)[-1] == 2  # stepped 3 -> 2 at t=30; at 4/replica 2 is the target


def test_upscale_timer_is_kept_in_state():
    _, state = decide(make_ctx(2, **spread(2, 12), now=500.0), KNOBS)
    assert state[UP_SINCE] == 500.0 and state[DOWN_SINCE] is None
    n, state = decide(make_ctx(2, **spread(2, 12), now=509.0, state=state), KNOBS)
    assert n == 2
    n, state = decide(make_ctx(2, **spread(2, 12), now=510.0, state=state), KNOBS)
    assert n == 3 and state[UP_SINCE] is None


@pytest.mark.parametrize("low_total", [4.0, 8.0])  # 6/replica alternating with 2 (below target) or 4 (at target)
def test_noisy_load_around_target_does_not_flap(serve_log, low_total):
    decisions = simulate(KNOBS, 2, lambda n, t: spread(n, 12.0 if int(t) % 4 == 0 else low_total), ticks=100)
    assert decisions == [2] * 100
    assert serve_log == []


def test_other_policy_state_keys_are_carried():
    _, state = decide(make_ctx(2, **spread(2, 8), state={"__decision_counters": 0, "mine": 1}), KNOBS)
    assert state["__decision_counters"] == 0 and state["mine"] == 1


# ---- bounds --------------------------------------------------------------------------------------------
def test_max_replicas_caps_the_decision(serve_log):
    assert decide(make_ctx(2, **spread(2, 200)), NOW)[0] == 8
    assert serve_log == ["tiny-code-llama: 2 -> 8 (queue depth 100/replica > target 4; capped at max_replicas 8)"]


def test_capacity_adjusted_bounds_apply_too():
    assert decide(make_ctx(2, **spread(2, 200), cap=(0, 5)), NOW)[0] == 5


def test_min_replicas_holds_the_floor():
    knobs = PolicyKnobs(**{**NOW.to_kwargs(), "min_replicas": 2, "downscale_max_step": 0})
    assert decide(make_ctx(4, **spread(4, 0, kv=0.0)), knobs)[0] == 2
    assert decide(make_ctx(2, **spread(2, 0, kv=0.0)), knobs)[0] == 2


def test_min_zero_scales_to_zero_through_one(serve_log):
    knobs = PolicyKnobs(**{**KNOBS.to_kwargs(), "min_replicas": 0, "downscale_max_step": 0})
    decisions = simulate(knobs, 3, lambda n, t: spread(n, 0, kv=0.0), ticks=18)
    assert decisions == [3] * 15 + [1, 0, 0]  # Serve goes to zero only from one: the next tick, same timer
    assert serve_log == ["tiny-code-llama: 3 -> 1 (queue depth 0/replica < target 4)",
                         "tiny-code-llama: 1 -> 0 (queue depth 0/replica < target 4)"]
    serve_log.clear()
    stepped = simulate(PolicyKnobs(**{**knobs.to_kwargs(), "downscale_max_step": 1}), 3,
                       lambda n, t: spread(n, 0, kv=0.0), ticks=48)
    assert stepped == [3] * 15 + [2] * 15 + [1] * 15 + [0] * 3  # one step per delay, zero last


def test_busy_replica_is_not_scaled_to_zero():
    knobs = PolicyKnobs(**{**NOW.to_kwargs(), "min_replicas": 0})
    assert decide(make_ctx(1, waiting=[0], running=[1], kv=[0.01]), knobs)[0] == 1


# ---- scale from zero -----------------------------------------------------------------------------------
@pytest.mark.parametrize("requests, expected", [(3, 1), (9, 3), (0, 0)])
def test_scale_from_zero_when_requests_arrive(serve_log, requests, expected):
    knobs = PolicyKnobs(**{**KNOBS.to_kwargs(), "min_replicas": 0})  # upscale delay 10 s does not apply
    assert decide(make_ctx(0, total=requests, queued=requests), knobs)[0] == expected
    assert serve_log == ([f"tiny-code-llama: 0 -> {expected} ({requests} requests waiting with 0 replicas)"]
                         if expected else [])


def test_replicas_still_starting_are_held():
    assert decide(make_ctx(0, target=2, total=5), KNOBS)[0] == 2


# ---- wiring: knobs through ctx.config, the config dict, the metrics contract, pickling --------------------
def test_serve_autoscaling_config_shape():
    cfg = serve_autoscaling_config("tiny-code-llama", min_replicas=0, max_replicas=4, target_queue_depth=8,
                                   target_gpu_utilization=0.75, upscale_delay_s=5, downscale_delay_s=120)
    assert cfg == {
        "min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 8,
        "metrics_interval_s": 2.0, "look_back_period_s": 10.0, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "policy": {"policy_function": "cluster.autoscaling:serve_policy", "policy_kwargs": {
            "model": "tiny-code-llama", "target_queue_depth": 8, "target_gpu_utilization": 0.75,
            "kv_usage_high_water": 0.9, "min_replicas": 0, "max_replicas": 4, "upscale_delay_s": 5,
            "downscale_delay_s": 120, "downscale_max_step": 1}},
    }
    AutoscalingConfig(**cfg)  # Serve accepts it (and imports the policy)


def test_config_takes_the_cluster_autoscaling_spec():
    from cluster.config import AutoscalingSpec

    spec = AutoscalingSpec(min_replicas=0, max_replicas=3)
    cfg = serve_autoscaling_config("m", **spec.model_dump(exclude={"policy", "target_ongoing_requests"}))
    assert cfg["policy"]["policy_kwargs"]["max_replicas"] == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"target_queue_depth": 0}, "target_queue_depth"),
    ({"kv_usage_high_water": 1.5}, "kv_usage_high_water"),
    ({"target_gpu_utilization": 0}, "target_gpu_utilization"),
    ({"initial_replicas": 5, "max_replicas": 2}, "initial_replicas"),
    ({"metrics_interval_s": 10, "look_back_period_s": 5}, "look_back_period_s"),
])
def test_bad_knobs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        serve_autoscaling_config("m", **kwargs)


def test_unknown_policy_kwarg_is_rejected():
    with pytest.raises(ValueError, match="target_qeue_depth"):
        PolicyKnobs.from_kwargs({"target_qeue_depth": 3})


def test_decide_reads_knobs_from_ctx_config(serve_log):
    config = AutoscalingConfig(**serve_autoscaling_config("tiny-code-llama", max_replicas=3, upscale_delay_s=0))
    assert decide(make_ctx(1, **spread(1, 40), config=config))[0] == 3  # capped by the kwargs' max_replicas
    assert serve_log == ["tiny-code-llama: 1 -> 3 (queue depth 40/replica > target 4; capped at max_replicas 3)"]


def test_engine_stats_reach_the_policy_through_the_metrics_dict():
    from parallel.engine import EngineStats

    per_replica = [engine_load_metrics(EngineStats(num_waiting=w, num_running=8, kv_blocks_used=0, kv_blocks_total=1,
                                                   kv_usage=0.5, prefix_hit_rate=0.0, tokens_per_s=0.0,
                                                   num_preemptions=0), GpuReading(0.9, 0.5, 1))
                   for w in (4, 6)]
    assert per_replica[0] == {"waiting": 4.0, "running": 8.0, "kv_usage": 0.5, "gpu_utilization": 0.9,
                              "gpu_memory_used_fraction": 0.5}
    ctx = make_ctx(2, waiting=[m["waiting"] for m in per_replica], running=[m["running"] for m in per_replica],
                   kv=[m["kv_usage"] for m in per_replica], gpu=[m["gpu_utilization"] for m in per_replica])
    assert decide(ctx, NOW)[0] == 7  # depth 13/replica: ceil(2 * 13 / 4)


def test_pickled_policy_runs_without_parallel_or_torch(tmp_path):
    """Serve pickles this module by value into the controller: it must not need parallel/ (or torch) there."""
    blob = tmp_path / "policy.pkl"
    blob.write_bytes(AutoscalingPolicy(policy_function=POLICY_FUNCTION).get_serialized_policy_def())
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("parallel", "torch", "cluster"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from types import SimpleNamespace as NS
        from ray import cloudpickle
        decide = cloudpickle.loads(open({str(blob)!r}, "rb").read())
        policy = NS(policy_kwargs={{"model": "m", "max_replicas": 4, "upscale_delay_s": 0}})
        ctx = NS(current_num_replicas=1, target_num_replicas=1, total_num_requests=9.0, total_queued_requests=0.0,
                 aggregated_metrics={{"waiting": {{"r": 5.0}}, "running": {{"r": 4.0}}}}, policy_state={{}},
                 capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=4, current_time=1.0,
                 deployment_name="m", config=NS(policy=policy, min_replicas=1, max_replicas=4))
        print(decide(ctx)[0], sorted(m for m in sys.modules if m.split(".")[0] in ("parallel", "torch")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "3 []"


def test_stand_in_context_works_too():
    """Only these attributes are read: a SimpleNamespace with them is a valid context."""
    ctx = SimpleNamespace(current_num_replicas=2, target_num_replicas=2, total_num_requests=0.0,
                          total_queued_requests=0.0, aggregated_metrics={"waiting": {"a": 8.0, "b": 8.0}},
                          capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=10, policy_state={},
                          current_time=5.0, deployment_name="d", config=None)
    assert decide(ctx, NOW)[0] == 4
