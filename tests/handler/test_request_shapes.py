"""The request shapes users post with plain HTTP: TGI/LMI bodies, SSE read line by line, LMI
batches with details, full text and stop sequences."""

from __future__ import annotations

import json

import httpx

from engine import SamplingParams
from tests.prompts import MAX_TOKENS, PROMPT, tgi_body


def test_tgi_sse_stream_parsed_line_by_line(tiny_server, expected):
    tokens, final = [], None
    with httpx.stream("POST", tiny_server.url + "/invocations", content=tgi_body(stream=True),
                      headers={"Content-Type": "application/json",
                               "Accept": "text/event-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data:")
            record = json.loads(line[len("data:"):])
            tokens.append(record["token"]["text"])
            final = record
    assert "".join(tokens) == expected
    assert final["generated_text"] == expected


def test_lmi_batch_and_details(tiny_server, tiny_offline):
    prompts = [PROMPT, "Hello world"]
    body = {"inputs": prompts, "parameters": {"max_new_tokens": 6, "details": True}}
    result = httpx.post(tiny_server.url + "/invocations", json=body).json()
    reference = tiny_offline.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [r["generated_text"] for r in result] == [o.text for o in reference]
    details = result[0]["details"]
    assert details["generated_tokens"] == 6 and details["finish_reason"] == "length"
    assert [t["id"] for t in details["tokens"]] == reference[0].token_ids
    assert all(t["logprob"] <= 0 for t in details["tokens"])


def test_return_full_text_and_stop_sequences(tiny_server, expected):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS,
                                             "return_full_text": True}}
    result = httpx.post(tiny_server.url + "/invocations", json=body).json()
    assert result == [{"generated_text": PROMPT + expected}]
    stop = expected[3:6]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS, "stop": [stop],
                                             "details": True}}
    result = httpx.post(tiny_server.url + "/invocations", json=body).json()[0]
    # As TGI answers: the text keeps the stop sequence, and the tokens join into the text.
    assert result["generated_text"].startswith(expected[: expected.index(stop) + len(stop)])
    details = result["details"]
    assert details["finish_reason"] == "stop_sequence"
    assert "".join(t["text"] for t in details["tokens"]) == result["generated_text"]
    assert details["generated_tokens"] == len(details["tokens"])
    streamed = [json.loads(line[5:]) for line in httpx.post(
        tiny_server.url + "/generate_stream", json=body).text.splitlines() if line]
    assert [e["token"]["id"] for e in streamed] == [t["id"] for t in details["tokens"]]
    assert "".join(e["token"]["text"] for e in streamed) == result["generated_text"]
    assert streamed[-1]["generated_text"] == result["generated_text"]
