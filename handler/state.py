"""What the server knows of its model: the background load, the engine once ready, and the truth
that /ping tells about both."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engine import AsyncLLM, BackgroundLoader, EngineConfig, LoadState
from handler.generation import GenerationService
from handler.gpu_metrics import GpuMetrics
from handler.metrics import Metrics
from handler.protocol import ApiError
from handler.settings import ServerSettings

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: ServerSettings, engine_config: EngineConfig):
        self.settings = settings
        self.loader = BackgroundLoader(engine_config)
        self.metrics = Metrics()
        self.service: GenerationService | None = None
        self.connection_guard: Any = None  # set by the server that runs the app
        self._service_lock = asyncio.Lock()
        self.metrics.watch(self._engine_stats, self.loader.status)
        self.gpu_metrics = GpuMetrics()
        self.metrics.registry.register(self.gpu_metrics)

    def _engine_stats(self) -> dict[str, Any] | None:
        engine = self.loader.engine
        return engine.stats() if engine is not None else None

    def start(self) -> None:
        self.gpu_metrics.start()
        if not self.settings.load_on_first_request:
            self.loader.start()

    def shutdown(self) -> None:
        self.gpu_metrics.stop()
        if self.service is not None:
            self.service.llm.shutdown()
        if self.loader.engine is not None:  # loaded but never served: its workers still stop
            self.loader.engine.shutdown()

    def cancel_open_requests(self, reason: str) -> None:
        """End every open request now, each stream with its error record (event loop only)."""
        if self.service is not None:
            num = self.service.llm.cancel_all(reason)
            logger.warning("%s: ending %d open request(s)", reason, num)

    def health(self) -> tuple[int, dict[str, Any]]:
        """/ping's answer: 200 ready, 503 loading, 500 failed or dead (with the reason)."""
        status = self.loader.status()
        if self.service is not None and (reason := self.service.llm.failure()) is not None:
            return 500, {"status": "failed", "reason": reason}
        state = self.loader.state
        if state is LoadState.FAILED:
            return 500, status
        if state is LoadState.READY:
            return 200, status  # "ready", with how long each phase of the load took
        if self.settings.load_on_first_request:
            # Serverless: healthy before loading; the first invocation pays for the load.
            return 200, {**status, "detail": "the model loads on the first request"}
        return 503, status

    async def get_service(self) -> GenerationService:
        if self.service is not None:
            if (reason := self.service.llm.failure()) is not None:
                raise ApiError(503, f"the engine stopped: {reason}")
            return self.service
        if self.settings.load_on_first_request:
            self.loader.start()
            await asyncio.to_thread(self.loader.wait, self.settings.first_request_load_timeout)
        if self.loader.state is LoadState.FAILED:
            raise ApiError(503, f"the model failed to load: {self.loader.status()['reason']}")
        if self.loader.state is not LoadState.READY:
            raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
        async with self._service_lock:
            if self.service is None:
                assert self.loader.engine is not None
                llm = AsyncLLM(self.loader.engine, self.settings.max_pending_requests)
                self.service = GenerationService(llm, self.metrics)
        return self.service
