"""GpuMonitor: absent NVML is no reading (logged once); with an injected fake NVML, the held devices' averages."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pynvml
import pytest

from parallel.gpu import (
    GPU_MEMORY_USED_FRACTION,
    GPU_UTILIZATION,
    GpuMonitor,
    GpuReading,
    engine_load_metrics,
    held_devices,
)

GIB = 1 << 30


class FakeNvml:
    """pynvml's surface as GpuMonitor uses it; devices are (uuid, utilisation %, used GiB, total GiB)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, devices: list[tuple[str, int, int, int]], init_error: int | None = None,
                 broken: set[int] | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.broken = broken or set()
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def nvmlInit(self) -> None:
        self._count("init")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._count("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._count("count")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if not 0 <= i < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for i, dev in enumerate(self.devices):
            if dev[0] == uuid:
                return i
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.devices[handle][0]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        self._count("utilization")
        if handle in self.broken:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=self.devices[handle][1], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        _, _, used, total = self.devices[handle]
        return SimpleNamespace(used=used * GIB, total=total * GIB, free=(total - used) * GIB)


FOUR = [("GPU-aaaa-1111", 10, 1, 16), ("GPU-bbbb-2222", 50, 4, 16), ("GPU-cccc-3333", 100, 8, 16),
        ("GPU-dddd-4444", 0, 0, 16)]


class approx:  # lower case: reads like pytest.approx at the call sites
    """Matches a GpuReading's ``__dict__`` with these values (floats to rounding); the summed memory bytes
    only when given."""

    def __init__(self, utilization: float, memory_used_fraction: float, device_count: int,
                 memory_used_gib: int | None = None) -> None:
        self.gib = memory_used_gib
        self.expected = GpuReading(utilization, memory_used_fraction, device_count, (memory_used_gib or 0) << 30)

    def __eq__(self, other: object) -> bool:
        got, want = dict(other), dict(self.expected.__dict__)  # type: ignore[call-overload]
        if self.gib is None:
            got.pop("memory_used_bytes"), want.pop("memory_used_bytes")
        return got == pytest.approx(want)

    def __repr__(self) -> str:
        return f"approx({self.expected})"


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "parallel.gpu"]


