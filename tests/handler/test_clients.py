"""Real clients against a real uvicorn: boto3 and the AWS CLI through the SageMaker runtime API,
the OpenAI SDK, TGI and LMI requests and streams. Each gets the offline API's greedy text."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import httpx
import openai
import pytest

from engine import SamplingParams

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def expected(tiny_offline) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return tiny_offline.generate([PROMPT], params)[0].text


@pytest.fixture(scope="module")
def runtime(tiny_server):
    return boto3.client("sagemaker-runtime", endpoint_url=tiny_server.url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x")


def _tgi_body(stream: bool = False) -> str:
    return json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS},
                       "stream": stream})


def test_boto3_invoke_endpoint(runtime, expected):
    response = runtime.invoke_endpoint(
        EndpointName="my-endpoint", ContentType="application/json", Body=_tgi_body(),
        CustomAttributes="trace=abc",
    )
    assert json.loads(response["Body"].read()) == [{"generated_text": expected}]
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "trace=abc"
    assert response["ContentType"] == "application/json"


def test_boto3_invoke_endpoint_with_response_stream(runtime, expected):
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="my-endpoint", ContentType="application/json", Body=_tgi_body(stream=True),
        Accept="application/jsonlines",
    )
    payload = b"".join(e["PayloadPart"]["Bytes"] for e in response["Body"])
    records = [json.loads(line) for line in payload.decode().splitlines()]
    assert "".join(r["token"]["text"] for r in records) == expected
    assert records[-1]["generated_text"] == expected
    assert records[-1]["details"]["finish_reason"] == "length"
    assert response["ContentType"] == "application/jsonlines"


def test_boto3_model_error_carries_the_status(runtime):
    with pytest.raises(runtime.exceptions.ModelError) as info:
        runtime.invoke_endpoint(EndpointName="e", ContentType="application/json",
                                Body=json.dumps({"inputs": PROMPT, "parameters":
                                                 {"max_new_tokens": -1}}))
    assert info.value.response["OriginalStatusCode"] == 422
    assert "max_new_tokens" in info.value.response["OriginalMessage"]


def test_aws_cli_invoke_endpoint(tiny_server, expected, tmp_path):
    out = tmp_path / "out.json"
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "awscli", "sagemaker-runtime", "invoke-endpoint",
         "--endpoint-url", tiny_server.url, "--endpoint-name", "my-endpoint",
         "--content-type", "application/json", "--body", _tgi_body(), str(out)],
        check=True, env=env, timeout=60, capture_output=True,
    )
    assert json.loads(out.read_text()) == [{"generated_text": expected}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")


def test_openai_completions(client, expected):
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert result.choices[0].text == expected
    assert result.usage.completion_tokens == MAX_TOKENS
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


def test_openai_logit_bias_is_honoured(client, tiny_offline):
    forced = SamplingParams(temperature=0.0, max_tokens=3, logit_bias={42: 100.0})
    expected_ids = tiny_offline.generate([PROMPT], forced)[0].token_ids
    assert expected_ids == [42, 42, 42]
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                       logit_bias={"42": 100}, logprobs=0)
    tokens = result.choices[0].logprobs.tokens
    assert len(tokens) == 3 and len(set(tokens)) == 1
    assert result.choices[0].text == tiny_offline.generate([PROMPT], forced)[0].text


def test_openai_chat(client, tiny_offline):
    messages = [{"role": "user", "content": "Hello world!"}]
    reference = tiny_offline.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    result = client.chat.completions.create(model="tiny", messages=messages,
                                            max_tokens=MAX_TOKENS, temperature=0)
    assert result.choices[0].message.content == reference.text
    assert result.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages,
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == reference.text
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_tgi_sse_stream_parsed_line_by_line(tiny_server, expected):
    tokens, final = [], None
    with httpx.stream("POST", tiny_server.url + "/invocations", content=_tgi_body(stream=True),
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


def test_openai_stop_ends_text_tokens_and_logprobs_together(client, expected):
    stop = expected[3:6]
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
              "stop": [stop], "logprobs": 0}
    whole = client.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.text == expected[: expected.index(stop)]
    assert choice.finish_reason == "stop"
    assert len(choice.logprobs.tokens) == whole.usage.completion_tokens
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed_tokens = [t for c in chunks if c.choices[0].logprobs
                       for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == choice.logprobs.tokens
