"""huggingface_hub's InferenceClient(base_url=...) on TGI's routes, as its users call it."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as TextGenerationValidationError

from engine import SamplingParams
from tests.prompts import MAX_TOKENS, PROMPT


@pytest.fixture(scope="module")
def client(tiny_server):
    # The suite runs with HF_HUB_OFFLINE=1 (no hub here), which blocks every request the
    # client makes; its requests in this module go to the loopback server only.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(base_url=tiny_server.url)


def test_inference_client_text_generation(client, expected_output):
    assert client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS) == expected_output.text


def test_inference_client_details(client, expected_output):
    result = client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True)
    assert result.generated_text == expected_output.text
    assert result.details.finish_reason == "length"
    assert result.details.generated_tokens == MAX_TOKENS
    assert [t.id for t in result.details.tokens] == expected_output.token_ids


def test_inference_client_stream(client, expected_output):
    texts = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True))
    assert "".join(texts) == expected_output.text
    events = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True,
                                         details=True))
    assert [e.token.id for e in events] == expected_output.token_ids
    assert events[-1].generated_text == expected_output.text
    assert events[-1].details.finish_reason == "length"
    assert all(e.details is None for e in events[:-1])


def test_top_n_tokens_are_the_engines_top_logprobs(client, tiny_offline, expected_output):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    steps = tiny_offline.generate([PROMPT], params)[0].outputs[0].logprobs
    top_ids = [list(step["top_logprobs"]) for step in steps]
    result = client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True,
                                    top_n_tokens=3)
    assert result.generated_text == expected_output.text
    assert [[_id(t) for t in top] for top in result.details.top_tokens] == top_ids
    assert all(_id(top[0]) == chosen for top, chosen in
               zip(result.details.top_tokens, expected_output.token_ids, strict=True))
    events = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True,
                                         details=True, top_n_tokens=3))
    assert [[_id(t) for t in e.top_tokens] for e in events] == top_ids


def _id(token) -> int:
    # the client leaves the lists nested in `details.top_tokens` as plain dicts
    return token["id"] if isinstance(token, dict) else token.id


def test_decoder_input_details_score_the_prompt(client, tiny_offline):
    result = client.text_generation(PROMPT, max_new_tokens=2, details=True,
                                    decoder_input_details=True)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    [reference] = tiny_offline.generate([PROMPT], params)
    prefill = result.details.prefill
    assert [t.id for t in prefill] == reference.prompt_token_ids
    assert prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx(
        [e["logprob"] for e in reference.prompt_logprobs[1:]], abs=1e-5)


def test_errors_become_the_clients_exceptions(client):
    # TGI refuses the prompt's details on a stream, and so do we, in TGI's error shape
    with pytest.raises(TextGenerationValidationError, match="decoder_input_details"):
        list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True,
                                    decoder_input_details=True, stream=True))
