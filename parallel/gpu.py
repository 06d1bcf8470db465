"""NVML readings for the GPUs this process holds, and the replica's load metrics dict.

Two things live here because both the replica (``deployments/llm.py``) and the autoscaling policy
(``cluster/autoscaling.py``) need them and arrows only point down into ``parallel/``:

* :class:`GpuMonitor` — utilisation and memory-used fraction, averaged over the held devices, read
  through NVML (the ``pynvml`` module of ``nvidia-ml-py``). Where NVML is missing (no driver:
  ``NVMLError_LibraryNotFound``, as on the CPU machines) or the process holds no GPU, ``read()``
  returns ``None`` — the reading is *absent*, never zero — and says so once in the log.
* :func:`engine_load_metrics` — turns an ``EngineStats``-like object (and an optional
  :class:`GpuReading`) into the dict a replica returns from Serve's ``record_autoscaling_stats()``.
  The key names (:data:`WAITING` ...) are the contract with the policy.

Which devices are "held": the entries of ``CUDA_VISIBLE_DEVICES`` (Ray sets it for actors with
``num_gpus > 0``), each an NVML index (``"0"``) or a UUID (``"GPU-…"``/``"MIG-…"``). ``cuda_indices``
picks the torch ``cuda:i`` devices out of that list. When the variable is unset the process may use
every GPU, so all NVML devices count (``cuda_indices`` then map straight to NVML indices). Ray leaves
the variable unset for actors without GPUs, so only build a monitor where the engine runs on CUDA,
or pass ``devices`` explicitly (e.g. the UUIDs tensor-parallel workers report from their own
:func:`held_devices`).

NVML stays behind this thin seam: the ``nvml`` argument takes any object with pynvml's functions,
which is how the unit tests inject a fake (NVML cannot exist on the CPU machines).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Metric names a replica reports through record_autoscaling_stats(); cluster/autoscaling.py reads them.
WAITING = "waiting"  # requests queued inside the engine
RUNNING = "running"  # requests the engine is running
KV_USAGE = "kv_usage"  # fraction of KV-cache blocks in use, 0..1
GPU_UTILIZATION = "gpu_utilization"  # mean over the replica's GPUs, 0..1; only when NVML works
GPU_MEMORY_USED_FRACTION = "gpu_memory_used_fraction"  # 0..1; only when NVML works


@dataclass(frozen=True)
class GpuReading:
    """One NVML sample averaged over the held devices.

    >>> GpuReading(utilization=0.5, memory_used_fraction=0.25, device_count=2).utilization
    0.5
    """

    utilization: float  # 0..1, NVML's "percent of time a kernel ran" over its last sample period
    memory_used_fraction: float  # 0..1, used / total framebuffer memory
    device_count: int
    memory_used_bytes: int = 0  # summed over the held devices


class EngineStatsLike(Protocol):
    num_waiting: int
    num_running: int
    kv_usage: float


def engine_load_metrics(stats: EngineStatsLike, gpu: GpuReading | None = None) -> dict[str, float]:
    """The dict a replica returns from ``record_autoscaling_stats()``: plain numbers under fixed names.

    GPU keys appear only with a reading, so an absent GPU never looks like an idle one.

    >>> from types import SimpleNamespace
    >>> engine_load_metrics(SimpleNamespace(num_waiting=3, num_running=5, kv_usage=0.5))
    {'waiting': 3.0, 'running': 5.0, 'kv_usage': 0.5}
    """
    metrics = {WAITING: float(stats.num_waiting), RUNNING: float(stats.num_running), KV_USAGE: float(stats.kv_usage)}
    if gpu is not None:
        metrics[GPU_UTILIZATION] = float(gpu.utilization)
        metrics[GPU_MEMORY_USED_FRACTION] = float(gpu.memory_used_fraction)
    return metrics


def held_devices(cuda_indices: Sequence[int] | None = None, env: Mapping[str, str] | None = None) -> list[str] | None:
    """Entries of ``CUDA_VISIBLE_DEVICES`` this process holds (all, or those behind ``cuda_indices``).

    ``None`` when the variable is unset (every GPU is usable); ``[]`` when it is set but empty.

    >>> held_devices(env={"CUDA_VISIBLE_DEVICES": "2,GPU-8f3a"})
    ['2', 'GPU-8f3a']
    >>> held_devices([1], env={"CUDA_VISIBLE_DEVICES": "2,GPU-8f3a"})
    ['GPU-8f3a']
    """
    raw = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    # CUDA ignores everything from the first invalid entry (e.g. "-1") on.
    for i, entry in enumerate(entries):
        if entry.startswith("-"):
            entries = entries[:i]
            break
    if cuda_indices is None:
        return entries
    return [entries[i] for i in cuda_indices if 0 <= i < len(entries)]


class GpuMonitor:
    """Reads utilisation and memory of the held GPUs through NVML; ``read()`` is ``None`` without them.

    >>> monitor = GpuMonitor()  # on a machine without NVML (or without a held GPU) ...
    >>> monitor.read() is None  # ... the reading is absent, logged once
    True

    Args:
        devices: NVML identifiers to read (ints/digit strings: NVML indices; otherwise UUIDs).
            Default: :func:`held_devices` of this process.
        cuda_indices: torch ``cuda:i`` indices to read, when ``devices`` is not given.
        nvml: an object with pynvml's functions (default: ``import pynvml``); tests pass a fake.
        env: environment to read ``CUDA_VISIBLE_DEVICES`` from (default ``os.environ``).
    """

    def __init__(self, devices: Sequence[int | str] | None = None, *, cuda_indices: Sequence[int] | None = None,
                 nvml: Any | None = None, env: Mapping[str, str] | None = None) -> None:
        self._requested = None if devices is None else [str(d) for d in devices]
        self._cuda_indices = None if cuda_indices is None else list(cuda_indices)
        self._nvml = nvml
        self._env = env
        self._handles: list[Any] | None = None  # resolved on first read; [] when unavailable
        self._initialized = False
        self._uuids: list[str] = []
        self._warned_read = False

    # ---- public ------------------------------------------------------------------------------------------
    def read(self) -> GpuReading | None:
        """Mean utilisation and memory-used fraction over the held devices, or ``None`` when absent."""
        handles = self._resolve()
        if not handles:
            return None
        nvml = self._nvml
        utils: list[float] = []
        mems: list[float] = []
        used = 0
        for handle in handles:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as e:  # e.g. NotSupported on a MIG slice, GPU lost
                self._warn_read_once(f"NVML read failed on a held GPU ({e}); it is left out of the reading")
                continue
            utils.append(min(max(float(rates.gpu) / 100.0, 0.0), 1.0))
            mems.append(float(mem.used) / float(mem.total) if mem.total else 0.0)
            used += int(mem.used)
        if not utils:
            return None
        return GpuReading(utilization=sum(utils) / len(utils), memory_used_fraction=sum(mems) / len(mems),
                          device_count=len(utils), memory_used_bytes=used)

    @property
    def available(self) -> bool:
        """True when NVML works and at least one held device was found."""
        return bool(self._resolve())

    @property
    def device_uuids(self) -> list[str]:
        """NVML UUIDs of the devices read (empty when unavailable)."""
        self._resolve()
        return list(self._uuids)

    def close(self) -> None:
        """Shut NVML down (if this monitor started it); later reads start it again."""
        if self._initialized:
            with contextlib.suppress(Exception):  # best effort on teardown
                self._nvml.nvmlShutdown()
        self._initialized = False
        self._handles = None
        self._uuids = []

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------------------
    def _resolve(self) -> list[Any]:
        if self._handles is not None:
            return self._handles
        self._handles = []
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                logger.info("GPU metrics unavailable: pynvml not importable (%s)", e)
                return self._handles
            self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without GPUs
            logger.info("GPU metrics unavailable: NVML did not start (%s)", e)
            return self._handles
        self._initialized = True
        try:
            ids = self._device_ids(nvml)
        except nvml.NVMLError as e:
            logger.warning("GPU metrics unavailable: NVML could not list devices (%s)", e)
            return self._handles
        if not ids:
            logger.info("GPU metrics unavailable: this process holds no GPU")
            return self._handles
        for ident in ids:
            try:
                handle = self._handle(nvml, ident)
                uuid = nvml.nvmlDeviceGetUUID(handle)
            except nvml.NVMLError as e:
                logger.warning("GPU %r is not readable through NVML (%s); left out", ident, e)
                continue
            self._handles.append(handle)
            self._uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        if not self._handles:
            logger.info("GPU metrics unavailable: none of the held GPUs %s is readable", ids)
        return self._handles

    def _device_ids(self, nvml: Any) -> list[str]:
        if self._requested is not None:
            return self._requested
        held = held_devices(self._cuda_indices, self._env)
        if held is not None:
            return held
        if self._cuda_indices is not None:  # CUDA_VISIBLE_DEVICES unset: cuda:i is NVML device i
            return [str(i) for i in self._cuda_indices]
        return [str(i) for i in range(int(nvml.nvmlDeviceGetCount()))]

    @staticmethod
    def _handle(nvml: Any, ident: str) -> Any:
        if ident.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(ident))
        try:
            return nvml.nvmlDeviceGetHandleByUUID(ident)
        except nvml.NVMLError:
            # CUDA also accepts a unique UUID prefix, with or without "GPU-": match it against every device.
            want = ident.lower().removeprefix("gpu-")
            found = []
            for i in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                if uuid.lower().removeprefix("gpu-").startswith(want):
                    found.append(handle)
            if len(found) != 1:
                raise
            return found[0]

    def _warn_read_once(self, message: str) -> None:
        if not self._warned_read:
            self._warned_read = True
            logger.warning(message)
