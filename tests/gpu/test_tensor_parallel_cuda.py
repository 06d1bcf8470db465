"""Tensor parallelism on CUDA: NCCL initialises; with two GPUs, TP=2 logits equal TP=1; GPU equals CPU."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch
import torch.distributed as dist

from parallel.distributed import TPGroup
from parallel.model_runner import ModelRunner
from parallel.models.loader import load_model

PROMPT = [1, *range(20, 80)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_rank(rank: int, world: int, port: int, path: str, out: mp.Queue) -> None:
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    group = TPGroup.connect(rank, world, f"tcp://127.0.0.1:{port}", backend="nccl")
    x = torch.ones(4, device="cuda") * (rank + 1)
    group.all_reduce(x)
    model = load_model(path, torch.float32, torch.device("cuda", rank), group)
    logits = ModelRunner(model, 16, 16, sample=rank == 0).prompt_logits(PROMPT)
    if rank == 0:
        out.put((x.cpu(), logits.cpu()))
    group.close()


def test_nccl_initialises_on_one_gpu():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device="cuda")
        dist.all_reduce(x)
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()


def test_tp1_gpu_equals_cpu(llama_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = ModelRunner(load_model(llama_path, torch.float32, torch.device("cpu")), 16, 16).prompt_logits(PROMPT)
    gpu = ModelRunner(load_model(llama_path, torch.float32, torch.device("cuda")), 16, 16).prompt_logits(PROMPT)
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_logits_equal_tp1(llama_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, 2, port, str(llama_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    reduced, tp2 = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    assert reduced.tolist() == [3.0] * 4
    tp1 = ModelRunner(load_model(llama_path, torch.float32, torch.device("cuda")), 16, 16).prompt_logits(PROMPT)
    assert (tp2 - tp1.cpu()).abs().max().item() <= 1e-4
