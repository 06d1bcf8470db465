"""GpuMonitor on a real GPU through real NVML: the held device is read, memory and utilisation follow real work.

Skipped without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from parallel.gpu import GpuMonitor, GpuReading

pytestmark = pytest.mark.gpu


def _device() -> int:
    return torch.cuda.current_device()


def _read(monitor: GpuMonitor) -> GpuReading:
    reading = monitor.read()
    assert reading is not None, "NVML gave no reading for a held GPU"
    return reading


def _norm_uuid(uuid: object) -> str:
    return str(uuid).strip().lower().removeprefix("gpu-")


def test_reads_the_held_device():
    dev = _device()
    with GpuMonitor(cuda_indices=[dev]) as monitor:
        reading = _read(monitor)
        assert reading.device_count == 1
        assert 0.0 <= reading.utilization <= 1.0
        assert 0.0 < reading.memory_used_fraction < 1.0
        props = torch.cuda.get_device_properties(dev)
        # cuda:i is NVML device i when CUDA_VISIBLE_DEVICES is set or there is one GPU (PCI order otherwise).
        same_order = "CUDA_VISIBLE_DEVICES" in os.environ or torch.cuda.device_count() == 1
        if hasattr(props, "uuid") and same_order:
            assert _norm_uuid(monitor.device_uuids[0]) == _norm_uuid(props.uuid)


def test_memory_fraction_follows_an_allocation():
    dev = _device()
    total = torch.cuda.get_device_properties(dev).total_memory
    size = min(8 << 30, total // 8)
    with GpuMonitor(cuda_indices=[dev]) as monitor:
        torch.cuda.synchronize(dev)
        before = _read(monitor).memory_used_fraction
        block = torch.ones(size, dtype=torch.uint8, device=f"cuda:{dev}")
        torch.cuda.synchronize(dev)
        after = _read(monitor).memory_used_fraction
        del block
        torch.cuda.empty_cache()
    assert after - before >= 0.8 * size / total, (before, after)


def test_utilization_rises_under_sustained_matmul():
    dev = _device()
    a = torch.randn(8192, 8192, device=f"cuda:{dev}", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=f"cuda:{dev}", dtype=torch.bfloat16)
    torch.cuda.synchronize(dev)
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            with torch.cuda.device(dev):
                while not stop.is_set():
                    for _ in range(20):
                        torch.matmul(a, b)
                    torch.cuda.synchronize(dev)
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    with GpuMonitor(cuda_indices=[dev]) as monitor:
        time.sleep(1.5)  # NVML averages over its last sample period (up to ~1 s): let the randn fall out of it
        before = max(_read(monitor).utilization for _ in range(3))
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            time.sleep(1.5)
            during = []
            for _ in range(10):
                during.append(_read(monitor).utilization)
                time.sleep(0.3)
        finally:
            stop.set()
            worker.join(timeout=60)
    assert not errors, errors
    assert max(during) >= 0.5, (before, during)
    assert max(during) > before, (before, during)
