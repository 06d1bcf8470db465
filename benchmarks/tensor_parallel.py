"""Tensor parallelism: TP=2 vs TP=1 decode throughput, and where a TP step's time goes (all-reduce share).

    .venv/bin/python benchmarks/tensor_parallel.py                 # ~100M random Llama, CPU, gloo
    .venv/bin/python benchmarks/tensor_parallel.py --device cuda   # NCCL, where GPUs exist
    .venv/bin/python benchmarks/tensor_parallel.py --quick

Each rank of TP=2 is a Ray actor with one thread (its CPU bundle); TP=1 runs in-process with one thread too
(same compute per core) and with every core. On a 2-core machine no speedup is expected: the point is the
collective cost. Per step, the all-reduce time (two per layer) is measured inside each rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_model(folder: Path, quick: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    size = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096) if quick else dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=32000)
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **size)).save_pretrained(folder)
    return folder


def run(path: Path, tp: int, batch: int, new_tokens: int, device: str, threads: int) -> dict[str, float]:
    from parallel import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", device=device, tensor_parallel_size=tp,
              cpus_per_worker=1.0, profile_collectives=tp > 1, max_num_seqs=max(batch, 1))
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(32)] for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    executor = llm.engine.executor
    if tp > 1:
        executor.collective_stats()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(prompts, params)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    result = {"tp": tp, "batch": batch, "threads_per_rank": threads if tp == 1 else 1,
              "tokens_per_s": batch * new_tokens / wall}
    if tp > 1:
        ranks = executor.collective_stats()
        steps = 3 * new_tokens
        result["allreduce_ms_per_step"] = 1e3 * statistics.mean(r["seconds"] for r in ranks) / steps
        result["rank_step_ms"] = 1e3 * statistics.mean(r["step_seconds"] for r in ranks) / steps
        result["engine_step_ms"] = 1e3 * wall / new_tokens
        result["allreduce_share"] = result["allreduce_ms_per_step"] / result["engine_step_ms"]
        result["allreduce_calls_per_step"] = ranks[0]["calls"] / steps
        result["allreduce_kib_per_call"] = ranks[0]["bytes"] / max(ranks[0]["calls"], 1) / 1024
    executor.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="mf-tpb-", dir="/tmp"),
             log_to_driver=False)
    path = make_model(Path("benchmarks/out") / ("tp-quick" if args.quick else "tp-100m"), args.quick)
    new = 8 if args.quick else args.new_tokens
    rows = []
    cores = os.cpu_count() or 1
    for batch in (int(b) for b in args.batches.split(",")):
        rows.append(run(path, 1, batch, new, args.device, 1))
        rows.append(run(path, 1, batch, new, args.device, cores))
        rows.append(run(path, 2, batch, new, args.device, 1))
    ray.shutdown()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}")
    print("| TP | batch | threads/rank | tok/s | engine step ms | rank step ms | all-reduce ms/step | share "
          "| calls/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['batch']} | {r['threads_per_rank']} | {r['tokens_per_s']:.1f} | "
              f"{r.get('engine_step_ms', float('nan')):.1f} | {r.get('rank_step_ms', float('nan')):.1f} | "
              f"{r.get('allreduce_ms_per_step', float('nan')):.2f} | {r.get('allreduce_share', float('nan')):.0%} | "
              f"{r.get('allreduce_calls_per_step', float('nan')):.0f} |")
    Path("benchmarks/out").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/out/tensor_parallel.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
