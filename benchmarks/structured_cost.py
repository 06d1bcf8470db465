"""What a JSON-schema mask adds to a decode step of the native engine: batch 16 on the shipped model, every
row plain vs every row constrained (``parallel/structured.py``), side by side in one process, interleaved
rounds, medians; then the mask's own parts (the batched bitmask fill, applying it to the logits, the matchers
accepting the tokens) at the shipped vocabulary (4096) and, for applying, a Llama-3 sized one (128256).

The schema forces a long output (an object holding an array of 100 integers in [0, 999]), so that every row
stays in decode for the whole measurement; plain rows ignore EOS for the same reason.

    .venv/bin/python benchmarks/structured_cost.py           # ~1 min; prints markdown tables
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, markdown_table  # noqa: E402
from parallel.config import EngineConfig  # noqa: E402
from parallel.engine import LLMEngine  # noqa: E402
from parallel.sampling_params import SamplingParams  # noqa: E402
from parallel.step_messages import GrammarMask, ScheduledRequest, SchedulerOutput  # noqa: E402
from parallel.structured import apply_mask  # noqa: E402
from parallel.structured_spec import StructuredSpec  # noqa: E402

TINY = str(ROOT / "models" / "tiny-code-llama")
BATCH, ROUNDS, WARM, STEPS = 16, 5, 4, 40
SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "items": {
    "type": "integer", "minimum": 0, "maximum": 999}, "minItems": 100, "maxItems": 100}},
    "required": ["values"], "additionalProperties": False}


def decode_steps_ms(engine: LLMEngine, constrained: bool, seed: int) -> list[float]:
    """Per-step wall times of STEPS decode steps of BATCH requests (after their prefill and WARM steps)."""
    spec = StructuredSpec.json_schema(SCHEMA) if constrained else None
    for i in range(BATCH):
        engine.add_request(f"r{seed}-{i}", f"# case {i}\nrow = ", SamplingParams(
            max_tokens=400, temperature=1.0, seed=seed * 100 + i, ignore_eos=True, structured=spec))
    while engine.grammar is not None and engine.grammar.num_waiting:  # (compiled once: cached afterwards)
        engine.step()
    times = []
    for k in range(WARM + STEPS):
        t0 = time.perf_counter()
        deltas = engine.step()
        if k >= WARM:
            times.append((time.perf_counter() - t0) * 1e3)
        assert all(d.error is None and not d.finished for d in deltas), "a row left decode: raise max_tokens"
    for i in range(BATCH):
        engine.abort(f"r{seed}-{i}")
    return times


def parts_ms(engine: LLMEngine) -> list[list[str]]:
    """The mask's parts alone, for BATCH rows midway through the schema's array."""
    backend, spec = engine.grammar, StructuredSpec.json_schema(SCHEMA)
    assert backend is not None
    backend.compile(spec).result()
    tok = engine.tokenizer
    assert tok is not None
    prefix = tok.encode('{"values":[1,22,333,4', add_special_tokens=False)
    ids = [f"p{i}" for i in range(BATCH)]
    for rid in ids:
        backend.admit(spec, rid)
        backend.advance(rid, prefix)
    out = SchedulerOutput(tuple(ScheduledRequest(r, (1,), 0, (0,), True, SamplingParams()) for r in ids),
                          frozenset())
    masked, _ = backend.with_mask(out)
    logits, big = torch.randn(BATCH, 4096), torch.randn(BATCH, 128256)
    big_mask = GrammarMask(tuple(ids), torch.randint(-2**31, 2**31 - 1, (BATCH, 128256 // 32), dtype=torch.int32))
    digit = tok.encode("5", add_special_tokens=False)[-1]
    matchers = [backend._matchers[r] for r in ids]

    def accept() -> None:  # one digit per row, rolled back after: the matchers' work per sampled token
        for m in matchers:
            m.accept_token(digit)
        for m in matchers:
            m.rollback(1)

    parts = [
        ("4096", "fill the batch's bitmask (xgrammar, batched)", lambda: backend.with_mask(out), 200),
        ("4096", "apply it to the logits", lambda: apply_mask(logits.clone(), ids, masked.grammar), 200),
        ("4096", "(a clone of the logits: the line above includes one)", logits.clone, 200),
        ("4096", "matchers accept a token (and roll back)", accept, 200),
        ("128256", "apply a bitmask to the logits", lambda: apply_mask(big.clone(), ids, big_mask), 50),
        ("128256", "(a clone of the logits: the line above includes one)", big.clone, 50),
    ]
    rows = []
    for vocab, label, fn, n in parts:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        rows.append([vocab, label, f"{statistics.median(samples):.3f}"])
    for rid in ids:
        backend.forget(rid)
    return rows


def main() -> None:
    # One torch thread: on a shared 2-core machine a second OpenMP thread's wake-ups (milliseconds when the other
    # core is busy) would swamp what is measured here.
    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig.from_options(TINY, dtype="float32", max_num_seqs=BATCH,
                                                 kv_cache_memory_bytes=256 << 20))
    t0 = time.perf_counter()
    engine.grammar.compile(StructuredSpec.json_schema(SCHEMA)).result()  # type: ignore[union-attr]
    compile_ms = (time.perf_counter() - t0) * 1e3
    times: dict[str, list[float]] = {"plain": [], "json schema": []}
    for r in range(ROUNDS):  # interleaved: drift hits both cases alike
        times["plain"] += decode_steps_ms(engine, False, 2 * r)
        times["json schema"] += decode_steps_ms(engine, True, 2 * r + 1)
    plain = statistics.median(times["plain"])
    rows = [[name, f"{statistics.median(ts):.2f}", f"{statistics.quantiles(ts, n=10)[-1]:.2f}",
             f"{statistics.median(ts) / plain:.3f}x", f"{statistics.median(ts) - plain:+.2f}"]
            for name, ts in times.items()]
    print(json.dumps(machine_info()))
    print(f"torch threads {torch.get_num_threads()}; batch {BATCH} in decode; median (and p90) of {ROUNDS} rounds x "
          f"{STEPS} steps; first compile of the schema {compile_ms:.1f} ms (then cached)")
    print(markdown_table(["rows", "ms / decode step", "p90", "vs plain", "added ms"], rows))
    print(markdown_table(["vocab", "part (batch 16)", "median ms"], parts_ms(engine)))


if __name__ == "__main__":
    main()
