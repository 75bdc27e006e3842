"""Runs a parsed job on the async engine: every prompt is validated and queued before anything is
answered (so a bad prompt is an HTTP error, not a broken stream), then outputs are collected or
streamed, and every finished request is recorded in the metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import lru_cache

from engine import (
    AsyncEngineClient,
    EngineDeadError,
    EngineInfo,
    QueueFullError,
    RequestCancelledError,
    RequestError,
    RequestFailedError,
    RequestOutput,
    RequestStream,
)
from handler.metrics import Metrics
from handler.protocol import ApiError, ApiKind, Job

# The engine's names for request fields, as each API spells them.
_PARAM_NAMES = {
    ApiKind.TGI: {"prompt": "inputs", "max_tokens": "parameters.max_new_tokens",
                  "stop_token_ids": "parameters.stop_token_ids"},
    ApiKind.CHAT: {"prompt": "messages"},
    ApiKind.COMPLETION: {},
}


class GenerationService:
    def __init__(self, llm: AsyncEngineClient, metrics: Metrics, info: EngineInfo):
        self.llm, self.metrics = llm, metrics
        self.special_ids = set(info.eos_token_ids) | set(info.special_token_ids)
        self.token_text = lru_cache(maxsize=65536)(info.token_text_decoder())

    async def prompts(self, job: Job) -> list[str | list[int]]:
        if job.kind is not ApiKind.CHAT:
            return list(job.prompts or [])
        return [await self.llm.chat_prompt_ids(job.messages)]

    async def start(self, job: Job, request_id: str) -> list[RequestStream]:
        """Queue every prompt of the job; on any refusal, abort the ones queued and raise."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(await self.prompts(job)):
                streams.append(await self.llm.add_request(prompt, job.params, f"{request_id}-{i}"))
        except BaseException as e:
            for stream in streams:
                stream.abort()
            raise api_error(e, job.kind) from e
        return streams

    async def collect(self, streams: list[RequestStream], deadline: float | None
                      ) -> list[RequestOutput]:
        try:
            async with asyncio.timeout_at(deadline):
                return list(await asyncio.gather(*(self._last(s) for s in streams)))
        except Exception as e:  # noqa: BLE001 - engine failures are 5xx errors, not crashes
            raise api_error(e) from e
        finally:
            for stream in streams:
                stream.abort()

    async def _last(self, stream: RequestStream) -> RequestOutput:
        tracker = _Tracker(self.metrics)
        output = None
        async for output in stream:
            tracker.observe(output)
        assert output is not None
        return output

    async def merged(
        self, streams: list[RequestStream], deadline: float | None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as steps arrive, across the job's prompts."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            tracker = _Tracker(self.metrics)
            try:
                async for output in stream:
                    tracker.observe(output)
                    await queue.put((index, output))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((index, e))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        num_open = len(tasks)
        try:
            while num_open:
                try:
                    async with asyncio.timeout_at(deadline):
                        index, item = await queue.get()
                except TimeoutError as e:
                    raise RequestCancelledError("the request exceeded its deadline") from e
                if item is None:
                    num_open -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.abort()


class _Tracker:
    """Latency metrics of one request, observed as its outputs arrive."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.last_time: float | None = None

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        if self.last_time is not None:
            self.metrics.inter_token_latency.observe(now - self.last_time)
        self.last_time = now
        if output.finished:
            self.metrics.record_finished(output)


def api_error(error: BaseException, kind: ApiKind | None = None) -> BaseException:
    """The HTTP error for an engine exception (other exceptions pass through)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestError):
        param = _PARAM_NAMES.get(kind, {}).get(error.param, error.param) if kind else error.param
        return ApiError(422, str(error), param)
    if isinstance(error, QueueFullError):
        return ApiError(429, f"the server is overloaded ({error}); retry later",
                        headers={"Retry-After": "1"})
    if isinstance(error, RequestFailedError):
        return ApiError(500, f"the request failed in the engine: {error}")
    if isinstance(error, TimeoutError):
        return ApiError(503, "the request exceeded its deadline")
    if isinstance(error, EngineDeadError | RequestCancelledError):
        return ApiError(503, str(error))
    return error
