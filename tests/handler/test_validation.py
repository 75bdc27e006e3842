"""Validation at the edge, against the model: every token id a request carries is checked against
the vocabulary and the int64 range (a 422 naming the field and the value), and a request that
would once stop the engine for good now leaves it serving. Hopeless prompts are refused before
any tokenizing, and tokenizing never blocks the event loop."""

from __future__ import annotations

import threading

import httpx
import pytest

VOCAB = 384  # the tiny models' vocabulary


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=30)


@pytest.mark.parametrize(
    ("route", "body", "param", "value"),
    [
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "min_tokens": 2,
                             "stop_token_ids": [99999]}, "stop_token_ids", "99999"),
        ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [-1]}, "stop_token_ids[0]", "-1"),
        ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [2**70]}, "stop_token_ids[0]",
         str(2**70)),
        ("/v1/completions", {"prompt": [5, VOCAB]}, "prompt", str(VOCAB)),
        ("/v1/completions", {"prompt": [5, -3]}, "prompt[1]", "-3"),
        ("/v1/completions", {"prompt": [[5], [6, 10**6]]}, "prompt", str(10**6)),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"99999": 5}}, "logit_bias", "99999"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "stop_token_ids": [VOCAB]}, "stop_token_ids", str(VOCAB)),
        ("/invocations", {"prompt": "Hi", "temperature": float("nan")}, None, None),
    ],
)
def test_token_ids_are_checked_against_the_model(tiny_server, route, body, param, value):
    response = _post(tiny_server, route, body) if param else httpx.post(
        tiny_server.url + route, content=b'{"prompt": "Hi", "temperature": NaN}',
        headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    if param is not None:
        assert response.status_code == 422
        assert error["param"] == param and value in error["message"], error
    # The engine is unharmed: the same server still answers.
    ok = _post(tiny_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert ok.status_code == 200


def test_a_hopeless_prompt_is_refused_without_tokenizing(tiny_server, monkeypatch):
    tokenizer = tiny_server.state.loader.engine.input_processor.tokenizer
    calls = []
    real_encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(1) or real_encode(
        *a, **k))
    huge = "hello " * 900_000  # 5.4 MB, far past the tiny model's 512-token context
    for route, body in [("/invocations", {"inputs": huge}),
                        ("/v1/completions", {"prompt": huge}),
                        ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                "content": huge}]})]:
        response = _post(tiny_server, route, body)
        assert response.status_code == 422, response.text
        assert "cannot fit" in response.json()["error"]["message"]
    assert calls == []


def test_tokenizing_never_blocks_the_event_loop(tiny_server, monkeypatch):
    tokenizer = tiny_server.state.loader.engine.input_processor.tokenizer
    entered, release = threading.Event(), threading.Event()
    real_encode = tokenizer.encode

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    result = {}
    worker = threading.Thread(target=lambda: result.update(response=_post(
        tiny_server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 2})))
    worker.start()
    try:
        assert entered.wait(30)
        # Tokenizing is held mid-way; the event loop still answers.
        assert httpx.get(tiny_server.url + "/ping", timeout=10).status_code == 200
    finally:
        release.set()
        worker.join(30)
    assert result["response"].status_code == 200
