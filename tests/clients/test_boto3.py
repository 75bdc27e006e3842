"""boto3's SageMaker runtime client against the local container, as against AWS."""

from __future__ import annotations

import json

import pytest

from tests.prompts import PROMPT, tgi_body


def test_boto3_invoke_endpoint(runtime, expected):
    response = runtime.invoke_endpoint(
        EndpointName="my-endpoint", ContentType="application/json", Body=tgi_body(),
        CustomAttributes="trace=abc",
    )
    assert json.loads(response["Body"].read()) == [{"generated_text": expected}]
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "trace=abc"
    assert response["ContentType"] == "application/json"


def test_boto3_invoke_endpoint_with_response_stream(runtime, expected):
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="my-endpoint", ContentType="application/json", Body=tgi_body(stream=True),
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
