"""What the gateway adds to one request, measured alone: the ingress pipeline's admission (headers, key check,
body parse, model check, rate-limit reservation) and its settlement, with the gateway off / keys only / keys
and limits, in one process on the real stages (``deployments/ingress/stages.py``, ``deployments/gateway``).
The leases' round trip to the cluster's state (one per ``lease_fraction`` of a limit) is timed against the
real Ray actor.

    .venv/bin/python benchmarks/gateway_cost.py            # ~30 s; prints a markdown table

The serving benchmark (``benchmarks/serving.py --targets mf-native-direct,mf-native-direct-gateway``) measures
the same end to end; on a 2-core machine its run-to-run spread is larger than this cost.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, markdown_table  # noqa: E402
from deployments.gateway import keys  # noqa: E402
from deployments.gateway.auth import KeyAuthenticator  # noqa: E402
from deployments.gateway.limits_state import ActorState, LocalState  # noqa: E402
from deployments.gateway.ratelimit import LeaseLimiter  # noqa: E402
from deployments.ingress.observe import RequestObserver  # noqa: E402
from deployments.ingress.stages import Incoming, Limits, Pipeline, body_chunks  # noqa: E402

BODY = json.dumps({"model": "m", "prompt": list(range(128)), "max_tokens": 128, "stream": True}).encode()


async def per_request_us(pipe: Pipeline, headers: dict[str, str], n: int) -> float:
    """Median µs of admit + settle over ``n`` requests (in batches, so the clock's cost is spread)."""
    obs = RequestObserver("bench")
    times = []
    for _ in range(n // 100):
        t0 = time.perf_counter()
        for _ in range(100):
            out = obs.begin("r", "/v1/completions")
            await pipe.admit(Incoming("POST", "/v1/completions", headers, body_chunks([BODY])), "r", out)
            out.prompt_tokens, out.completion_tokens = 128, 128
            if out.settle is not None:
                out.settle()
        times.append((time.perf_counter() - t0) / 100 * 1e6)
    return statistics.median(times)


async def actor_round_trip_ms(n: int) -> float:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="gateway-bench")
    try:
        state = ActorState()
        g = keys.Grant("k", ("*",), keys.Limits(rpm=10**9, tpm=10**12))
        lim = LeaseLimiter(state, lease_fraction=1e-9)  # a lease of 1: every request asks the actor
        await lim.reserve(g, "/v1/completions", {"model": "m", "prompt": "x"})  # creates the actor
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await lim.reserve(g, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1})
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    finally:
        ray.shutdown()


async def main() -> None:
    folder = Path(tempfile.mkdtemp())
    secret, rec = keys.new_key("bench", limits=keys.Limits(rpm=10**9, tpm=10**12))
    secret2, rec2 = keys.new_key("open")
    keys.save(folder / "keys.json", keys.KeyTable([rec, rec2]))
    base = {"content-type": "application/json", "content-length": str(len(BODY))}
    state = LocalState()
    cases = {
        "gateway off": (Pipeline(Limits()), base),
        "keys (no limits on the key)": (Pipeline(Limits(), KeyAuthenticator(str(folder / "keys.json"))),
                                        base | {"authorization": f"Bearer {secret2}"}),
        "keys + rpm/tpm (leases of 5%)": (Pipeline(Limits(), KeyAuthenticator(str(folder / "keys.json")),
                                                    LeaseLimiter(state)),
                                           base | {"authorization": f"Bearer {secret}"}),
    }
    rows, off = [], None
    for name, (pipe, headers) in cases.items():
        await per_request_us(pipe, headers, 2000)  # warm up
        us = await per_request_us(pipe, headers, 20000)
        off = us if off is None else off
        rows.append([name, f"{us:.1f}", f"{us - off:+.1f}"])
    rt = await actor_round_trip_ms(200)
    print(machine_info() if isinstance(machine_info(), str) else json.dumps(machine_info()))
    print(markdown_table(["pipeline", "admit + settle, µs per request (median)", "vs off"], rows))
    print(f"\nlease round trip to the Ray actor (a reservation that must ask): {rt:.2f} ms median; with 5% leases "
          f"a key's request asks once per lease (1 in 20 requests at the lease's own rate), the state's calls "
          f"here: {state.calls} for 22000 requests")


if __name__ == "__main__":
    asyncio.run(main())
