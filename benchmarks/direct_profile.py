"""Where a model replica's Python time goes on the direct path: py-spy samples of the replica process (not
Ray's other processes) under streaming load, summed by function (self and inclusive shares).

    .venv/bin/python benchmarks/direct_profile.py vllm      # or native

A private Ray (2 logical CPUs), the shipped model on ``router.mode: direct``, 16 warm-up streams, then
96 streams of 128 random prompt tokens / 128 output tokens, 16 in flight, while py-spy records the replica
at 200 Hz for 15 s (``--nonblocking``: the replica is not paused; idle threads are left out). The raw
collapsed stacks go to ``benchmarks/out/direct-profile-<engine>.txt``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(base: str, n: int, rng: random.Random) -> None:
    sem = asyncio.Semaphore(16)

    async def one(c: httpx.AsyncClient) -> None:
        async with sem:
            body = {"model": "m", "prompt": [rng.randrange(3, 4000) for _ in range(128)], "max_tokens": 128,
                    "ignore_eos": True, "temperature": 0, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as s:
                async for _ in s.aiter_lines():
                    pass

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=32)) as c:
        await asyncio.gather(*(one(c) for _ in range(n)))


def summarize(raw: Path, top: int = 25) -> str:
    own, incl, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    rows = [f"samples: {total}", "self:"] + [f"  {100 * v / total:5.1f}% {k}" for k, v in own.most_common(top)]
    return "\n".join(rows + ["inclusive:"] + [f"  {100 * v / total:5.1f}% {k}" for k, v in incl.most_common(2 * top)])


def main() -> None:
    import ray
    from ray import serve

    from cluster.app import build

    engine = sys.argv[1] if len(sys.argv) > 1 else "vllm"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="mf-prof-", dir="/tmp"),
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    front = free_port()
    options = {"dtype": "float32", "max_num_seqs": 32, "kv_cache_memory_bytes": 1 << 30, "max_num_batched_tokens": 2048}
    serve.run(build({"models": [{"name": "m", "source": str(ROOT / "models" / "tiny-code-llama"), "engine": engine,
                                 "engine_options": options, "resources": {"num_cpus": 1}}],
                     "router": {"mode": "direct", "direct_port": front, "num_cpus": 0.25}}),
              name="modelfleet", route_prefix="/")
    try:
        time.sleep(3)  # the replica's listener registered with the front
        pid = serve.get_deployment_handle("m", app_name="modelfleet").pids.remote().result()["replica"]
        rng, base = random.Random(0), f"http://127.0.0.1:{front}"
        asyncio.run(load(base, 16, rng))
        raw = ROOT / "benchmarks" / "out" / f"direct-profile-{engine}.txt"
        raw.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
                                "--duration", "15", "--rate", "200", "--format", "raw", "--output", str(raw),
                                "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        asyncio.run(load(base, 96, rng))
        print(f"load: 96 streams in {time.perf_counter() - t0:.1f} s")
        spy.wait()
        print(summarize(raw))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
