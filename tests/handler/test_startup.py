"""Starting up: /ping tells the truth during a slow load, after a failed one, and in the lazy
(serverless) mode; `entrypoint.sh serve` in a directory laid out like /opt/ml answers and stops
cleanly on SIGTERM with a request in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from engine import EngineConfig
from engine.weights import default_model_path
from tests.handler.server import free_port, serve, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _hold_gguf_load(monkeypatch, after_tensors: int) -> tuple[threading.Event, threading.Event]:
    """Hold every GGUF load after `after_tensors` tensors until `release` is set."""
    from engine.weights.gguf import GGUFSource

    held, release = threading.Event(), threading.Event()
    real_tensors = GGUFSource._tensors

    def tensors(self, reader):
        for i, item in enumerate(real_tensors(self, reader)):
            if i == after_tensors:
                held.set()
                release.wait(120)
            yield item

    monkeypatch.setattr(GGUFSource, "_tensors", tensors)
    return held, release


def test_ping_during_a_held_load_tells_the_phase_and_bytes(monkeypatch):
    held, release = _hold_gguf_load(monkeypatch, after_tensors=50)
    with serve(EngineConfig(model="", max_model_len=1024), wait_ready=False) as server:
        first = httpx.get(server.url + "/ping", timeout=30)
        assert first.status_code == 503 and first.json()["status"] == "loading"
        assert first.json()["total_bytes"] > 0  # known from the first moment
        assert held.wait(120)
        during = httpx.get(server.url + "/ping", timeout=30).json()
        assert during["status"] == "loading" and during["phase"] == "weights"
        assert 0 < during["loaded_bytes"] < during["total_bytes"]
        # where the start spent its time so far: every phase begun, in order
        assert list(during["phase_seconds"]) == ["imports", "config", "weights"]
        assert during["first_byte_at"] >= during["phase_started_at"]["weights"]
        metrics = httpx.get(server.url + "/metrics").text
        assert 'llm_model_load_phase{phase="weights"} 1.0' in metrics
        assert 'llm_model_load_phase_seconds{phase="config"}' in metrics
        release.set()
        assert server.state.loader.wait(120)
        ready = httpx.get(server.url + "/ping", timeout=30)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


def _modules_after(imports: str, names: set[str]) -> list[str]:
    code = f"import json, sys, {imports}; print(json.dumps(sorted({names!r} & set(sys.modules))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def test_the_server_answers_before_torch_or_the_request_protocol_is_imported():
    """/ping needs neither torch nor transformers nor pydantic: the app is built without them;
    the loader imports torch and the lifespan the request routes while the server answers."""
    heavy = {"torch", "transformers", "pydantic", "handler.protocol", "handler.routes"}
    assert _modules_after("handler.app, handler.server", heavy) == []
    assert _modules_after("handler.routes", {"torch", "transformers"}) == []


def test_a_request_while_the_routes_import_waits_off_the_event_loop(monkeypatch):
    """The first requests of a start may come before the lifespan's import of the request
    routes ends: they wait for it on a worker thread, and /ping keeps answering meanwhile (on
    the event loop it would wait behind them: here, for good)."""
    from handler import app as app_module

    real_routes = app_module._routes_module
    pinged, calls = threading.Event(), []

    def slow_import():
        calls.append(threading.current_thread().name)
        assert pinged.wait(60), "/ping did not answer while the routes were importing"
        return real_routes()

    with serve(EngineConfig(model="", max_model_len=1024)) as server:
        monkeypatch.setattr(app_module, "_routes", None)
        monkeypatch.setattr(app_module, "_routes_module", slow_import)
        waiting = {}
        request = threading.Thread(target=lambda: waiting.setdefault(
            "response", httpx.get(server.url + "/v1/models", timeout=60)))
        request.start()
        while not calls:  # the request is waiting for the import
            threading.Event().wait(0.01)
        assert httpx.get(server.url + "/ping", timeout=30).status_code == 200
        pinged.set()
        request.join(60)
        assert waiting["response"].status_code == 200
        assert waiting["response"].json()["data"][0]["id"]


def test_failed_load_is_500_with_the_reason(tmp_path):
    missing = str(tmp_path / "no-model-here")
    with serve(EngineConfig(model=missing), wait_ready=False) as server:
        server.state.loader.wait(30)
        response = httpx.get(server.url + "/ping")
        assert response.status_code == 500
        assert response.json()["status"] == "failed" and missing in response.json()["reason"]
        invocation = httpx.post(server.url + "/invocations", json={"inputs": "hi"})
        assert invocation.status_code == 503 and "failed to load" in invocation.text


def test_lazy_mode_loads_on_the_first_request(monkeypatch):
    held, release = _hold_gguf_load(monkeypatch, after_tensors=10)
    with serve(EngineConfig(model="", max_model_len=1024), wait_ready=False,
               load_on_first_request=True, first_request_load_timeout=0.3) as server:
        assert httpx.get(server.url + "/ping").status_code == 200
        assert server.state.loader.state == "idle"
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
        too_soon = httpx.post(server.url + "/invocations", json=body, timeout=30)
        assert too_soon.status_code == 503 and "loading" in too_soon.text
        assert server.state.loader.state == "loading"  # the first request started it (held)
        assert httpx.get(server.url + "/ping").status_code == 200  # still healthy meanwhile
        release.set()
        server.state.loader.wait(120)
        assert httpx.post(server.url + "/invocations", json=body, timeout=30).status_code == 200


def test_entrypoint_serve_in_an_opt_ml_layout_and_sigterm(tmp_path):
    model_dir = tmp_path / "opt" / "ml" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / default_model_path().name).symlink_to(default_model_path())
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
           "SM_LLM_MODEL": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(port),
           "SM_LLM_MAX_MODEL_LEN": "1024", "SM_LLM_HOST": "127.0.0.1"}
    process = subprocess.Popen([str(ROOT / "entrypoint.sh"), "serve"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}}
        first = httpx.post(url + "/invocations", json=body, timeout=60)
        assert first.status_code == 200 and first.json()[0]["generated_text"]
        long_body = {"inputs": "Tell me a story.", "stream": True,
                     "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
        with httpx.stream("POST", url + "/invocations", json=long_body, timeout=60,
                          headers={"Accept": "application/jsonlines"}) as response:
            lines = response.iter_lines()
            records = [json.loads(next(lines))]  # the request is surely in flight now
            process.send_signal(signal.SIGTERM)
            records += [json.loads(line) for line in lines if line]
        assert process.wait(60) == 0
        assert len(records) == 60 and records[-1]["details"]["finish_reason"] == "length"
    finally:
        if process.poll() is None:
            process.kill()
