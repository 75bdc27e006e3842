"""A real uvicorn serving the app on 127.0.0.1 in a background thread, for the tests."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine import EngineConfig
from handler.app import build_app
from handler.server import build_server
from handler.settings import ServerSettings
from handler.state import ServerState


@dataclass
class RunningServer:
    url: str
    state: ServerState
    server: Any = None  # the uvicorn server

    def free_blocks(self) -> tuple[int, int]:
        bm = self.state.loader.engine.block_manager
        return bm.num_free_blocks, bm.num_blocks

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no request (aborts travel through the engine thread)."""
        engine = self.state.loader.engine
        deadline = time.monotonic() + timeout
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.02)


@contextmanager
def serve(engine_config: EngineConfig, wait_ready: bool = True, **settings) -> Iterator[
        RunningServer]:
    """The app behind the server `python -m handler` runs (guarded connections, timeouts)."""
    settings.setdefault("graceful_shutdown_seconds", 5.0)
    settings.setdefault("log_level", "warning")
    # The engine in this process, so tests can reach into it (faults, block counts); the
    # engine-process tests ask for the process.
    settings.setdefault("engine_process", False)
    server_settings = ServerSettings(host="127.0.0.1", **settings)
    app = build_app(server_settings, engine_config)
    server = build_server(app, server_settings, port=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if server_settings.ssl_certfile else "http"
    running = RunningServer(f"{scheme}://127.0.0.1:{port}", app.state.server, server)
    if wait_ready:
        running.state.loader.wait(120)
        _, status = running.state.health()
        assert status["status"] == "ready", status
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, max_polls: int = 600) -> None:
    """Until a server started as a process answers /ping 200 (a liveness bound, not a timing
    assert); fails with its output if it exits first."""
    import httpx

    for _ in range(max_polls):
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        try:
            if httpx.get(url + "/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")
