"""The SageMaker Python SDK's Predictor (what `model.deploy()` returns), plain and streaming."""

from __future__ import annotations

import boto3
import pytest

from tests.prompts import MAX_TOKENS, PROMPT


@pytest.fixture(scope="module")
def predictor(runtime):
    import sagemaker
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    boto_session = boto3.Session(aws_access_key_id="x", aws_secret_access_key="x",
                                 region_name="us-east-1")
    session = sagemaker.Session(boto_session=boto_session, sagemaker_runtime_client=runtime)
    return Predictor("my-endpoint", sagemaker_session=session, serializer=JSONSerializer(),
                     deserializer=JSONDeserializer())


def test_sagemaker_predictor(predictor, expected):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS, "details": True}}
    [result] = predictor.predict(body)
    assert result["generated_text"] == expected
    assert result["details"]["generated_tokens"] == MAX_TOKENS


def test_sagemaker_predictor_streams(predictor, expected):
    import json

    from sagemaker.iterators import LineIterator

    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}}
    lines = predictor.predict_stream(body, initial_args={"Accept": "application/jsonlines"},
                                     iterator=LineIterator)
    records = [json.loads(line) for line in lines if line]
    assert "".join(r["token"]["text"] for r in records) == expected
    assert records[-1]["generated_text"] == expected
