"""Offline throughput of our engine against transformers ``generate()`` and vLLM's offline ``LLM`` (CPU build).

Same model, same random-token workload, float32 and greedy everywhere; every engine runs in its own
subprocess (clean memory and threads), after a warm-up, driven by one top-level invocation. Output tokens/s
is generated tokens / wall time of the whole workload. Also measured: our batch-1 decode speed on the
~100M model as a fraction of the memory-bandwidth bound (bandwidth measured in the same process).

Run from the repository root::

    .venv/bin/python benchmarks/engine.py --quick            # smoke test: tiny model and workloads (~2 min)
    .venv/bin/python benchmarks/engine.py                    # full run; writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/engine.py --models random-100m --workloads varied --engines ours,vllm

Models: ``tiny-code-llama`` (models/tiny-code-llama, skipped when absent), ``random-100m`` and ``random-tiny``
(created under benchmarks/out/models with a fixed seed). Engines: ours, hf, vllm. Raw JSON goes to
benchmarks/out/; ``--results`` names the markdown written (default benchmarks/RESULTS.md, or
benchmarks/out/RESULTS-quick.md with --quick). Only the file's "engine" section is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    OUT_DIR,
    QUICK_WORKLOADS,
    ROOT,
    WORKLOADS,
    PhaseTimer,
    Request,
    cpu_snapshot,
    machine_info,
    make_requests,
    measure_bandwidth,
    merge_results,
    model_facts,
    model_path,
    others_cores,
    profile_report,
    report,
    warmup_requests,
    write_section,
)

ENGINES = ("ours", "hf", "vllm")


# ---- workers (each runs in its own subprocess) --------------------------------------------------------------
def _timed(run: Any, requests: list[Request]) -> dict[str, Any]:
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    outputs = run(requests)
    wall = time.perf_counter() - t0
    others = others_cores(snap, wall)
    wanted = sum(r.max_tokens for r in requests)
    got = sum(min(len(o), r.max_tokens) for o, r in zip(outputs, requests, strict=True))
    if got != wanted:
        raise RuntimeError(f"generated {got} of the {wanted} wanted tokens (ignore_eos not honoured?)")
    return {"wall_s": wall, "output_tokens": wanted, "tok_s": wanted / wall, "outputs": outputs, "others": others}


def our_llm(path: Path, args: argparse.Namespace) -> Any:
    from parallel import LLM

    return LLM(str(path), dtype="float32", max_num_seqs=args.max_num_seqs, block_size=16, skip_tokenizer_init=True,
               max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.kv_cache_gib << 30)


def worker_ours(path: Path, requests: dict[str, list[Request]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from parallel import SamplingParams

    llm = our_llm(path, args)

    def run(reqs: list[Request]) -> list[list[int]]:
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True) for r in reqs]
        return [list(o.token_ids) for o in llm.generate([r.prompt for r in reqs], params)]

    run(warmup_requests(model_facts(path)["vocab_size"]))
    out = {name: _timed(run, reqs) for name, reqs in requests.items()}
    for res in out.values():
        res["config"] = (f"max_num_seqs={args.max_num_seqs}, max_num_batched_tokens={args.max_num_batched_tokens}, "
                         f"{torch.get_num_threads()} threads")
    return out


def worker_hf(path: Path, requests: dict[str, list[Request]], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: nothing stops a row early
    model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def run_batch(reqs: list[Request]) -> list[list[int]]:
        width = max(len(r.prompt) for r in reqs)
        ids = torch.zeros(len(reqs), width, dtype=torch.long)
        mask = torch.zeros(len(reqs), width, dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        new = max(r.max_tokens for r in reqs)  # a static batch runs to its longest request
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
        if seq.shape[1] != width + new:
            raise RuntimeError(f"transformers stopped after {seq.shape[1] - width} of {new} tokens")
        return [seq[i, width:width + r.max_tokens].tolist() for i, r in enumerate(reqs)]

    out: dict[str, Any] = {}
    for name, reqs in requests.items():
        best: dict[str, Any] | None = None
        sweep, others = {}, 0.0
        for bs in args.hf_batch_sizes:
            run_batch(warmup_requests(model_facts(path)["vocab_size"])[:1] * min(bs, 4))

            def run(rs: list[Request], bs: int = bs) -> list[list[int]]:
                return [o for k in range(0, len(rs), bs) for o in run_batch(rs[k:k + bs])]

            res = _timed(run, reqs)
            sweep[bs], others = round(res["tok_s"], 2), max(others, res["others"])
            print(f"  transformers {name} batch {bs}: {res['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            if best is None or res["tok_s"] > best["tok_s"]:
                best = res | {"config": f"batch {bs}, {torch.get_num_threads()} threads"}
        assert best is not None
        out[name] = best | {"sweep": sweep, "others": others}  # others: the worst of the sweep
    return out


def worker_vllm(path: Path, requests: dict[str, list[Request]], args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM as VLLM
    from vllm import SamplingParams as VSP

    llm = VLLM(model=str(path), dtype="float32", skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.vllm_eager, seed=0)

    def run(reqs: list[Request]) -> list[list[int]]:
        params = [VSP(max_tokens=r.max_tokens, temperature=0, ignore_eos=True, detokenize=False) for r in reqs]
        outs = llm.generate([{"prompt_token_ids": r.prompt} for r in reqs], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    run(warmup_requests(model_facts(path)["vocab_size"]))
    out = {name: _timed(run, reqs) for name, reqs in requests.items()}
    cfg = (f"max_num_seqs={args.max_num_seqs}, max_num_batched_tokens={args.max_num_batched_tokens}, "
           f"enforce_eager={args.vllm_eager}, reserved_cpus={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU', 'auto')}")
    for res in out.values():
        res["config"] = cfg
    return out


def worker_batch1(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Our batch-1 decode (one prompt, ``args.batch1_tokens`` out) against bandwidth / bytes read per token."""
    from parallel import LLM, SamplingParams

    facts = model_facts(path)
    llm = LLM(str(path), dtype="float32", max_num_seqs=1, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 28,
              enable_prefix_caching=False)
    spec = (QUICK_WORKLOADS if args.quick else WORKLOADS)["fixed"]
    prompt = make_requests(spec, facts["vocab_size"], args.seed)[0].prompt
    n_out = args.batch1_tokens
    llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))  # warm-up
    engine = llm.engine
    best: dict[str, float] = {}
    snap, t_start = cpu_snapshot(), time.perf_counter()
    for k in range(3):
        engine.add_request(f"b1-{k}", prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        engine.step()  # prefill + first token
        t1 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        t2 = time.perf_counter()
        rate = (n_out - 1) / (t2 - t1)
        if rate > best.get("decode_tok_s", 0.0):
            best = {"decode_tok_s": rate, "e2e_tok_s": n_out / (t2 - t0), "ttft_s": t1 - t0}
    others = others_cores(snap, time.perf_counter() - t_start)
    dram = measure_bandwidth(2 << 30)  # several times any L3: DRAM bandwidth
    wsize = measure_bandwidth(facts["decode_weight_bytes"])  # the weights' own size (may partly sit in L3)
    per_token = facts["decode_weight_bytes"] + facts["kv_bytes_per_token"] * (len(prompt) + n_out / 2)
    return best | {
        "others": others, "prompt_len": len(prompt), "max_tokens": n_out, "bytes_per_token": per_token,
        "params": facts["params"],
        "bw_dram_gbs": dram["read_gbs"], "bw_copy_gbs": dram["copy_gbs"], "bw_wsize_gbs": wsize["read_gbs"],
        "bound_tok_s": dram["read_gbs"] * 1e9 / per_token, "bound_wsize_tok_s": wsize["read_gbs"] * 1e9 / per_token,
    }


def worker_profile(path: Path, requests: dict[str, list[Request]], args: argparse.Namespace) -> dict[str, Any]:
    """Where our time goes: wall time per engine phase (wrapped methods) and torch.profiler's top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import parallel.model_runner as mr
    from parallel import SamplingParams

    llm = our_llm(path, args)
    eng, timer = llm.engine, PhaseTimer()
    spent, calls, timed = timer.spent, timer.calls, timer.wrap
    runner = eng.runner if hasattr(eng, "runner") else eng.executor.runner  # the in-process model runner
    eng.step = timed("engine.step (total)", eng.step)
    runner.execute = timed("runner.execute", runner.execute)
    eng.scheduler.schedule = timed("scheduler.schedule", eng.scheduler.schedule)
    eng.scheduler.update = timed("scheduler.update", eng.scheduler.update)
    mr.build_attention_metadata = timed("build_attention_metadata", mr.build_attention_metadata)
    runner.model.forward = timed("model forward", runner.model.forward)
    runner.model.compute_logits = timed("compute_logits (LM head)", runner.model.compute_logits)
    runner.sampler = timed("sampler", runner.sampler)

    def run(reqs: list[Request]) -> list[Any]:
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True) for r in reqs]
        return llm.generate([r.prompt for r in reqs], params)

    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first start is slow
        run(warmup_requests(model_facts(path)["vocab_size"]))
    out: dict[str, Any] = {}
    for name, reqs in requests.items():
        spent.clear()
        calls.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run(reqs)
            wall = time.perf_counter() - t0
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        out[name] = {"wall_s": wall, "phases": dict(spent), "calls": dict(calls), "threads": torch.get_num_threads(),
                     "ops": [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in ops]}
        print(f"{name}: {wall:.2f} s profiled, {calls.get('runner.execute', 0)} steps", flush=True)
    return out


def run_worker(args: argparse.Namespace) -> None:
    path = model_path(args.model)
    if args.worker == "batch1":
        result: dict[str, Any] = worker_batch1(path, args)
    else:
        specs = QUICK_WORKLOADS if args.quick else WORKLOADS
        vocab = model_facts(path)["vocab_size"]
        requests = {w: make_requests(specs[w], vocab, args.seed) for w in args.workloads}
        fn = {"ours": worker_ours, "hf": worker_hf, "vllm": worker_vllm, "profile": worker_profile}[args.worker]
        result = fn(path, requests, args)
    Path(args.json).write_text(json.dumps(result))


# ---- driver ---------------------------------------------------------------------------------------------------
def spawn(worker: str, model: str, args: argparse.Namespace, workloads: list[str]) -> dict[str, Any]:
    """Run one worker; rerun it (up to --retries times) while other processes took more than --busy-cores."""
    best: dict[str, Any] = {}
    for attempt in range(1 + args.retries):
        result = spawn_once(worker, model, args, workloads)
        if "error" in result:
            return result
        result["_others"] = max([result.get("others", 0.0)] + [r.get("others", 0.0) for r in result.values()
                                                                if isinstance(r, dict)])
        result["_attempts"] = attempt + 1
        if not best or result["_others"] < best["_others"]:
            best = result
        if result["_others"] <= args.busy_cores:
            break
        print(f"  other processes used {result['_others']:.2f} cores on average during a measurement"
              + (": running it again" if attempt < args.retries else ""), flush=True)
    return best


def spawn_once(worker: str, model: str, args: argparse.Namespace, workloads: list[str]) -> dict[str, Any]:
    """Run one worker subprocess; returns its JSON, or {"error": ...} (the run goes on without it)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{worker}-", dir=OUT_DIR / "tmp"))
    out_json = tmp / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--model", model, "--json",
           str(out_json), "--workloads", ",".join(workloads), "--seed", str(args.seed), "--hf-batch-sizes",
           ",".join(map(str, args.hf_batch_sizes)), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--kv-cache-gib", str(args.kv_cache_gib),
           "--batch1-tokens", str(args.batch1_tokens)]
    cmd += ["--quick"] * args.quick + ["--vllm-eager"] * args.vllm_eager
    env = os.environ | {"TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if worker == "vllm":
        env |= {"VLLM_CACHE_ROOT": str(tmp / "cache"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
                "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1"}
        if args.vllm_reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.vllm_reserved_cpus)
        (tmp / "rpc").mkdir()
    elif args.threads:  # ours / transformers / batch-1 / profile: torch's intra-op threads
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"[{time.strftime('%H:%M:%S')}] {worker} on {model}: {', '.join(workloads) or 'batch-1'}", flush=True)
    t0 = time.perf_counter()
    log = tmp / "worker.log"
    try:
        with log.open("w") as f:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.worker_timeout, check=False)
        if proc.returncode != 0 or not out_json.is_file():
            tail = log.read_text()[-1500:]
            print(f"  FAILED (exit {proc.returncode}):\n{tail}", flush=True)
            return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
        result = json.loads(out_json.read_text())
    except subprocess.TimeoutExpired:
        print(f"  TIMED OUT after {args.worker_timeout} s", flush=True)
        return {"error": f"timed out after {args.worker_timeout} s"}
    finally:
        elapsed = time.perf_counter() - t0
        saved = OUT_DIR / f"{worker}-{model}{'-quick' if args.quick else ''}.log"
        if log.is_file():
            shutil.copy(log, saved)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, res in result.items():
        if isinstance(res, dict) and "tok_s" in res:
            print(f"  {name}: {res['tok_s']:.1f} tok/s ({res.get('config', '')}; others used "
                  f"{res.get('others', 0):.2f} cores)", flush=True)
    print(f"  ({elapsed:.0f} s including startup)", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(kind: type = str) -> Any:
        return lambda s: [kind(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=csv(), default=None,
                   help="comma list (default: tiny-code-llama,random-100m; --quick: random-tiny)")
    p.add_argument("--workloads", type=csv(), default=["fixed", "varied"], help="comma list of fixed, varied")
    p.add_argument("--engines", type=csv(), default=list(ENGINES), help="comma list of ours, hf, vllm")
    p.add_argument("--hf-batch-sizes", type=csv(int), default=[8, 16, 32])
    p.add_argument("--batch1-model", default=None, help="model of the batch-1 test ('none' to skip)")
    p.add_argument("--batch1-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of ours and transformers (default: torch's choice, one per core); vLLM's "
                        "CPU worker binds its own cores (by default all but one, kept for its front end)")
    p.add_argument("--vllm-eager", action="store_true", help="enforce_eager=True for vLLM (no torch.compile)")
    p.add_argument("--vllm-reserved-cpus", type=int, default=None,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU (default: vLLM's own choice)")
    p.add_argument("--profile", action="store_true",
                   help="also profile ours on the batch-1 model over the workloads (phases and top torch ops)")
    p.add_argument("--merge", action="store_true",
                   help="keep the (model, engine) results of the previous run that this run did not measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and workloads, for smoke tests")
    p.add_argument("--results", type=Path, default=None, help="markdown file to write")
    p.add_argument("--worker-timeout", type=int, default=3600)
    p.add_argument("--busy-cores", type=float, default=0.2,
                   help="rerun a worker when other processes used more cores than this during a measurement")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--worker", choices=[*ENGINES, "batch1", "profile"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [w for w in args.workloads if w not in WORKLOADS] + [e for e in args.engines if e not in ENGINES]
    if bad:
        p.error(f"unknown workload/engine: {', '.join(bad)}")
    args.engines = [e for e in ENGINES if e in args.engines]  # fixed column order
    if args.models is None:
        args.models = ["random-tiny"] if args.quick else ["tiny-code-llama", "random-100m"]
    if args.batch1_model is None:
        args.batch1_model = "random-tiny" if args.quick else "random-100m"
    if args.results is None:
        args.results = OUT_DIR / "RESULTS-quick.md" if args.quick else ROOT / "benchmarks" / "RESULTS.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    (OUT_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python benchmarks/engine.py", *sys.argv[1:]])
    machine = machine_info() | {"load_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for model in args.models:
        path = model_path(model)
        if not (path / "config.json").is_file():
            print(f"skipping {model}: {path} does not exist yet", flush=True)
            continue
        results[model] = {e: spawn(e, model, args, args.workloads) for e in args.engines}
    batch1 = None if args.batch1_model == "none" else spawn("batch1", args.batch1_model, args, [])
    prof = spawn("profile", args.batch1_model, args, args.workloads) if args.profile else None
    raw_path = OUT_DIR / f"results{'-quick' if args.quick else ''}.json"
    raw = {"machine": machine, "commands": [command], "batch1": batch1, "profile": prof, "results": results,
           "batch1_model": args.batch1_model}
    if args.merge and raw_path.is_file():
        raw = merge_results(json.loads(raw_path.read_text()), raw)
    raw_path.write_text(json.dumps(raw))
    text = report(args, raw["results"], raw["batch1"], machine, raw["commands"], time.perf_counter() - t0)
    if raw["profile"]:
        text += "\n" + profile_report(raw["batch1_model"], raw["profile"])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(write_section(args.results, "engine", text))
    print("\n" + text)
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
