"""Load the engine off the caller's thread, so a server answers while the weights arrive.

The state is observable at any moment: idle, loading (with bytes, total and throughput), ready,
or failed (with the exception kept for the health check to report).
"""

from __future__ import annotations

import atexit
import enum
import gc
import logging
import threading
from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig
from engine.engine_info import EngineInfo
from engine.load_progress import LoadProgress
from engine.weights.prefetch import prefetch_weights

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.weights.prefetch import FetchedRead, LocalRead

logger = logging.getLogger(__name__)


class LoadState(enum.StrEnum):
    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class BackgroundLoader:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._early_read: LocalRead | FetchedRead | None = None
        self._has_started_reading = False
        self.progress = LoadProgress()
        self.state = LoadState.IDLE
        self.error: BaseException | None = None
        self.engine: LLMEngine | None = None
        self.info: EngineInfo | None = None  # set with the engine
        self._lock = threading.Lock()
        self._done = threading.Event()

    def start(self) -> None:
        """Begin loading (once; later calls do nothing)."""
        with self._lock:
            if self.state is not LoadState.IDLE:
                return
            self.state = LoadState.LOADING
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def start_reading(self) -> None:
        """Start the S3 read of the weights now, before the load is asked for (once: the load
        takes this read; later calls do nothing). Torch-free."""
        if not self._has_started_reading:
            self._has_started_reading = True
            self._early_read = prefetch_weights(self.config.model, self.config.s3_endpoint,
                                                  self.config.verify_weights,
                                                  in_memory=self.config.loads_to_cpu)

    def abandon_reading(self) -> None:
        """Stop an early read whose load will never come."""
        if self._early_read is not None:
            self._early_read.close()
            self._early_read = None

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading ended, ready or failed."""
        return self._done.wait(timeout)

    def _load(self) -> None:
        early_read = None
        # The load creates millions of objects (torch's and transformers' modules): with the
        # collector on, its full passes over them cost 0.4-0.8 s of a cold start, all holding the
        # GIL. What the imports made is kept for good (frozen: later passes skip it); what the
        # load made after them is collected once at the end, then frozen too.
        gc.disable()
        try:
            # The S3 read starts first; torch and transformers are imported next, on this
            # thread, while the bytes arrive and the server answers.
            self.progress.set_phase("imports")
            self.start_reading()
            early_read, self._early_read = self._early_read, None  # the load's from here
            from engine.llm_engine import LLMEngine

            gc.freeze()
            self.engine = LLMEngine(self.config, self.progress, early_read)
            self.info = self.engine.info()
            self.state = LoadState.READY
            snapshot = self.progress.snapshot()
            logger.info(
                "model ready: %s, %.1f MB in %.2f s (%.2f GB/s)", self.config.model or "default",
                snapshot["total_bytes"] / 1e6, snapshot["elapsed_s"], snapshot["throughput_gbps"],
            )
        except BaseException as e:  # noqa: BLE001 - kept and reported by the health check
            if early_read is not None:
                early_read.close()
            self.error = e
            self.state = LoadState.FAILED
            logger.error("model load failed: %s", e)
        finally:
            # tensorizer's per-tensor records hold every loaded tensor in reference cycles:
            # frozen uncollected, the weights the model has since replaced (quantized, moved into
            # huge pages) would stay resident for good (~0.7 GB for SmolLM2 in bf16+int8).
            gc.collect()
            gc.freeze()
            gc.enable()
            # Collectable again at exit: bindings that count their objects (nanobind's, in
            # triton) report frozen ones as leaks.
            atexit.unregister(gc.unfreeze)
            atexit.register(gc.unfreeze)
            self._done.set()

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"status": str(self.state), **self.progress.snapshot()}
        if self.error is not None:
            status["reason"] = f"{type(self.error).__name__}: {self.error}"
        return status

    def stats(self) -> dict[str, Any] | None:
        """The engine's counters and gauges, read now; None until it is loaded."""
        return self.engine.stats() if self.engine is not None else None

    def failure(self) -> str | None:
        """Why a loaded engine cannot serve (a tensor-parallel worker is gone), or None."""
        executor = self.engine.executor if self.engine is not None else None
        return executor.dead_worker() if executor is not None else None

    def shutdown(self) -> None:
        if self.engine is not None:  # loaded but never served: its workers still stop
            self.engine.shutdown()
