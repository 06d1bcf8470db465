"""Replay one bursty trace against our autoscaling policy and Serve's default one, same deployment.

    .venv/bin/python benchmarks/autoscaling.py            # ~6 minutes per policy
    .venv/bin/python benchmarks/autoscaling.py --quick
    .venv/bin/python benchmarks/autoscaling.py --ours-targets 4 --repeats 3   # alternating, with medians

Ours: cluster.autoscaling:decide on queue depth / KV usage (GPU utilisation where NVML exists). Serve's
default: target_ongoing_requests. Same bounds (1..3 replicas) and delays. Reported: requests whose TTFT
exceeds the SLO, TTFT p50/p99, and replica-seconds (the integral of running replicas over the run, sampled
every 0.5 s). The trace (fixed seed): idle, then bursts of Poisson arrivals with varied output lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
TARGET = str(REPO / "models" / "tiny-code-llama")


def trace(seed: int, quick: bool) -> list[tuple[float, int]]:
    """(arrival time s, max_tokens): bursts of Poisson arrivals separated by idle gaps."""
    rng = random.Random(seed)
    phases = [(10, 0.2), (30, 3.0), (30, 0.2), (30, 4.0), (40, 0.1)] if not quick else [(5, 0.5), (10, 3.0), (5, 0.2)]
    out, t0 = [], 0.0
    for length, rate in phases:
        t = t0
        while True:
            t += rng.expovariate(rate)
            if t >= t0 + length:
                break
            out.append((t, rng.randint(32, 160)))
        t0 += length
    return out


async def replay(base: str, events: list[tuple[float, int]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(at: float, max_tokens: int, start: float) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            ttft = None
            async with client.stream("POST", f"{base}/v1/completions", json={
                    "model": "m", "prompt": "def main():", "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True}) as r:
                async for line in r.aiter_lines():
                    if ttft is None and line.startswith("data: "):
                        ttft = time.perf_counter() - sent
                return {"status": r.status_code, "ttft": ttft, "e2e": time.perf_counter() - sent, "sent": sent}

        start = time.perf_counter()
        return await asyncio.gather(*(one(at, n, start) for at, n in events))


def run_policy(policy: str, events: list[tuple[float, int]], port: int, target: float = 4.0) -> dict[str, Any]:
    from ray import serve

    from cluster.app import build

    knobs = {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 3.0, "downscale_delay_s": 15.0}
    model = {"name": "m", "source": TARGET, "resources": {"num_cpus": 0.5},
             "engine_options": {"dtype": "float32", "max_num_seqs": 4}}
    model["autoscaling"] = {**knobs, "target_queue_depth": target} if policy.startswith("ours") else {
        **knobs, "policy": "serve-default", "target_ongoing_requests": 2.0}
    app = build({"name": "bench", "models": [model], "router": {"num_cpus": 0.1}})
    serve.run(app, name="bench", route_prefix="/")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            states = serve.status().applications["bench"].deployments["m"].replica_states
            samples.append((time.perf_counter(), sum(n for s, n in states.items() if str(s).endswith("RUNNING"))))
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    began = time.perf_counter()
    results = asyncio.run(replay(f"http://127.0.0.1:{port}", events))
    time.sleep(5)
    stop.set()
    poller.join()
    serve.delete("bench")
    replica_s = sum((b[0] - a[0]) * a[1] for a, b in itertools.pairwise(samples))
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    # when the running-replica count changed, in seconds from the first arrival slot (compare with the trace)
    timeline = [(round(b[0] - began, 1), b[1]) for a, b in itertools.pairwise(samples) if a[1] != b[1]]
    late = [(round(r["sent"] - began, 1), round(r["ttft"], 2)) for r in results
            if r["ttft"] is not None and r["ttft"] > 2.0]
    return {"policy": policy, "requests": len(results), "failed": sum(r["status"] != 200 for r in results),
            "timeline": timeline, "late": late,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[int(0.99 * (len(ttfts) - 1))],
            "ttfts": ttfts, "replica_seconds": replica_s, "max_replicas_seen": max(n for _, n in samples)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slo-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="replay the trace this many times per policy")
    ap.add_argument("--ours-targets", default="4,2",
                    help="target_queue_depth values for our policy (2 = Serve's default target_ongoing_requests)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="mf-ab-", dir="/tmp"),
             log_to_driver=False)
    port = 18000 + random.Random().randint(0, 999)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    events = trace(args.seed, args.quick)
    targets = [float(t) for t in args.ours_targets.split(",")]
    rows = []
    for rep in range(args.repeats):  # policies alternate, so drift in the host's speed hits them alike
        for t in targets:
            rows.append({**run_policy(f"ours (queue depth {t:g}/replica)", events, port, t), "run": rep + 1})
        rows.append({**run_policy("serve-default (target_ongoing_requests 2)", events, port), "run": rep + 1})
    serve.shutdown()
    ray.shutdown()
    print(f"trace: {len(events)} requests over {events[-1][0]:.0f} s (seed {args.seed}); TTFT SLO {args.slo_s} s; "
          f"{os.cpu_count()} cores")
    print("| run | policy | requests | failed | over SLO | TTFT p50 s | TTFT p99 s | replica-seconds | max replicas |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["over_slo"] = sum(t > args.slo_s for t in r["ttfts"])
        print(f"| {r['run']} | {r['policy']} | {r['requests']} | {r['failed']} | {r['over_slo']} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['replica_seconds']:.0f} | {r['max_replicas_seen']} |")
    if args.repeats > 1:
        print("\n| policy | median over SLO | median replica-seconds | runs |")
        print("|---|---|---|---|")
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = [r for r in rows if r["policy"] == policy]
            print(f"| {policy} | {statistics.median(r['over_slo'] for r in mine):g} | "
                  f"{statistics.median(r['replica_seconds'] for r in mine):.0f} | {len(mine)} |")
    for r in rows:
        print(f"{r['policy']}: running replicas (s -> n) {r['timeline']}")
        print(f"  requests over {args.slo_s} s TTFT (sent at s, TTFT): {r['late'][:60]}")
    (REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "autoscaling.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
