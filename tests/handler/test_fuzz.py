"""No body gets a 5xx on any route: a table of malformed bodies, headers and encodings over every
POST route (the runtime routes and the streaming ones included). Each answer is a 4xx JSON error
that names the problem, and /ping and a normal request still work after each."""

from __future__ import annotations

import json

import httpx
import pytest

ROUTES = ("/invocations", "/v1/completions", "/v1/chat/completions",
          "/endpoints/e/invocations", "/endpoints/e/invocations-response-stream",
          "/", "/generate", "/generate_stream")

GOOD = {
    "/invocations": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}
BASE = {"inputs": "Hi", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}

RAW_BODIES = [
    b"", b"{", b"[]", b"null", b"42", b'"inputs"', b"{not json}", b'{"inputs": "a"',
    b'{"inputs": "abc \\ud800"}', b'{"prompt": "\\udfff tail"}',
    b'{"messages": [{"role": "user", "content": "x \\ud83d"}]}',
    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"inputs": "hi", "parameters": {"seed": ' + b"1" * 4400 + b"}}",
    b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}',
    b'{"prompt": "hi", "temperature": 1e999}', b'{"inputs": "hi", "parameters": {"top_p": -1e999}}',
    b"\xff\xfe\x00{", b'{"inputs": "\xc3\x28"}', b"\x00" * 64,
]

# Every field, given values of every wrong type.
FIELD_VALUES = {
    "inputs": [5, None, [], [1, 2], {"a": 1}, "", [""], True],
    "parameters.max_new_tokens": [-3, 0, "5", 1.5, 10**9, True, [5], 2**70],
    "parameters.temperature": ["hot", -1, [1], {"t": 1}, True],
    "parameters.top_p": [0, 5, "x", -0.5],
    "parameters.top_k": [-5, 1.5, "k"],
    "parameters.stop": [7, [1], [""], ["a"] * 40, {"s": 1}],
    "parameters.seed": [-1, "s", 2**64, 1.5],
    "parameters.repetition_penalty": [0, -1, "r"],
    "parameters.details": ["yes", 1],
    "parameters": ["p", [1], 5],
    "stream": ["yes", 1, []],
    "prompt": [None, {"x": 1}, [], [[]], [1, "a"], [-1], [2**70], [99999], [[1], "a"], 3.5],
    "max_tokens": [0, -1, "16", 2**63, [16]],
    "n": ["two", 0, 100, 1.5],
    "logprobs": [-1, 50, "x"],
    "stop_token_ids": [[99999], [-1], [2**70], ["a"], 5],
    "logit_bias": [{"abc": 1}, {"5": "x"}, {"5": 1000}, [1], {"99999": 1}],
    "min_tokens": [-1, "m", 10**8],
    "stream_options": ["x", {"include_usage": "y"}],
    "messages": ["hello", [], [{"content": "no role"}], [{"role": "wizard", "content": "x"}],
                 [{"role": "user", "content": {"a": 1}}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], [5]],
    "max_completion_tokens": [0, "x"],
    "top_logprobs": [-1, 99],
    "tools": [[{"type": "function"}]],
    "response_format": [{"type": "json_object"}],
}


def _set(body: dict, path: str, value) -> dict:
    body = json.loads(json.dumps(body))
    *parents, leaf = path.split(".")
    node = body
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return body


def _field_cases() -> list[tuple[str, bytes, dict]]:
    cases = []
    for path, values in FIELD_VALUES.items():
        root = path.split(".")[0]
        shape = ("inputs" if root in ("inputs", "parameters", "stream") else
                 "messages" if root in ("messages", "max_completion_tokens", "top_logprobs",
                                        "tools", "response_format") else "prompt")
        for value in values:
            base = {k: v for k, v in BASE.items() if k == shape}
            body = _set(base, path, value)
            cases.append((f"{path}={value!r}"[:60], json.dumps(body).encode(), {}))
    return cases


HEADER_CASES = [
    ("text/plain", b'{"inputs": "hi"}', {"Content-Type": "text/plain"}),
    ("form", b"inputs=hi", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("octet", b'{"inputs": "hi"}', {"Content-Type": "application/octet-stream"}),
    ("gzip", b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"}),
    ("br", b'{"inputs": "hi"}', {"Content-Encoding": "br"}),
    ("accept png", json.dumps({"inputs": "hi"}).encode(), {"Accept": "image/png"}),
    ("accept html", json.dumps({"prompt": "hi"}).encode(),
     {"Accept": "text/html, image/png"}),
    ("accept nothing", json.dumps({"inputs": "hi", "stream": True}).encode(),
     {"Accept": "application/xml"}),
    ("accept q0", json.dumps({"inputs": "hi"}).encode(), {"Accept": "application/json;q=0"}),
    ("big", json.dumps({"inputs": "x" * (7 << 20)}).encode(), {}),
]

CASES = ([(f"raw {i}", body, {}) for i, body in enumerate(RAW_BODIES)]
         + _field_cases() + HEADER_CASES)


@pytest.mark.parametrize("route", ROUTES)
def test_no_body_gets_a_5xx(tiny_server, route):
    assert len(CASES) * len(ROUTES) >= 150
    client = httpx.Client(base_url=tiny_server.url, timeout=30)
    good_route = route if route in GOOD else "/invocations"
    for name, body, headers in CASES:
        headers = {"Content-Type": "application/json", **headers}
        if route.endswith("-response-stream") and "Accept" in headers:
            headers["X-Amzn-SageMaker-Accept"] = headers.pop("Accept")
        response = client.post(route, content=body, headers=headers)
        status = response.status_code
        assert 400 <= status < 500, (name, status, response.text[:300])
        error = response.json()
        if status == 424:  # the runtime's ModelError around the container's own 4xx
            assert 400 <= error["OriginalStatusCode"] < 500, (name, error)
            message = error["OriginalMessage"]
        elif route in ("/", "/generate", "/generate_stream"):  # TGI's error shape
            assert error["error_type"] in ("validation", "generation", "overloaded"), error
            message = error["error"]
        else:
            message = error["error"]["message"]
        assert message and "internal" not in message.lower(), (name, message)
        assert client.get("/ping").status_code == 200, name
    ok = client.post(good_route, json=GOOD.get(route, GOOD["/invocations"]))
    assert ok.status_code == 200, ok.text
    tiny_server.wait_idle()
    free, total = tiny_server.free_blocks()
    assert free == total
