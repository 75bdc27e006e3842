"""Every bad input gets a clear JSON error with the right status; nothing leaks and other
requests are unharmed."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from engine import EngineConfig
from tests.handler.server import serve


def _post(server, body, **kwargs) -> httpx.Response:
    if "content" not in kwargs:
        kwargs["json"] = body
    return httpx.post(server.url + "/invocations", timeout=30, **kwargs)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"inputs": 5}, "inputs"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": -3}}, "parameters.max_new_tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, "parameters.max_new_tokens"),
        ({"inputs": "hi", "parameters": {"temperature": "hot"}}, "parameters.temperature"),
        ({"inputs": "hi", "parameters": {"stop": 7}}, "parameters.stop"),
        ({"inputs": "hi", "parameters": {"stop": [{"a": 1}]}}, "parameters.stop[0]"),
        ({"prompt": {"x": 1}}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": "two"}, "n"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
        ({"prompt": "hello " * 400, "max_tokens": 10}, "prompt"),  # longer than the context
        ({"nothing": 1}, "body"),
    ],
)
def test_schema_errors_are_422_naming_the_field(tiny_server, body, param):
    response = _post(tiny_server, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split(".")[-1].split("[")[0] in error["message"]


def test_invalid_json_is_400(tiny_server):
    response = _post(tiny_server, None, content=b"{not json",
                     headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_non_json_content_type_is_415(tiny_server):
    response = _post(tiny_server, None, content=b"inputs=hi",
                     headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "text/plain" in response.json()["error"]["message"]


def test_body_over_6_mb_is_413(tiny_server):
    body = json.dumps({"inputs": "x" * (6 * 1024 * 1024)}).encode()
    response = _post(tiny_server, None, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_bad_requests_leave_no_state(tiny_server):
    for body in ({"prompt": "hello " * 400}, {"inputs": "hi", "parameters": {"top_p": 5}}):
        _post(tiny_server, body)
    tiny_server.wait_idle()
    free, total = tiny_server.free_blocks()
    assert free == total
    assert _post(tiny_server, {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}).json()


def test_api_key(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), api_key="sesame") as server:
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        denied = _post(server, body)
        assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        allowed = _post(server, body, headers={"Authorization": "Bearer sesame"})
        assert allowed.status_code == 200
        assert httpx.get(server.url + "/ping").status_code == 200  # health is never gated


def test_queue_full_is_429_with_retry_after(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), max_pending_requests=2) as server:
        engine = server.state.loader.engine
        release = threading.Event()
        real_step = engine.step
        engine.step = lambda: release.wait(60) and real_step()  # the engine holds still
        body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
        results: list[int] = []
        pending = [threading.Thread(target=lambda: results.append(
            _post(server, body).status_code)) for _ in range(2)]
        for thread in pending:
            thread.start()
        while server.state.service is None or server.state.service.llm.num_pending < 2:
            time.sleep(0.01)
        rejected = _post(server, body)
        release.set()
        for thread in pending:
            thread.join(60)
        assert rejected.status_code == 429 and rejected.headers["Retry-After"] == "1"
        assert "overloaded" in rejected.json()["error"]["message"]
        assert results == [200, 200]


def test_unknown_route_and_method_are_json(tiny_server):
    missing = httpx.get(tiny_server.url + "/nope")
    assert missing.status_code == 404 and "/nope" in missing.json()["error"]["message"]
    wrong = httpx.get(tiny_server.url + "/invocations")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == 405