# ---- NVML absent ---------------------------------------------------------------------------------------
def test_absent_nvml_reads_none_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="parallel.gpu")
    nvml = FakeNvml(FOUR, init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monitor = GpuMonitor(nvml=nvml, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert [monitor.read() for _ in range(5)] == [None] * 5
    assert not monitor.available and monitor.device_uuids == []
    assert nvml.calls == {"init": 1}  # no retry per call
    assert len(_messages(caplog)) == 1 and "NVML" in _messages(caplog)[0]


def test_real_pynvml_without_a_driver_reads_none(caplog):
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works here (tests/gpu covers the real device)")
    caplog.set_level(logging.INFO, logger="parallel.gpu")
    monitor = GpuMonitor()
    assert monitor.read() is None and monitor.read() is None
    assert len(_messages(caplog)) == 1


def test_no_held_gpu_reads_none_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="parallel.gpu")
    nvml = FakeNvml(FOUR)
    monitor = GpuMonitor(nvml=nvml, env={"CUDA_VISIBLE_DEVICES": ""})
    assert monitor.read() is None and monitor.read() is None
    assert _messages(caplog) == ["GPU metrics unavailable: this process holds no GPU"]
    assert "count" not in nvml.calls  # an empty CUDA_VISIBLE_DEVICES means none, not all


# ---- readings ------------------------------------------------------------------------------------------
def test_averages_over_held_devices():
    monitor = GpuMonitor(nvml=FakeNvml(FOUR), env={"CUDA_VISIBLE_DEVICES": "1,2"})
    assert monitor.read().__dict__ == approx(utilization=0.75, memory_used_fraction=0.375, device_count=2,
                                              memory_used_gib=12)
    assert monitor.device_uuids == ["GPU-bbbb-2222", "GPU-cccc-3333"]


def test_uuids_and_indices_mix_in_cuda_visible_devices():
    monitor = GpuMonitor(nvml=FakeNvml(FOUR), env={"CUDA_VISIBLE_DEVICES": "GPU-dddd-4444,0"})
    assert monitor.read().__dict__ == approx(utilization=0.05, memory_used_fraction=1 / 32, device_count=2)
    assert monitor.device_uuids == ["GPU-dddd-4444", "GPU-aaaa-1111"]


@pytest.mark.parametrize("entry", ["GPU-cccc", "cccc-3333", "cccc"])  # CUDA accepts unique UUID prefixes
def test_uuid_prefixes_resolve(entry):
    monitor = GpuMonitor(nvml=FakeNvml(FOUR), env={"CUDA_VISIBLE_DEVICES": entry})
    assert monitor.device_uuids == ["GPU-cccc-3333"]


def test_cuda_indices_pick_from_the_visible_list():
    monitor = GpuMonitor(cuda_indices=[1], nvml=FakeNvml(FOUR), env={"CUDA_VISIBLE_DEVICES": "3,2"})
    assert monitor.read().__dict__ == approx(utilization=1.0, memory_used_fraction=0.5, device_count=1)


def test_unset_cuda_visible_devices_means_every_gpu_or_the_cuda_indices():
    assert GpuMonitor(nvml=FakeNvml(FOUR), env={}).read().__dict__ == approx(0.4, 13 / 64, 4)
    assert GpuMonitor(cuda_indices=[0], nvml=FakeNvml(FOUR), env={}).read().__dict__ == approx(0.1, 1 / 16, 1)


def test_explicit_devices_override_the_environment():
    monitor = GpuMonitor(["GPU-aaaa-1111", 2], nvml=FakeNvml(FOUR), env={"CUDA_VISIBLE_DEVICES": "3"})
    assert monitor.read().__dict__ == approx(utilization=0.55, memory_used_fraction=9 / 32, device_count=2)


def test_each_read_is_fresh_and_nvml_starts_once():
    nvml = FakeNvml([("GPU-a", 20, 2, 8)])
    monitor = GpuMonitor(nvml=nvml, env={})
    assert monitor.read().utilization == pytest.approx(0.2)
    nvml.devices[0] = ("GPU-a", 90, 6, 8)
    assert monitor.read().__dict__ == approx(0.9, 0.75, 1)
    assert nvml.calls["init"] == 1
    monitor.close()
    assert nvml.calls["shutdown"] == 1


def test_unreadable_device_is_left_out_and_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="parallel.gpu")
    monitor = GpuMonitor(nvml=FakeNvml(FOUR, broken={0}), env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert [monitor.read() for _ in range(3)] == [GpuReading(0.5, 0.25, 1, 4 * GIB)] * 3  # exact: 50 / 100, 4 / 16
    assert len(_messages(caplog)) == 1 and "left out" in _messages(caplog)[0]
    assert GpuMonitor(nvml=FakeNvml(FOUR, broken={0}), env={"CUDA_VISIBLE_DEVICES": "0"}).read() is None


def test_unknown_device_is_skipped(caplog):
    caplog.set_level(logging.INFO, logger="parallel.gpu")
    monitor = GpuMonitor(nvml=FakeNvml(FOUR), env={"CUDA_VISIBLE_DEVICES": "7,1"})
    assert monitor.read().__dict__ == approx(0.5, 0.25, 1)


# ---- helpers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, indices, expected", [
    (None, None, None), ("", None, []), ("0,1", None, ["0", "1"]), (" 2 , GPU-x ", [1], ["GPU-x"]),
    ("0,-1,2", None, ["0"]), ("0,1", [5], []),
])
def test_held_devices(raw, indices, expected):
    env = {} if raw is None else {"CUDA_VISIBLE_DEVICES": raw}
    assert held_devices(indices, env) == expected


def test_engine_load_metrics_has_gpu_keys_only_with_a_reading():
    stats = SimpleNamespace(num_waiting=2, num_running=3, kv_usage=0.25)
    assert engine_load_metrics(stats) == {"waiting": 2.0, "running": 3.0, "kv_usage": 0.25}
    with_gpu = engine_load_metrics(stats, GpuReading(0.5, 0.125, 1))
    assert (with_gpu[GPU_UTILIZATION], with_gpu[GPU_MEMORY_USED_FRACTION]) == (0.5, 0.125)
    assert all(isinstance(v, float) for v in with_gpu.values())  # Serve accepts only int/float values
