"""LiteLLM's SageMaker providers (`sagemaker/`: TGI body; `sagemaker_chat/`: OpenAI chat body)
against the local container's runtime routes."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from tests.clients.conftest import AWS_ENV
from tests.prompts import MAX_TOKENS

MESSAGES = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def litellm():
    # No network here: LiteLLM must read its model price map from the package, not GitHub.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**AWS_ENV, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}.items():
            patch.setenv(name, value)
        import litellm

        yield litellm


def test_litellm_sagemaker_chat(litellm, tiny_server, tiny_offline):
    reference = tiny_offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    url = tiny_server.url + "/endpoints/my-endpoint/invocations"
    response = litellm.completion(model="sagemaker_chat/my-endpoint", messages=MESSAGES,
                                  max_tokens=MAX_TOKENS, temperature=0,
                                  sagemaker_base_url=url)
    assert response.choices[0].message.content == reference.text
    assert response.usage.completion_tokens == len(reference.token_ids)


def test_litellm_sagemaker_tgi(litellm, tiny_server, tiny_offline):
    # LiteLLM sends a single user message as the plain prompt, in a TGI body.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    [reference] = tiny_offline.generate([MESSAGES[0]["content"]], params)
    endpoint = tiny_server.url + "/endpoints/my-endpoint"
    response = litellm.completion(model="sagemaker/my-endpoint", messages=MESSAGES,
                                  max_tokens=MAX_TOKENS, temperature=0,
                                  sagemaker_base_url=endpoint + "/invocations")
    assert response.choices[0].message.content == reference.text
    chunks = litellm.completion(model="sagemaker/my-endpoint", messages=MESSAGES,
                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                sagemaker_base_url=endpoint + "/invocations-response-stream")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
