"""What the server knows of its model: the background load, the engine once ready, and the truth
that /ping tells about both."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from engine import (
    AsyncEngineClient,
    AsyncLLM,
    BackgroundLoader,
    EngineConfig,
    EngineProcessClient,
    LoadState,
)
from handler.errors import ApiError
from handler.gpu_metrics import GpuMetrics
from handler.metrics import Metrics
from handler.settings import ServerSettings

if TYPE_CHECKING:
    from handler.generation import GenerationService

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: ServerSettings, engine_config: EngineConfig,
                 loader: EngineProcessClient | None = None):
        self.settings = settings
        # The engine's load and, in its own process, the engine itself (it then also serves as
        # the service's client); else loaded and stepped on threads of this process.
        self.loader: BackgroundLoader | EngineProcessClient
        if loader is not None:
            self.loader = loader
        elif settings.engine_process:
            self.loader = EngineProcessClient(engine_config, settings.max_pending_requests,
                                              settings.log_level)
        else:
            self.loader = BackgroundLoader(engine_config)
        self.metrics = Metrics()
        self.service: GenerationService | None = None
        self.connection_guard: Any = None  # set by the server that runs the app
        self._service_lock = asyncio.Lock()
        self.metrics.watch(self._engine_stats, self.loader.status)
        self.gpu_metrics = GpuMetrics()
        self.metrics.registry.register(self.gpu_metrics)

    def _engine_stats(self) -> dict[str, Any] | None:
        return self.loader.stats()

    def start(self) -> None:
        self.gpu_metrics.start()
        if not self.settings.load_on_first_request:
            self.loader.start()

    def shutdown(self) -> None:
        self.gpu_metrics.stop()
        if self.service is not None:
            self.service.llm.shutdown()
        self.loader.shutdown()  # loaded but never served: its workers still stop

    def cancel_open_requests(self, reason: str) -> None:
        """End every open request now, each stream with its error record (event loop only)."""
        if self.service is not None:
            num = self.service.llm.cancel_all(reason)
            logger.warning("%s: ending %d open request(s)", reason, num)

    def health(self) -> tuple[int, dict[str, Any]]:
        """/ping's answer: 200 ready, 503 loading, 500 failed or dead (with the reason)."""
        status = self.loader.status()
        if (reason := self._failure()) is not None:
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

    def _failure(self) -> str | None:
        """Why a loaded engine cannot serve any more (noticed even before any request)."""
        return (self.service.llm if self.service is not None else self.loader).failure()

    async def get_service(self) -> GenerationService:
        if self.service is not None:
            if (reason := self._failure()) is not None:
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
                from handler.generation import GenerationService  # the request protocol
                assert self.loader.info is not None
                self.service = GenerationService(self._client(), self.metrics, self.loader.info)
        return self.service

    def _client(self) -> AsyncEngineClient:
        if isinstance(self.loader, EngineProcessClient):
            return self.loader
        assert self.loader.engine is not None
        return AsyncLLM(self.loader.engine, self.settings.max_pending_requests)
