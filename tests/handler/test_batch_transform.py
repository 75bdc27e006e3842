"""SageMaker Batch Transform with SplitType=Line and BatchStrategy=MultiRecord: several JSON
records, one per line, in one body; the answer is one JSON line per record, in order, each the
same as that record sent alone."""

from __future__ import annotations

import json

import httpx
import pytest

RECORDS = [
    {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 6}},
    {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0},
    {"inputs": ["Hello", "Goodbye"], "parameters": {"max_new_tokens": 4}},
]


def _alone(server, record: dict) -> object:
    response = httpx.post(server.url + "/invocations", json=record, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _comparable(answer: object) -> object:
    # OpenAI answers carry an id and a creation time of their own
    if isinstance(answer, dict) and "choices" in answer:
        return [c["text"] for c in answer["choices"]], answer["usage"]
    return answer


@pytest.mark.parametrize("content_type", ["application/jsonlines", "application/json"])
def test_one_line_per_record_in_order(tiny_server, content_type):
    body = "\n".join(json.dumps(r) for r in RECORDS) + "\n"
    response = httpx.post(tiny_server.url + "/invocations", content=body, timeout=60,
                          headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    lines = response.text.splitlines()
    assert len(lines) == len(RECORDS)
    for line, record in zip(lines, RECORDS, strict=True):
        assert _comparable(json.loads(line)) == _comparable(_alone(tiny_server, record))


def test_a_bad_record_is_named_and_nothing_leaks(tiny_server):
    body = json.dumps(RECORDS[0]) + "\n" + json.dumps({"inputs": ""}) + "\n"
    response = httpx.post(tiny_server.url + "/invocations", content=body,
                          headers={"Content-Type": "application/jsonlines"})
    assert response.status_code == 422 and "record 2" in response.json()["error"]["message"]
    not_json = httpx.post(tiny_server.url + "/invocations", content=b'{"inputs": "a"}\n{oops\n')
    assert not_json.status_code == 400
    on_v1 = httpx.post(tiny_server.url + "/v1/completions",
                       content=b'{"prompt": "a"}\n{"prompt": "b"}\n')
    assert on_v1.status_code == 400  # one request per body on OpenAI's routes
    tiny_server.wait_idle()
    free, total = tiny_server.free_blocks()
    assert free == total
