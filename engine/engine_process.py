"""The engine in a process of its own, as vLLM v1 runs its engine core.

In one process the server's event loop (HTTP, JSON, SSE) and the engine's step share a GIL: the
loop takes it between the ~300 ops of a step while the step's OpenMP threads wait, and a load
(import torch, a GGUF dequantization) holds it long enough to stall /ping. Here the engine owns
its interpreter; the server keeps only sockets and JSON.

One duplex pipe, pickled messages `(kind, payload)`:
  server -> engine: ("load", None) to begin loading (the engine's modules import before it),
                    ("call", (call_id, method, args)) for tokenizing and chat templates,
                    ("add", EngineRequest), ("abort", request_id), ("shutdown", None)
  engine -> server: ("status", the loader's status) while loading, then ("ready", EngineInfo) or
                    ("failed", status); ("result" | "refused" | "error", (call_id, ...));
                    ("outputs", (outputs, stats)) after each step; ("stats", stats);
                    ("dead", reason) if the step loop dies.
The module imports nothing heavy: the server imports it to name the process's entry.
"""

from __future__ import annotations

import gc
import importlib
import logging
import signal
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from engine.inbox import IDLE_POLL, IDLE_WAIT, Inbox

if TYPE_CHECKING:
    from engine.background import BackgroundLoader
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

STATUS_INTERVAL = 0.05  # seconds between load status reports
CALLABLE_METHODS = frozenset({"process_inputs", "chat_prompt_ids"})


class Channel:
    """The pipe's sending end, shared by the step loop, the reader and the loader."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, kind: str, payload: object) -> None:
        with self._lock:
            self.conn.send((kind, payload))


def run_engine_process(config: EngineConfig, conn: Connection, log_level: str,
                       server_end: Connection | None = None) -> None:
    """The process's entry: load, report, then step until told to stop or the server is gone.
    `server_end`: the server's end of the pipe, which a forked child holds a copy of."""
    if server_end is not None:
        server_end.close()
    # `force`: a forked child has the server's handler, without the tag.
    logging.basicConfig(level=log_level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    # Ctrl-C reaches the whole process group; the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The weights are read from the first moment, told to load or not yet (a serverless start's
    # first request comes at once). A CPU load's read runs in a fetch process of its own, which
    # takes none of this one's GIL (engine/weights/fetch.py); any other read's setup (boto3's
    # import, its client, the GET: ~0.3 s) comes before torch's import rather than beside it,
    # where the two took turns at the GIL and both ended later.
    from engine.background import BackgroundLoader

    loader = BackgroundLoader(config)
    loader.start_reading()
    if not _wait_for_load(conn):
        loader.abandon_reading()
        return
    channel = Channel(conn)
    engine = _load(loader, channel)
    if engine is None:
        return
    try:
        EngineLoop(engine, conn, channel).run()
    finally:
        engine.shutdown()


def _wait_for_load(conn: Connection) -> bool:
    """Import the engine (torch: ~1.5 s) while the server waits to say "load" (at once, or on
    its first request with `--load-on-first-request`); False if it never does."""
    # Off until the load has ended (the loader turns it back on): see BackgroundLoader._load.
    gc.disable()
    threading.Thread(target=importlib.import_module, args=("engine.llm_engine",),
                     name="engine-imports", daemon=True).start()
    try:
        kind, _ = conn.recv()
    except (EOFError, OSError):
        return False
    return kind == "load"


def _load(loader: BackgroundLoader, channel: Channel) -> LLMEngine | None:
    from engine.background import LoadState

    loader.start()
    while not loader.wait(STATUS_INTERVAL):
        channel.send("status", loader.status())
    channel.send("status", loader.status())
    if loader.state is not LoadState.READY:
        channel.send("failed", loader.status())
        return None
    channel.send("ready", loader.info)
    return loader.engine


class EngineLoop:
    """Steps the engine while a reader thread takes in the server's messages."""

    def __init__(self, engine: LLMEngine, conn: Connection, channel: Channel):
        self.engine, self.conn, self.channel = engine, conn, channel
        self._inbox = Inbox()
        self._stopping = False
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                kind, payload = self.conn.recv()
                if kind == "shutdown":
                    break
                if kind == "call":
                    self._answer(*payload)
                    continue
                self._inbox.post(kind, payload)
        except (EOFError, OSError):
            logger.warning("the server is gone; the engine stops")
        self._stopping = True
        self._inbox.wake()

    def _answer(self, call_id: int, method: str, args: tuple) -> None:
        """Tokenizing runs here, beside the step, as it runs beside it on a server thread."""
        from engine.input_processor import RequestError

        try:
            if method not in CALLABLE_METHODS:
                raise ValueError(f"the engine has no method {method!r} to call")
            value = getattr(self.engine, method)(*args)
        except RequestError as e:
            self.channel.send("refused", (call_id, str(e), e.param))
        except Exception as e:  # noqa: BLE001 - the caller's request fails, not the engine
            self.channel.send("error", (call_id, f"{type(e).__name__}: {e}"))
        else:
            self.channel.send("result", (call_id, value))

    def _drain_inbox(self) -> bool:
        inbox = self._inbox.take_all()
        for kind, payload in inbox:
            if kind == "add":
                self.engine.add_processed(payload)
            else:
                self.engine.abort(payload)
        return bool(inbox)

    def run(self) -> None:
        is_idle_work_left = False  # until the loop has been idle for IDLE_WAIT
        try:
            while not self._stopping:
                if self._drain_inbox():
                    self.channel.send("stats", self.engine.stats())  # aborts free blocks
                if not self.engine.has_unfinished_requests():
                    if not self._inbox.wait(timeout=IDLE_POLL if is_idle_work_left else IDLE_WAIT):
                        is_idle_work_left = self.engine.when_idle()
                    self.engine.check_workers()  # a dead rank is reported even while idle
                    continue
                is_idle_work_left = False
                outputs = self.engine.step()
                self.channel.send("outputs", (outputs, self.engine.stats()))
        except (BrokenPipeError, EOFError):
            logger.warning("the server is gone; the engine stops")
        except BaseException as e:  # noqa: BLE001 - reported, then the process ends
            logger.exception("engine loop died")
            self.channel.send("dead", f"{type(e).__name__}: {e}")
