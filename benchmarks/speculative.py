"""Speculative decoding speedup on the shipped draft/target pair, against the expected tokens per target pass.

    .venv/bin/python benchmarks/speculative.py                   # native colocated, vLLM, native separate
    .venv/bin/python benchmarks/speculative.py --engines native,native-cdraft,native-compiled  # compile modes
    .venv/bin/python benchmarks/speculative.py --engines native --quick

Speedup = output tokens/s with speculation / without, for batch 1 and 8 and k in {2, 4, 6}, greedy,
code prompts (batch 1: each of the 8 prompts alone, in turn; batch 8: all 8 together). Measured acceptance
a gives the expected tokens per target pass E = (1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023, eq. 1);
the speedup falls short of E by the draft's cost (k draft passes per step).
Each engine variant runs in its own subprocess (clean memory and threads), all from one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "models" / "tiny-code-llama"
DRAFT = REPO / "models" / "tiny-code-llama-draft"
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main():", "class Stack:\n    def __init__(self):",
           "def parse_args(argv):\n    parser = argparse.ArgumentParser(", "for i in range(10):",
           "def read_file(path):\n    with open(path) as f:", "try:\n    import json\nexcept ImportError:",
           "def quicksort(items):"]


def expected_tokens(a: float, k: int) -> float:
    return k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def _groups(batch: int) -> list[list[str]]:
    """What one repetition generates: batch 1 runs every prompt alone, one after another (a single prompt
    would measure one continuation's acceptance); batch b runs the first b prompts together."""
    return [[p] for p in PROMPTS] if batch == 1 else [_prompts(batch)]


def _prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def run_native(k: int, batch: int, new_tokens: int, reps: int, compile_target: bool = False,
               compile_draft: bool = False) -> dict[str, Any]:
    from parallel import LLM, SamplingParams

    options: dict[str, Any] = {"dtype": "float32", "max_num_seqs": max(batch, 1), "compile": compile_target}
    if k:
        options.update(draft_path=str(DRAFT), num_speculative_tokens=k, compile_draft=compile_draft)
    llm = LLM(str(TARGET), **options)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for _ in range(2 if compile_target or compile_draft else 1):  # warm-up repetitions: every graph compiled
        for group in _groups(batch):
            llm.generate(group, params)
    walls = []
    for _ in range(reps):
        start = time.perf_counter()
        for group in _groups(batch):
            llm.generate(group, params)
        walls.append(time.perf_counter() - start)
    stats = llm.engine.stats()
    return {"tok_s": sum(map(len, _groups(batch))) * new_tokens / sorted(walls)[len(walls) // 2],
            "acceptance": stats.spec_acceptance_rate, "tokens_per_step": stats.spec_mean_tokens_per_step}


def run_vllm(k: int, batch: int, new_tokens: int, reps: int) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="mf-vc-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    options: dict[str, Any] = {"dtype": "float32", "max_num_seqs": max(batch, 1), "kv_cache_memory_bytes": 1 << 30,
                               "disable_log_stats": False}
    if k:
        options["speculative_config"] = {"method": "draft_model", "model": str(DRAFT), "num_speculative_tokens": k}
    llm = LLM(str(TARGET), **options)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(_prompts(batch), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    walls = []
    for _ in range(reps):
        start = time.perf_counter()
        for group in _groups(batch):
            llm.generate(group, params, use_tqdm=False)
        walls.append(time.perf_counter() - start)
    acceptance = float("nan")
    if k:
        metrics = {m.name: m for m in llm.get_metrics()}
        drafts = metrics.get("vllm:spec_decode_num_draft_tokens")
        accepted = metrics.get("vllm:spec_decode_num_accepted_tokens")
        if drafts is not None and accepted is not None and drafts.value:
            acceptance = accepted.value / drafts.value
    return {"tok_s": sum(map(len, _groups(batch))) * new_tokens / sorted(walls)[len(walls) // 2],
            "acceptance": acceptance}


def run_separate(k: int, batch: int, new_tokens: int, reps: int) -> dict[str, Any]:
    """Through Serve: the target replica calls a DraftServer deployment once per step (k=0: plain replica)."""
    import ray
    from ray import serve

    from cluster.app import build

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="mf-sb-", dir="/tmp"),
             log_to_driver=False)
    spec = {"speculative": {"draft": str(DRAFT), "num_speculative_tokens": k, "placement": "separate"}} if k else {}
    serve.run(build({"models": [{"name": "m", "source": str(TARGET), "resources": {"num_cpus": 1},
                                 # in-thread engine for both rows: a remote draft needs the replica's Ray context
                                 "engine_options": {"dtype": "float32", "max_num_seqs": max(batch, 1),
                                                    "engine_process": False}, **spec}]}),
              name="bench", route_prefix="/")
    handle = serve.get_deployment_handle("m", app_name="bench")
    groups = [[{"prompt": p, "sampling": {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}
               for p in group] for group in _groups(batch)]
    for r in groups[0]:
        handle.generate.remote({**r, "sampling": {**r["sampling"], "max_tokens": 8}}).result()
    walls = []
    for _ in range(reps):
        start = time.perf_counter()
        for group in groups:
            [x.result() for x in [handle.generate.remote(r) for r in group]]
        walls.append(time.perf_counter() - start)
    stats = handle.stats.remote().result()
    serve.shutdown()
    ray.shutdown()
    return {"tok_s": sum(map(len, groups)) * new_tokens / sorted(walls)[len(walls) // 2],
            "acceptance": stats["spec_acceptance_rate"], "tokens_per_step": stats["spec_mean_tokens_per_step"],
            "draft_call_ms": stats.get("draft_call_ms", 0.0)}


WORKERS = {
    "native": run_native,  # eager target, eager draft
    # eager target, draft's k-step proposal loop compiled (baseline: the same eager target)
    "native-cdraft": lambda *a: run_native(*a, compile_draft=True),
    # compiled target steps and compiled draft (baseline: the compiled target alone)
    "native-compiled": lambda *a: run_native(*a, compile_target=True, compile_draft=True),
    "vllm": run_vllm,
    "separate": run_separate,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="native,vllm,separate")
    ap.add_argument("--ks", default="2,4,6")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        engine, k, batch = args.worker.split(":")
        print(json.dumps(WORKERS[engine](int(k), int(batch), args.new_tokens, args.reps)))
        return
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        ks, batches, args.new_tokens, args.reps = [2], [1], 16, 1
    rows = []
    for engine in args.engines.split(","):
        for batch in batches:
            results = {}
            for k in [0, *ks]:
                out = subprocess.run([sys.executable, __file__, "--worker", f"{engine}:{k}:{batch}",
                                      "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)],
                                     capture_output=True, text=True, cwd=REPO, timeout=1800)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode or not lines:
                    print(f"{engine} k={k} batch={batch} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                results[k] = json.loads(lines[-1])
                if k:
                    r, a = results[k], results[k]["acceptance"]
                    base = results.get(0, {}).get("tok_s", float("nan"))
                    rows.append({"engine": engine, "batch": batch, "k": k, **r, "base_tok_s": base,
                                 "speedup": r["tok_s"] / base, "E": expected_tokens(a, k)})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; greedy, {args.new_tokens} new tokens")
    print("| engine | batch | k | acceptance a | E=(1-a^(k+1))/(1-a) | tok/s plain | tok/s spec | speedup | "
          "draft call ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['batch']} | {r['k']} | {r['acceptance']:.3f} | {r['E']:.2f} | "
              f"{r['base_tok_s']:.1f} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r.get('draft_call_ms', 0):.1f} |")
    Path(REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "speculative.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
