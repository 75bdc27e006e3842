"""The server's side of the engine process (`engine.engine_process`): starts it, tells its load
state as the background loader does, and serves requests as `AsyncLLM` does, through its pipe.

A reader thread takes every message from the engine: load status, call results, each step's
outputs (handed to their streams on the event loop) and the latest engine stats. If the process
exits, however it exits, the reader sees the pipe close: a load in progress fails with the exit
code, and every open stream ends with `EngineDeadError`; /ping reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import sys
import threading
from typing import Any

from engine.async_engine import AsyncEngineClient, EngineDeadError
from engine.background import LoadState
from engine.config import EngineConfig
from engine.engine_info import EngineInfo
from engine.engine_process import run_engine_process
from engine.input_processor import EngineRequest, RequestError
from engine.load_progress import LoadProgress
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Modules whose import may start native threads (OpenMP's, rayon's) that a fork cannot copy.
NATIVE_POOL_MODULES = ("torch", "numpy", "tokenizers")


class EngineProcessClient(AsyncEngineClient):
    def __init__(self, config: EngineConfig, max_pending_requests: int = 1024,
                 log_level: str = "info"):
        super().__init__(max_pending_requests)
        self.config, self.log_level = config, log_level
        self.state = LoadState.IDLE
        self.info: EngineInfo | None = None
        self._status: dict[str, Any] = LoadProgress().snapshot()
        self._stats: dict[str, Any] | None = None
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._done = threading.Event()
        self._send_lock = threading.Lock()
        self._is_stopping = False
        self._process: Any = None
        self._conn: Any = None

    # -- the load, as BackgroundLoader tells it --------------------------------------------------

    def spawn(self) -> None:
        """Start the engine process, which imports the engine and waits for `start` (once; later
        calls do nothing)."""
        with self._lock:
            if self._process is not None:
                return
            self._spawn()

    def start(self) -> None:
        """Load the model in the engine process, spawned first if it is not yet (once; later
        calls do nothing)."""
        with self._lock:
            if self.state is not LoadState.IDLE:
                return
            self.state = LoadState.LOADING
            if self._process is None:
                self._spawn()
        try:
            self._send("load", None)
        except OSError as e:  # the process has gone; its reader has the exit code, or will
            reason = str(self.error) if self.error is not None else f"the engine is gone ({e})"
            self._status = {**self._status, "reason": reason}
            self.state = LoadState.FAILED
            self._done.set()

    def _spawn(self) -> None:
        method = _start_method()
        context = multiprocessing.get_context(method)
        self._conn, child_conn = context.Pipe()
        # Not a daemon: a daemon may not start the tensor-parallel workers. It stops when told,
        # or by itself once the pipe closes (this process gone): a forked child closes its copy
        # of this end first, or the pipe would never close while it lives.
        args = (self.config, child_conn, self.log_level) + ((self._conn,) if method == "fork"
                                                            else ())
        self._process = context.Process(target=run_engine_process, name="engine", args=args)
        self._process.start()
        child_conn.close()
        threading.Thread(target=self._read, name="engine-process-reader", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading ended, ready or failed."""
        return self._done.wait(timeout)

    def status(self) -> dict[str, Any]:
        return {**self._status, "status": str(self.state)}

    def stats(self) -> dict[str, Any] | None:
        """The engine's counters and gauges as of its last step or abort."""
        return self._stats

    def failure(self) -> str | None:
        if self.error is not None:
            return f"the engine process stopped: {self.error}"
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine process (its step ends first); kill it past `timeout`. Idempotent."""
        self._is_stopping = True
        process = self._process
        if process is None:
            return
        if self.state is LoadState.READY:
            with contextlib.suppress(OSError):
                self._send("shutdown", None)
            process.join(timeout)
        if process.is_alive():
            process.terminate()
            process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()

    # -- requests --------------------------------------------------------------------------------

    async def _process_inputs(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> EngineRequest:
        return await self._call("process_inputs", request_id, prompt, params)

    async def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        return await self._call("chat_prompt_ids", messages)

    async def _call(self, method: str, *args: Any) -> Any:
        """Run one of the engine's input methods there; its RequestError is raised here."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._calls[call_id] = (loop, future)
        try:
            self._send("call", (call_id, method, args))
            return await future
        except OSError as e:
            raise EngineDeadError(f"the engine stopped: {e!r}") from e
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def _post(self, command: str, payload: object) -> None:
        # If the process is gone the reader has noticed (or will): it ends every stream.
        with contextlib.suppress(OSError):
            self._send(command, payload)

    def _send(self, kind: str, payload: object) -> None:
        with self._send_lock:
            self._conn.send((kind, payload))

    # -- what the engine says ---------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                kind, payload = self._conn.recv()
                self._handle(kind, payload)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message we cannot read: the engine is unusable
            logger.exception("cannot read the engine process's messages")
            self._process.kill()
        self._process.join(5)
        self._on_exit(self._process.exitcode)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "outputs":
            outputs, self._stats = payload
            self._deliver_step(outputs)
        elif kind == "stats":
            self._stats = payload
        elif kind in ("result", "refused", "error"):
            self._settle(kind, *payload)
        elif kind == "status":
            self._status = payload
        elif kind == "ready":
            self.info, self.state = payload, LoadState.READY
            self._done.set()
        elif kind == "failed":
            self._status, self.state = payload, LoadState.FAILED
            self._done.set()
        elif kind == "dead":
            logger.error("the engine's step loop died: %s", payload)
            self._fail_all(RuntimeError(payload))

    def _settle(self, kind: str, call_id: int, *result: Any) -> None:
        with self._lock:
            loop, future = self._calls.get(call_id, (None, None))
        if future is None:
            return  # its caller has gone
        if kind == "result":
            item: Any = result[0]
        elif kind == "refused":
            item = RequestError(*result)
        else:
            item = RuntimeError(result[0])
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_set_future, future, item)

    def _on_exit(self, exitcode: int | None) -> None:
        reason = f"the engine process exited (exit code {exitcode})"
        if self.state is LoadState.LOADING:
            self._status = {**self._status, "reason": reason}
            self.state = LoadState.FAILED
            self._done.set()
        if self.error is None:
            if not self._is_stopping:
                logger.error("%s", reason)
            self._fail_all(RuntimeError(reason))
        with self._lock:
            calls = list(self._calls.values())
        for loop, future in calls:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_future, future, EngineDeadError(reason))


def _set_future(future: asyncio.Future, item: Any) -> None:
    if future.done():
        return
    if isinstance(item, BaseException):
        future.set_exception(item)
    else:
        future.set_result(item)


def _start_method() -> str:
    """"fork" while this process has no other thread and no native thread pool (the server's
    start, before anything imports torch: the engine's process then begins at once, with the
    interpreter and the modules imported so far, 0.21 -> 0.13 s after the server's start);
    "spawn" otherwise: a process with threads, or with OpenMP's pool (torch), is never forked
    (the copy of a pool is dead, and the child's first parallel region would hang)."""
    has_pools = any(name in sys.modules for name in NATIVE_POOL_MODULES)
    is_alone = threading.active_count() == 1 and not has_pools and sys.platform == "linux"
    return "fork" if is_alone else "spawn"

