"""Tensor parallelism with real torch.distributed (gloo) processes, no Ray: TP=2 logits equal TP=1."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from parallel.distributed import TPGroup
from parallel.model_runner import ModelRunner
from parallel.models.loader import load_model

PROMPTS = [[1, 17, 300, 42, 9], [1, *range(20, 80)]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(path: str, group: TPGroup) -> list[torch.Tensor]:
    runner = ModelRunner(load_model(path, torch.float32, torch.device("cpu"), group), 16, 16,
                         sample=group.rank == 0)
    return [runner.prompt_logits(p) for p in PROMPTS]


def _rank(rank: int, world: int, port: int, path: str, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    group = TPGroup.connect(rank, world, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        logits = _logits(path, group)
        if rank == 0:
            out.put([t.numpy() for t in logits])
    finally:
        group.close()


@pytest.mark.parametrize("name", ["llama-gqa-llama3rope", "mistral-gqa", "qwen2-bias-tied"])
def test_tp2_logits_equal_tp1(random_models, name):
    path = str(random_models[name])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, path, out)) for r in range(2)]
    for p in procs:
        p.start()
    tp2 = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    tp1 = _logits(path, TPGroup.single())
    for a, b in zip(tp2, tp1, strict=True):
        assert (torch.from_numpy(a) - b).abs().max().item() <= 1e-5
