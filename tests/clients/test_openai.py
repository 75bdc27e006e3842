"""The OpenAI SDK against the `/v1` routes."""

from __future__ import annotations

import openai
import pytest

from engine import SamplingParams
from tests.prompts import MAX_TOKENS, PROMPT


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


def test_openai_echo_with_logprobs_scores_the_prompt(client, tiny_offline):
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=1, prompt_logprobs=1)
    [reference] = tiny_offline.generate([PROMPT], params)
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                       echo=True, logprobs=1)
    choice = result.choices[0]
    assert choice.text == PROMPT + reference.text
    num_prompt = len(reference.prompt_token_ids)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == num_prompt + 3
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:num_prompt] == pytest.approx(
        [e["logprob"] for e in reference.prompt_logprobs[1:]], abs=1e-5)
    assert logprobs.token_logprobs[num_prompt:] == pytest.approx(
        [e["logprob"] for e in reference.outputs[0].logprobs], abs=1e-5)
