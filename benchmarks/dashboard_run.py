"""A load run watched by a real Prometheus, drawn as the dashboard's main panels (the README's picture).

    .venv/bin/python benchmarks/dashboard_run.py --out benchmarks/dashboard.png

Starts ``serve run configs/default.yaml`` (front proxy 8000, Serve's proxy 8001: both must be free), a
Prometheus scraping ``:8001/metrics`` every second, then a load in phases (streams of 64 prompt tokens /
64 output tokens at 2, 8, 16 and 4 in flight, 30 s each), and renders the panels over the run with
``benchmarks/dashboard_png.py``. A measurement aid, not a benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import dashboard_png  # noqa: E402
from tests.prometheus_server import PrometheusServer, ensure_prometheus  # noqa: E402

MODEL = "tiny-code-llama"
VOCAB = 4096  # the shipped model's vocab_size
PHASES = ((2, 30.0), (8, 30.0), (16, 30.0), (4, 30.0))  # (in flight, seconds)


async def phase(client: httpx.AsyncClient, concurrency: int, seconds: float, rng: random.Random) -> int:
    end, done = time.monotonic() + seconds, 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            body = {"model": MODEL, "prompt": [rng.randrange(5, VOCAB) for _ in range(64)], "max_tokens": 64,
                    "temperature": 0.8, "stream": True, "ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_bytes():
                    pass
            if r.status_code != 200:
                raise RuntimeError(f"the load's request failed: {r.status_code}")
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def load() -> None:
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url="http://127.0.0.1:8000", timeout=120) as client:
        for concurrency, seconds in PHASES:
            n = await phase(client, concurrency, seconds, rng)
            print(f"  {concurrency} in flight for {seconds:.0f} s: {n} requests", flush=True)


def wait_up(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "dashboard.png")
    args = parser.parse_args()
    binary = ensure_prometheus()
    if binary is None:
        print("no prometheus binary (apt-get install prometheus)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="mf-dash-"))
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(tmp)}
    log = (tmp / "serve.log").open("w")
    serve = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "configs/default.yaml"], cwd=ROOT,
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_up("http://127.0.0.1:8001/health", 300)
        wait_up("http://127.0.0.1:8000/health", 60)
        with PrometheusServer(binary, ["127.0.0.1:8001"], metrics_path="/metrics", scrape_interval_s=1) as prom:
            prom.wait_for("vllm:num_requests_running", timeout_s=60)
            start = time.time()
            asyncio.run(load())
            time.sleep(5)
            end = time.time()
            code = dashboard_png.main(["--prometheus", prom.url, f"--start={start - 10:.0f}", f"--end={end:.0f}",
                                       "--out", str(args.out), "--scrape-interval", "1"])
            print(f"wrote {args.out} ({end - start:.0f} s of load)")
            return code
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
