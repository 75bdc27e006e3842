"""Streams end honestly: past the shutdown grace or past a request's deadline, each open stream
gets a final error record in its own format (SSE error event, TGI error object, the runtime's
ModelStreamError) before it closes, and a plain request gets a 503. The engine is held still with
an event, so nothing here depends on timing."""

from __future__ import annotations

import json
import threading

import boto3
import httpx
import pytest
from botocore.exceptions import EventStreamError

from engine import EngineConfig
from tests.handler.server import serve

GENEROUS = 30.0


def _hold_engine_after(engine, num_steps: int) -> threading.Event:
    """Let `num_steps` steps run, then hold every later step until the returned event is set."""
    release = threading.Event()
    real_step, calls = engine.step, {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] > num_steps:
            release.wait(GENEROUS)
        return real_step()

    engine.step = step
    return release


LONG = {"max_new_tokens": 200, "ignore_eos": True}


def _sse_records(server, route: str, body: dict) -> list[tuple[str | None, dict]]:
    records, event = [], None
    with httpx.stream("POST", server.url + route, json=body, timeout=GENEROUS) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and "[DONE]" not in line:
                records.append((event, json.loads(line[5:])))
                event = None
    return records


def _jsonlines_records(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/invocations", json=body, timeout=GENEROUS,
                      headers={"Accept": "application/jsonlines"}) as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line]


def _runtime_error(server, body: dict) -> dict:
    runtime = boto3.client("sagemaker-runtime", endpoint_url=server.url, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="e", ContentType="application/json", Body=json.dumps(body))
    with pytest.raises(EventStreamError) as info:
        for _ in response["Body"]:
            pass
    return info.value.response["Error"]


@pytest.fixture
def deadline_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), request_timeout=0.5) as server:
        release = _hold_engine_after(server.state.loader.engine, num_steps=2)
        yield server
        release.set()


def test_past_the_deadline_each_stream_format_ends_with_an_error_record(deadline_server):
    server = deadline_server
    (event, last), *_ = reversed(_sse_records(server, "/v1/completions", {
        "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}))
    assert event == "error" and "deadline" in last["error"]["message"]
    assert last["choices"][0]["finish_reason"] == "error"

    tgi = _jsonlines_records(server, {"inputs": "Hello", "parameters": LONG, "stream": True})
    assert tgi[-1]["details"]["finish_reason"] == "error" and "deadline" in tgi[-1]["error"]

    error = _runtime_error(server, {"inputs": "Hello", "parameters": LONG})
    assert error["Code"] == "ModelStreamError" and "deadline" in error["Message"]

    plain = httpx.post(server.url + "/invocations", json={"inputs": "Hi", "parameters": LONG},
                       timeout=GENEROUS)
    assert plain.status_code == 503 and "deadline" in plain.json()["error"]["message"]


def test_past_the_shutdown_grace_open_streams_end_with_an_error_record(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), graceful_shutdown_seconds=1.0) as server:
        release = _hold_engine_after(server.state.loader.engine, num_steps=2)
        results: dict = {}

        def sse() -> None:
            results["sse"] = _sse_records(server, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
                "ignore_eos": True, "stream": True})

        def tgi() -> None:
            results["tgi"] = _jsonlines_records(
                server, {"inputs": "Hello", "parameters": LONG, "stream": True})

        clients = [threading.Thread(target=sse), threading.Thread(target=tgi)]
        for client in clients:
            client.start()
        def num_open() -> int:
            service = server.state.service
            return service.llm.num_pending if service is not None else 0

        while num_open() < 2:  # both streams are open (and the engine held still)
            threading.Event().wait(0.01)
        server.server.should_exit = True  # what SIGTERM does
        for client in clients:
            client.join(GENEROUS)
        release.set()
        event, last = results["sse"][-1]
        assert event == "error" and "shutting down" in last["error"]["message"]
        assert results["tgi"][-1]["details"]["finish_reason"] == "error"
        assert "shutting down" in results["tgi"][-1]["error"]
