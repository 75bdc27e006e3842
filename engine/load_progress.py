"""A load's progress, observable while it runs (another thread reads it). Pure Python: the server
imports it before torch, to answer /ping from the first moment.

Phases in order: starting (nothing begun yet), imports, config, weights, tokenizer, kv_cache,
then ready. Each phase's start is
kept (wall-clock seconds), so /ping and /metrics show where a slow start spends its time. The byte
total is known before the first byte (file sizes, or the S3 object's), so bytes count up from 0.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

# "ranks": waiting for the tensor-parallel workers to finish loading their shares
# "tokenizer": waiting for the tokenizer, which loads on a thread during "weights"
LOAD_PHASES = ("starting", "imports", "config", "weights", "tokenizer", "ranks", "kv_cache",
               "ready")


@dataclass
class LoadProgress:
    total_bytes: int = 0
    loaded_bytes: int = 0
    phase: str = "starting"
    started_at: float | None = None  # monotonic, when the bytes began to count
    finished_at: float | None = None
    first_byte_at: float | None = None  # wall clock, like the phase starts
    phase_started_at: dict[str, float] = field(default_factory=dict)  # phase -> wall clock
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, total_bytes: int) -> None:
        with self._lock:
            self.total_bytes, self.loaded_bytes = total_bytes, 0
            self.started_at, self.finished_at = time.monotonic(), None

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
            self.phase_started_at[phase] = time.time()

    def advance(self, num_bytes: int) -> None:
        with self._lock:
            self._count(self.loaded_bytes + num_bytes)

    def set_loaded(self, num_bytes: int) -> None:
        with self._lock:
            self._count(num_bytes)

    def _count(self, num_bytes: int) -> None:
        if self.first_byte_at is None and num_bytes > 0:
            self.first_byte_at = time.time()
        self.loaded_bytes = num_bytes

    def finish(self) -> None:
        with self._lock:
            self.loaded_bytes = max(self.loaded_bytes, self.total_bytes)
            self.finished_at = time.monotonic()
            self.phase = "ready"
            self.phase_started_at["ready"] = time.time()

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    def phase_seconds(self) -> dict[str, float]:
        """Seconds spent in each phase begun so far (the current one: so far)."""
        with self._lock:
            starts = list(self.phase_started_at.items())
        # Each phase ends where the next begins; the current one, now.
        times = [t for _, t in starts] + [time.time()]
        return {name: round(end - begin, 3)
                for (name, begin), end in zip(starts, times[1:], strict=True) if name != "ready"}

    def snapshot(self) -> dict[str, Any]:
        elapsed = self.elapsed_s
        return {
            "phase": self.phase,
            "loaded_bytes": self.loaded_bytes,
            "total_bytes": self.total_bytes,
            "elapsed_s": round(elapsed, 3),
            "throughput_gbps": round(self.loaded_bytes / elapsed / 1e9, 3) if elapsed else 0.0,
            "phase_seconds": self.phase_seconds(),
            "phase_started_at": dict(self.phase_started_at),
            "first_byte_at": self.first_byte_at,
        }
