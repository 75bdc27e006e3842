"""NVML gauges: none (and one log line) without a GPU; with a device, per-device gauges from the
last timed reading. The GPU path runs against a stand-in NVML here, and against the real one
where a GPU exists."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from handler.gpu_metrics import GpuMetrics


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, num_devices: int):
        self.num_devices, self.num_reads = num_devices, 0

    def nvmlDeviceGetCount(self):
        return self.num_devices

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.num_reads += 1
        return SimpleNamespace(used=(handle + 1) * 2**30, total=24 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=40 + handle)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 150_500  # milliwatts

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61


def _scrape(collector: GpuMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_no_gpu_means_no_gauges_and_one_log_line(caplog):
    def no_library():
        raise OSError("NVML Shared Library Not Found")

    with caplog.at_level(logging.INFO, logger="handler.gpu_metrics"):
        metrics = GpuMetrics(nvml=SimpleNamespace(nvmlDeviceGetCount=no_library))
        metrics.start()
    assert not metrics.is_available
    assert "llm_gpu" not in _scrape(metrics)
    assert [r.getMessage() for r in caplog.records] == [
        "no GPU metrics: NVML unavailable (OSError: NVML Shared Library Not Found)"]


def test_devices_get_gauges_from_the_last_reading_not_the_scrape():
    nvml = FakeNvml(2)
    metrics = GpuMetrics(interval_s=3600, nvml=nvml)
    metrics.start()
    reads = nvml.num_reads
    text = _scrape(metrics) + _scrape(metrics)
    assert nvml.num_reads == reads == 2  # one reading per device at start; scrapes read none
    assert 'llm_gpu_utilization_ratio{gpu="1"} 0.41' in text
    assert 'llm_gpu_memory_used_bytes{gpu="0"} 1.073741824e+09' in text
    assert 'llm_gpu_power_watts{gpu="0"} 150.5' in text
    assert 'llm_gpu_temperature_celsius{gpu="1"} 61.0' in text
    metrics.stop()


def test_real_nvml_where_a_gpu_exists():
    metrics = GpuMetrics()
    if not metrics.is_available:
        pytest.skip("no GPU or NVML driver on this machine")
    metrics.start()
    assert 'llm_gpu_memory_total_bytes{gpu="0"}' in _scrape(metrics)
    metrics.stop()
