"""What logits processing adds to one sampling step: the sampler on a batch of 16 rows, plain vs penalties
(presence + frequency + repetition, each row with a prompt of 512 and 256 output tokens) vs logit_bias
(100 ids a row) vs min-p, greedy and sampled, on the shipped model's vocabulary (4096) and a Llama-3 sized one
(128256). Medians over interleaved rounds, in one process (``parallel/sampler.py``, ``parallel/penalties.py``).

    .venv/bin/python benchmarks/sampling_cost.py           # ~1 min; prints a markdown table
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, markdown_table  # noqa: E402
from parallel.penalties import History  # noqa: E402
from parallel.sampler import Sampler  # noqa: E402
from parallel.sampling_params import SamplingParams  # noqa: E402

BATCH, PROMPT, OUTPUT, ROUNDS, STEPS = 16, 512, 256, 7, 20


def cases(vocab: int, temperature: float) -> dict[str, tuple[list[SamplingParams], list[History | None] | None]]:
    g = torch.Generator().manual_seed(0)
    hist = [History(torch.randint(0, vocab, (PROMPT + OUTPUT,), generator=g).tolist(), PROMPT) for _ in range(BATCH)]
    bias = {int(t): 5.0 for t in torch.randint(0, vocab, (100,), generator=g)}
    base = {"temperature": temperature, "max_tokens": 16}
    return {
        "plain": ([SamplingParams(**base)] * BATCH, None),
        "penalties": ([SamplingParams(**base, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)]
                      * BATCH, hist),
        "logit_bias": ([SamplingParams(**base, logit_bias=bias)] * BATCH, None),
        "min_p": ([SamplingParams(**base, min_p=0.05)] * BATCH, None),
    }


def step_ms(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams],
            histories: list[History | None] | None) -> float:
    t0 = time.perf_counter()
    for _ in range(STEPS):
        sampler(logits, params, [None] * BATCH, histories)
    return (time.perf_counter() - t0) / STEPS * 1e3


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for vocab in (4096, 128256):
        logits = torch.randn(BATCH, vocab)
        for temperature in (0.0, 1.0):
            table = cases(vocab, temperature)
            times: dict[str, list[float]] = {name: [] for name in table}
            sampler = Sampler(torch.Generator().manual_seed(1))
            for _ in range(ROUNDS):  # interleaved: drift hits every case alike
                for name, (params, hist) in table.items():
                    times[name].append(step_ms(sampler, logits, params, hist))
            plain = statistics.median(times["plain"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append([str(vocab), "greedy" if temperature == 0 else "sampled", name, f"{med:.3f}",
                             f"{med / plain:.2f}x", f"{med - plain:+.3f}"])
    print(machine_info())
    print(f"batch {BATCH}, {PROMPT}-token prompts + {OUTPUT} output tokens per row, 1 torch thread, "
          f"median of {ROUNDS} rounds x {STEPS} steps")
    print(markdown_table(["vocab", "rows", "case", "ms / step", "vs plain", "added ms"], rows))


if __name__ == "__main__":
    main()
