"""GPU gauges from NVML (`nvidia-ml-py`): per device utilisation, memory used and total, power
and temperature, read by a timer thread, never on the request path (a scrape serves the last
reading). Without a GPU or a driver there are none of them and one log line says why."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

# (metric name, help, reading key)
GAUGES = (
    ("llm_gpu_utilization_ratio", "GPU busy share over the driver's last sample period.",
     "utilization"),
    ("llm_gpu_memory_used_bytes", "GPU memory in use.", "memory_used"),
    ("llm_gpu_memory_total_bytes", "GPU memory.", "memory_total"),
    ("llm_gpu_power_watts", "GPU power draw.", "power"),
    ("llm_gpu_temperature_celsius", "GPU core temperature.", "temperature"),
)


def _load_nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


class GpuMetrics:
    """A Prometheus collector; `nvml` is the pynvml module (a stand-in in tests)."""

    def __init__(self, interval_s: float = 5.0, nvml: Any = None):
        self.interval_s = interval_s
        self.readings: list[dict[str, float]] = []
        self._stop = threading.Event()
        try:
            self.nvml = nvml or _load_nvml()
            count = self.nvml.nvmlDeviceGetCount()
        except Exception as e:  # noqa: BLE001 - no library, no driver, no device: no gauges
            logger.info("no GPU metrics: NVML unavailable (%s: %s)", type(e).__name__, e)
            self.nvml, count = None, 0
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        if count == 0 and self.nvml is not None:
            logger.info("no GPU metrics: NVML sees no device")

    @property
    def is_available(self) -> bool:
        return bool(self.handles)

    def start(self) -> None:
        if self.is_available:
            self.read()
            threading.Thread(target=self._run, name="gpu-metrics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.read()
            except Exception as e:  # noqa: BLE001 - a failed read keeps the last one
                logger.warning("GPU metrics read failed: %s", e)

    def read(self) -> None:
        nvml, readings = self.nvml, []
        for handle in self.handles:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            readings.append({
                "utilization": nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                "memory_used": float(memory.used),
                "memory_total": float(memory.total),
                "power": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # milliwatts
                "temperature": float(
                    nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            })
        self.readings = readings  # one assignment: a scrape sees the old list or the new

    def collect(self) -> Iterator[Metric]:
        readings = self.readings
        if not readings:
            return
        for name, doc, key in GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            for index, reading in enumerate(readings):
                family.add_metric([str(index)], reading[key])
            yield family
