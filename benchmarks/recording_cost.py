"""What the native engine's metrics recording costs the replica, in CPU time (issue 13), on a busy machine.

Throughput on vs off (``serving.py --targets mf-native-direct,mf-native-direct-nometrics``) needs a quiet
machine and many rounds; CPU time of the code that differs does not. The only code that differs on vs off
in the replica is ``parallel.metrics.EngineMetrics`` (``on_arrival`` / ``forget`` per request, ``on_step``
per engine step on the engine client's relay thread, ``samples()`` at each collection by the metrics
pusher). This drives the real ``AsyncEngine`` (engine process, tiny-code-llama, the serving benchmark's load:
64 x 128/128 tokens, 16 in flight, stream_interval 1) in three variants kept alive side by side, their order
rotated every round:

- ``off``: ``disable_log_stats`` (what ``observability.metrics: false`` gives the replica);
- ``current``: this working tree's ``EngineMetrics``;
- ``baseline``: ``parallel/metrics.py`` as of ``--baseline REF`` (default HEAD), loaded from git into its
  own module and put in place of the engine's own.

Per run: ``time.thread_time`` of every ``on_step`` call (on the relay thread, between the engine's steps:
cold caches), of the relay's whole ``on_outputs`` per step, and of a pusher thread's push (``MetricsPusher
.snapshot()`` pickled, the variant's own collector only) every ``--push-every-steps`` steps (2 s of the
serving benchmark's steps on a quiet machine, so a slow, busy machine does not collect more per step); the
process's CPU per output token (``getrusage``: every thread of the replica side) and the engine child's; the
process's garbage collections (count of full ones, ms of all: a collection holds the GIL). Ray's modules
are imported first, so the heap a full collection walks is a replica's (~300k objects). Then a replay: the
events (arrivals, steps, forgets) of an unmeasured ``current`` run, fed to each version again and again,
alternating, with a collection every ``--push-every-steps`` steps (no engine: warm caches, a lower bound).
Medians everywhere. Throughput is printed for context only (it moves with the machine's load).

Run from the repository root::

    .venv/bin/python benchmarks/recording_cost.py                       # baseline HEAD, 6 rounds
    .venv/bin/python benchmarks/recording_cost.py --baseline 3b1f2ee --rounds 4

JSON goes to ``benchmarks/out/recording-cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import pickle
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray.serve  # noqa: E402, F401  (a replica's heap: ~300k tracked objects, as its full collections see)

from benchmarks.common import code_facts, machine_info, markdown_table  # noqa: E402
from deployments.metrics_hub import MetricsPusher  # noqa: E402
from parallel import metrics as current  # noqa: E402
from parallel.async_engine import AsyncEngine  # noqa: E402
from parallel.sampling_params import SamplingParams  # noqa: E402

VARIANTS = ("off", "baseline", "current")


def load_metrics_module(ref: str) -> types.ModuleType:
    """``parallel/metrics.py`` as of ``ref``, as a module of its own (its collector registers beside ours)."""
    source = subprocess.run(["git", "show", f"{ref}:parallel/metrics.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = f"metrics_at_{ref.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    module.__file__ = f"{ref}:parallel/metrics.py"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


class Timed:
    """thread_time (ns) of every call of ``fn``, appended to ``costs``."""

    def __init__(self, fn: Any, costs: list[int]) -> None:
        self.fn, self.costs = fn, costs

    def __call__(self, *args: Any) -> Any:
        t0 = time.thread_time_ns()
        out = self.fn(*args)
        self.costs.append(time.thread_time_ns() - t0)
        return out


class Recorder:
    """Keeps every event an EngineMetrics receives, in order (for the replay)."""

    def __init__(self, metrics: Any) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        for kind in ("on_arrival", "on_step", "forget"):
            inner = getattr(metrics, kind)

            def record(*args: Any, _kind: str = kind, _inner: Any = inner) -> None:
                self.events.append((_kind, args))
                _inner(*args)
            setattr(metrics, kind, record)
        self.metrics = metrics

    def close(self) -> None:
        for kind in ("on_arrival", "on_step", "forget"):
            vars(self.metrics).pop(kind, None)


def make_engine(variant: str, args: argparse.Namespace, baseline: types.ModuleType) -> AsyncEngine:
    engine = AsyncEngine.from_options(args.model, engine_process=True, dtype="float32", max_num_seqs=32,
                                      kv_cache_memory_bytes=args.kv_cache_bytes, max_num_batched_tokens=2048,
                                      stream_interval=1, served_model_name=f"rc-{variant}",
                                      disable_log_stats=variant == "off")
    if variant == "baseline":
        engine.metrics = baseline.EngineMetrics(f"rc-{variant}", max_model_len=engine.max_model_len,
                                                stats=engine.stats)
    return engine


async def run_load(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        async with sem:
            n = 0
            async for delta in engine.generate(f"r{i}-{time.monotonic_ns()}", prompt, params):
                n += len(delta.token_ids)
            return n

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


@contextlib.contextmanager
def only_collector(keep: Any, others: list[Any]) -> Iterator[None]:
    """The process registry without the other versions' collectors: a push snapshots the variant's own."""
    gone = [c for c in others if c is not keep and c in REGISTRY._collector_to_names]
    for c in gone:
        REGISTRY.unregister(c)
    try:
        yield
    finally:
        for c in gone:
            REGISTRY.register(c)


def measure(engine: AsyncEngine, prompts: list[list[int]], args: argparse.Namespace, collectors: list[Any],
            recorder: bool = False) -> tuple[dict[str, Any], Recorder | None]:
    keep = sys.modules[type(engine.metrics).__module__]._COLLECTOR if engine.metrics is not None else None
    with only_collector(keep, collectors):
        return _measure(engine, prompts, args, recorder)


def _measure(engine: AsyncEngine, prompts: list[list[int]], args: argparse.Namespace,
             recorder: bool) -> tuple[dict[str, Any], Recorder | None]:
    relay: list[int] = []
    step: list[int] = []
    collect: list[int] = []
    rec = None
    metrics = engine.metrics
    if metrics is not None:
        if recorder:
            rec = Recorder(metrics)
        metrics.on_step = Timed(metrics.on_step, step)  # type: ignore[method-assign]
    timed_relay, due, stop = Timed(engine.on_outputs, relay), threading.Event(), threading.Event()

    def on_outputs(deltas: list) -> None:
        timed_relay(deltas)
        if len(relay) % args.push_every_steps == 0:
            due.set()

    engine.on_outputs = on_outputs  # type: ignore[method-assign]

    push = Timed(lambda: pickle.dumps(MetricsPusher("rc", {"replica": "rc"}, "m").snapshot(), protocol=5), collect)

    def pusher() -> None:  # MetricsPusher.push_once's thread part, every --push-every-steps steps
        while True:
            due.wait()
            due.clear()
            if stop.is_set():
                return
            push()

    thread = threading.Thread(target=pusher, daemon=True) if metrics is not None else None
    child = psutil.Process(engine.process_ids()[0])
    gcs = GcWatch()
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), child.cpu_times(), time.perf_counter()
    if thread is not None:
        thread.start()
    tokens = asyncio.run(run_load(engine, prompts, args.output_len, args.concurrency))
    wall = time.perf_counter() - t0
    stop.set()
    due.set()
    if thread is not None:
        thread.join()
        push()  # the final push, as MetricsPusher.stop does
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), child.cpu_times()
    gcs.close()
    del engine.on_outputs
    if metrics is not None:
        del metrics.on_step
    if rec is not None:
        rec.close()
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return {"tokens": tokens, "steps": len(relay), "wall_s": wall, "tok_s": tokens / wall,
            "relay_ns_per_step": statistics.median(relay), "on_step_ns": statistics.median(step) if step else 0.0,
            "on_step_ns_per_step_mean": sum(step) / len(relay), "collections": len(collect),
            "collect_us": statistics.median(collect) / 1e3 if collect else 0.0,
            "collect_ns_per_step": sum(collect) / len(relay),
            "recording_ns_per_step": (sum(step) + sum(collect)) / len(relay),
            "replica_cpu_us_per_tok": cpu * 1e6 / tokens,
            "engine_cpu_us_per_tok": (c1.user + c1.system - c0.user - c0.system) * 1e6 / tokens,
            "full_gcs": gcs.count[2], "gc_ms": gcs.ms, "gc_ms_per_ktok": gcs.ms * 1e3 / tokens}, rec


class GcWatch:
    """The process's garbage collections while open: how many of each generation, and their wall time (ms;
    a collection holds the GIL: every thread of the replica waits it out)."""

    def __init__(self) -> None:
        self.count, self.ms, self._at = [0, 0, 0], 0.0, 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._at = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.ms += (time.perf_counter() - self._at) * 1e3

    def close(self) -> None:
        gc.callbacks.remove(self)


def replay(cls: Any, events: list[tuple[str, tuple[Any, ...]]], push_every: int) -> dict[str, float]:
    """Feed ``events`` to a fresh ``cls``: thread_time of the recording calls and of the collections."""
    m = cls("replay", max_model_len=2048)
    rec = col = steps = 0
    for kind, call_args in events:
        fn = getattr(m, kind)
        t0 = time.thread_time_ns()
        fn(*call_args)
        rec += time.thread_time_ns() - t0
        if kind == "on_step":
            steps += 1
            if steps % push_every == 0:
                t0 = time.thread_time_ns()
                list(m.samples())
                col += time.thread_time_ns() - t0
    t0 = time.thread_time_ns()
    list(m.samples())
    col += time.thread_time_ns() - t0
    return {"record_ns_per_step": rec / steps, "collect_ns_per_step": col / steps,
            "total_ns_per_step": (rec + col) / steps}


def med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="HEAD", help="git ref whose parallel/metrics.py is the baseline")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-code-llama"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 28)
    p.add_argument("--replays", type=int, default=30)
    # the serving benchmark's engine steps in one push interval on a quiet machine (~1200 tok/s, 16 a step,
    # 2 s): collections follow steps, not the clock, so a slow (busy) machine does not collect more per step
    p.add_argument("--push-every-steps", type=int, default=150)
    p.add_argument("--replay-only", action="store_true", help="replay the events saved by the last live run")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "recording-cost.json")
    args = p.parse_args()
    baseline = load_metrics_module(args.baseline)
    events_file = args.json.with_suffix(".events.pkl")
    live: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    if args.replay_only:  # the events of an earlier live run, replayed alone
        events = pickle.loads(events_file.read_bytes())
    else:
        events = run_live(args, baseline, live)
        events_file.write_bytes(pickle.dumps(events))
    rep: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
    for _ in range(args.replays):  # alternated, so drift in the machine's load hits both alike
        rep["baseline"].append(replay(baseline.EngineMetrics, events, args.push_every_steps))
        rep["current"].append(replay(current.EngineMetrics, events, args.push_every_steps))
    report(args, live, rep)


def run_live(args: argparse.Namespace, baseline: types.ModuleType,
             live: dict[str, list[dict[str, Any]]]) -> list[tuple[str, tuple[Any, ...]]]:
    """The live rounds (rows into ``live``); returns the events of an unmeasured ``current`` run."""
    engines = {v: make_engine(v, args, baseline) for v in VARIANTS}
    vocab = engines["off"].vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    collectors = [current._COLLECTOR, baseline._COLLECTOR]
    try:
        for v in VARIANTS:  # warm-up: first-call costs out of the way
            measure(engines[v], prompts[: args.concurrency], args, collectors)
        _, rec = measure(engines["current"], prompts, args, collectors, recorder=True)  # the replay's events
        assert rec is not None
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            for v in order:
                row, _ = measure(engines[v], prompts, args, collectors)
                row["load1"] = psutil.getloadavg()[0]
                live[v].append(row)
                print(f"r{r + 1} {v:8s} " + " ".join(f"{k} {x:.4g}" for k, x in row.items()), flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return rec.events


def report(args: argparse.Namespace, live: dict[str, list[dict[str, Any]]],
           rep: dict[str, list[dict[str, float]]]) -> None:
    push_every = args.push_every_steps
    keys = ("on_step_ns", "on_step_ns_per_step_mean", "collect_us", "collect_ns_per_step", "recording_ns_per_step",
            "relay_ns_per_step", "replica_cpu_us_per_tok", "full_gcs", "gc_ms_per_ktok", "engine_cpu_us_per_tok",
            "tok_s")
    if live["off"]:
        rows = [[v] + [f"{med(live[v], k):.4g}" for k in keys] for v in VARIANTS]
        print(f"\nlive, medians of {args.rounds} rounds (ns per engine step unless stated):")
        print(markdown_table(["variant", *keys], rows))
    rkeys = ("record_ns_per_step", "collect_ns_per_step", "total_ns_per_step")
    print(f"\nreplay of {sum(1 for _ in rep['current'])} x the recorded events, a collection every {push_every} steps:")
    print(markdown_table(["version", *rkeys], [[v] + [f"{med(rep[v], k):.4g}" for k in rkeys] for v in rep]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "code": code_facts(),
                                     "baseline": code_facts(args.baseline), "args": {k: str(x) for k, x in
                                                                                    vars(args).items()},
                                     "live": live, "replay": rep, "push_every_steps": push_every}, indent=1))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
