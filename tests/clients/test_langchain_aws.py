"""langchain-aws' SagemakerEndpoint, plain and streaming (its stream path reads the payload line
by line: `Accept: application/jsonlines` gives it one JSON record per line)."""

from __future__ import annotations

import json

from langchain_aws.llms import SagemakerEndpoint
from langchain_aws.llms.sagemaker_endpoint import LLMContentHandler

from tests.prompts import MAX_TOKENS, PROMPT


class TGIContentHandler(LLMContentHandler):
    content_type = "application/json"
    accepts = "application/json"

    def transform_input(self, prompt: str, model_kwargs: dict) -> bytes:
        return json.dumps({"inputs": prompt, "parameters": model_kwargs,
                           "stream": model_kwargs.pop("stream", False)}).encode()

    def transform_output(self, output) -> str:
        if isinstance(output, bytes):  # the stream path: one JSON line per token
            return json.loads(output)["token"]["text"]
        return json.loads(output.read())[0]["generated_text"]


def _llm(runtime, streaming: bool) -> SagemakerEndpoint:
    return SagemakerEndpoint(
        endpoint_name="my-endpoint", client=runtime, content_handler=TGIContentHandler(),
        model_kwargs={"max_new_tokens": MAX_TOKENS}, streaming=streaming,
        endpoint_kwargs={"Accept": "application/jsonlines"} if streaming else None,
    )


def test_langchain_sagemaker_endpoint(runtime, expected):
    assert _llm(runtime, streaming=False).invoke(PROMPT) == expected


def test_langchain_sagemaker_endpoint_streams(runtime, expected):
    chunks = list(_llm(runtime, streaming=True).stream(PROMPT))
    assert len(chunks) > 1
    assert "".join(chunks) == expected
