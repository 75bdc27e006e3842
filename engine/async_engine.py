"""The asyncio front: `generate()` is an async iterator of outputs while the engine steps
elsewhere, so the event loop stays free to answer (health checks, other clients).

`AsyncEngineClient` is the part every front shares: admission, one asyncio queue per request,
aborts. `AsyncLLM` steps the engine on a thread of this process (requests cross through an inbox);
`engine.process_client.EngineProcessClient` talks to an engine in its own process. If the engine
dies, every open stream gets `EngineDeadError` and later calls fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.inbox import IDLE_POLL, IDLE_WAIT, Inbox
from engine.input_processor import EngineRequest
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's step loop has stopped; no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are pending than the engine admits."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (and only it); `output` holds what it made before."""

    def __init__(self, output: RequestOutput):
        super().__init__(output.error or "the request failed in the engine")
        self.output = output


class RequestCancelledError(RuntimeError):
    """The server ended the request (shutdown past its grace, or a deadline)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class RequestStream:
    """The outputs of one request, in order; the last one has `finished`."""

    def __init__(self, llm: AsyncEngineClient, request_id: str):
        self.llm, self.request_id = llm, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.is_finished = False
        self.is_closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.is_closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.abort()
            raise item
        if item.error is not None:
            self.is_finished = True
            self.abort()
            raise RequestFailedError(item)
        if item.finished:
            self.is_finished = True
            self.abort()
        return item

    def abort(self) -> None:
        """Stop the request if it still runs (its KV blocks are freed); idempotent."""
        if not self.is_closed:
            self.is_closed = True
            self.llm._close_stream(self.request_id, self.is_finished)


class AsyncEngineClient:
    """The request side of an engine that runs elsewhere (a thread, a process): admission,
    one stream per request, aborts. Subclasses say how requests get there and outputs back."""

    def __init__(self, max_pending_requests: int = 1024):
        self.max_pending_requests = max_pending_requests
        self.error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._num_pending = 0  # requests admitted and not yet closed (event-loop thread only)
        self._lock = threading.Lock()

    @property
    def num_pending(self) -> int:
        return self._num_pending

    async def _process_inputs(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> EngineRequest:
        """Tokenize and validate (RequestError for a bad request), off the event loop."""
        raise NotImplementedError

    def _post(self, command: str, payload: object) -> None:
        """Send "add" (an EngineRequest) or "abort" (a request id) to the engine."""
        raise NotImplementedError

    async def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def failure(self) -> str | None:
        """Why the engine cannot serve any more, or None."""
        raise NotImplementedError

    def shutdown(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Validate and queue a request; iterate the returned stream for its outputs.

        Raises RequestError (bad request), QueueFullError or EngineDeadError at once.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        if self._num_pending >= self.max_pending_requests:
            raise QueueFullError(f"{self._num_pending} requests pending")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._num_pending += 1  # reserved now: the await below lets other requests in
        try:
            request = await self._process_inputs(request_id, prompt, params)
        except BaseException:
            self._num_pending -= 1
            raise
        stream = RequestStream(self, request_id)
        with self._lock:  # the engine may have died during the await: never queue into a corpse
            if self.error is not None:
                self._num_pending -= 1
                raise EngineDeadError(f"the engine stopped: {self.error!r}")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), stream.queue)
        self._post("add", request)
        return stream

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield an output per step that advanced the request; the last has `finished`.
        Leaving the iteration early aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def _close_stream(self, request_id: str, is_finished: bool) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._num_pending -= 1
            if not is_finished:
                self._post("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def cancel_all(self, reason: str) -> int:
        """End every open request now with `RequestCancelledError(reason)`; how many there were.

        Event-loop thread only. Their streams get the error as their last item (so a stream can
        end with an error record rather than be cut), and the engine frees their blocks.
        """
        request_ids = list(self._streams)
        for request_id in request_ids:
            self._deliver(request_id, RequestCancelledError(reason))
            self._post("abort", request_id)
        return len(request_ids)

    def _fail_all(self, error: BaseException) -> None:
        """The engine is gone: every open stream ends with EngineDeadError, later calls fail."""
        with self._lock:
            self.error = error
            request_ids = list(self._streams)
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        for request_id in request_ids:
            self._deliver(request_id, dead)

    def _deliver(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        # A closed event loop raises RuntimeError: nobody is left to read this stream.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, each to its stream: one wake-up of each event loop for the whole
        step, not one per output (each wake-up writes to the loop's self-pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads these
                loop.call_soon_threadsafe(_put_all, items)


class AsyncLLM(AsyncEngineClient):
    """The engine in this process, stepped on its own thread."""

    def __init__(self, engine: LLMEngine, max_pending_requests: int = 1024):
        super().__init__(max_pending_requests)
        self.engine = engine
        self._inbox = Inbox()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def _process_inputs(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> EngineRequest:
        # Tokenizing a long prompt takes a while: keep it off the event loop.
        return await asyncio.to_thread(self.engine.process_inputs, request_id, prompt, params)

    async def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        # The template and its tokenizing take a while for long chats: off the event loop.
        return await asyncio.to_thread(self.engine.chat_prompt_ids, messages)

    def failure(self) -> str | None:
        """Why the engine cannot serve any more (its loop died, or a tensor-parallel worker is
        gone, noticed here even while idle), or None."""
        if self.error is not None:
            return f"the engine loop stopped: {self.error!r}"
        executor = self.engine.executor
        return executor.dead_worker() if executor is not None else None

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._inbox.wake()
        self._thread.join(timeout)
        if not self._thread.is_alive():  # the loop no longer steps: the workers can stop
            self.engine.shutdown()

    def _post(self, command: str, payload: object) -> None:
        self._inbox.post(command, payload)

    def _drain_inbox(self) -> None:
        for command, payload in self._inbox.take_all():
            if command == "add":
                assert isinstance(payload, EngineRequest)
                if payload.request_id in self._streams:  # not abandoned while queued
                    self.engine.add_processed(payload)
            else:
                self.engine.abort(str(payload))

    def _run(self) -> None:
        is_idle_work_left = False  # until the loop has been idle for IDLE_WAIT
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    if not self._inbox.wait(timeout=IDLE_POLL if is_idle_work_left else IDLE_WAIT):
                        is_idle_work_left = self.engine.when_idle()
                    continue
                is_idle_work_left = False
                self._deliver_step(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - any failure kills the loop; report it
            logger.exception("engine loop died")
            self._fail_all(e)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
