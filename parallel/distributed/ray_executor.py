"""Tensor parallelism across processes: one Ray actor per rank, in a placement group, joined by
torch.distributed (gloo on CPU, NCCL on CUDA).

The engine process keeps the scheduler. Each step it puts the SchedulerOutput in the object store once and
every rank runs the same layers on it — column-parallel q/k/v and gate/up, row-parallel o/down with one
all-reduce each (Megatron-LM) — and only rank 0 samples. Inside a Serve replica that reserved a placement
group, the ranks take bundles 1..N of it (bundle 0 is the replica); elsewhere the executor reserves its own
group (STRICT_PACK by default: collectives stay on one node; SPREAD for multi-node).

A dead rank makes ``execute`` and ``check_health`` raise at once (Ray reports the actor's death): the step's
requests fail with a typed error, the health check fails, and Serve replaces the whole replica; rank actors
are owned by it and die with it.
"""

from __future__ import annotations

import os
import socket
import time

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.config import EngineConfig
from parallel.distributed.group import TPGroup
from parallel.errors import EngineDeadError
from parallel.model_runner import ModelRunner
from parallel.models.loader import load_model
from parallel.sampling_params import SamplingParams
from parallel.step_messages import SchedulerOutput, StepResult

HEALTH_TIMEOUT_S = 10.0


class TPWorker:
    """One rank: a shard of the model and of the KV cache. Created by RayTPExecutor as a Ray actor."""

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def start(self, config: EngineConfig, rank: int, world_size: int, init_method: str, device: str,
              dtype: torch.dtype, num_blocks: int, threads: int) -> int:
        torch.set_num_threads(threads)
        self.rank = rank
        self.group = TPGroup.connect(rank, world_size, init_method, profile=config.parallel.profile_collectives)
        self.step_seconds = 0.0
        dev = torch.device(f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device)
        model = load_model(config.model.path, dtype, dev, self.group)
        self.runner = ModelRunner(model, num_blocks, config.cache.block_size, config.model.seed, sample=rank == 0)
        return rank

    def execute(self, out: SchedulerOutput) -> StepResult:
        if self.group.stats is None:
            return self.runner.execute(out)
        start = time.perf_counter()
        result = self.runner.execute(out)
        self.step_seconds += time.perf_counter() - start
        return result

    def collective_stats(self) -> dict[str, float]:
        """All-reduce calls/seconds/bytes and step seconds since the last call (profile_collectives only)."""
        stats = self.group.stats.snapshot_and_reset() if self.group.stats else {}
        stats["step_seconds"], self.step_seconds = self.step_seconds, 0.0
        return stats

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.prompt_logits(token_ids)

    def ping(self) -> int:
        return self.rank

    def pid(self) -> int:
        return os.getpid()


class RayTPExecutor:
    """Drives ``tensor_parallel_size`` TPWorker actors; same interface as UniProcExecutor.

    Example:
        >>> cfg = EngineConfig.from_options("models/tiny-code-llama", tensor_parallel_size=2)
        >>> ex = RayTPExecutor(cfg, torch.device("cpu"), torch.float32, num_blocks=256)
    """

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, num_blocks: int) -> None:
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        world = config.parallel.tensor_parallel_size
        pc = config.parallel
        self._own_pg: PlacementGroup | None = None
        pg = get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) >= world + 1:
            first = 1  # a Serve replica's group: bundle 0 is the replica itself
        else:
            resource = {"GPU": 1} if device.type == "cuda" else {"CPU": pc.cpus_per_worker}
            pg = self._own_pg = placement_group([dict(resource) for _ in range(world)], strategy=pc.placement_strategy)
            ray.get(pg.ready(), timeout=pc.worker_start_timeout_s)
            first = 0
        gpus = 1 if device.type == "cuda" else 0
        actor = ray.remote(TPWorker)
        self.workers = [
            actor.options(num_cpus=0 if gpus else pc.cpus_per_worker, num_gpus=gpus,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              placement_group=pg, placement_group_bundle_index=first + rank)).remote()
            for rank in range(world)
        ]
        ip, port = ray.get(self.workers[0].address.remote(), timeout=pc.worker_start_timeout_s)
        threads = max(1, int(pc.cpus_per_worker))
        ray.get([w.start.remote(config, rank, world, f"tcp://{ip}:{port}", device.type, dtype, num_blocks, threads)
                 for rank, w in enumerate(self.workers)], timeout=pc.worker_start_timeout_s)

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        """Validate the request's per-request resources here (a round trip per request to every rank would
        cost more); the ranks then create them on first use, where they can no longer fail."""
        if params.seed is not None:
            torch.Generator().manual_seed(params.seed)

    def execute(self, out: SchedulerOutput) -> StepResult:
        ref = ray.put(out)
        try:
            results = ray.get([w.execute.remote(ref) for w in self.workers])
        except (RayActorError, ActorUnavailableError) as err:  # a rank is gone: no step can run any more
            raise EngineDeadError(f"a tensor-parallel rank died: {type(err).__name__}") from err
        return results[0]

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        return ray.get([w.prompt_logits.remote(token_ids) for w in self.workers])[0]

    def collective_stats(self) -> list[dict[str, float]]:
        return ray.get([w.collective_stats.remote() for w in self.workers])

    def worker_pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def check_health(self) -> None:
        """Raises when any rank is gone or unresponsive."""
        ray.get([w.ping.remote() for w in self.workers], timeout=HEALTH_TIMEOUT_S)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)
