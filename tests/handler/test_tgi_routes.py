"""TGI's own routes, driven by huggingface_hub's InferenceClient as its users would, and the
OpenAI model routes; each answer compared with the offline engine's greedy output."""

from __future__ import annotations

import json

import httpx
import huggingface_hub.constants
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as TextGenerationValidationError

from engine import SamplingParams

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def expected(tiny_offline):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return tiny_offline.generate([PROMPT], params)[0]


@pytest.fixture(scope="module")
def client(tiny_server):
    # The suite runs with HF_HUB_OFFLINE=1 (no hub here), which blocks every request the
    # client makes; its requests in this module go to the loopback server only.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(base_url=tiny_server.url)


def test_inference_client_text_generation(client, expected):
    assert client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS) == expected.text


def test_inference_client_details(client, expected):
    result = client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True)
    assert result.generated_text == expected.text
    assert result.details.finish_reason == "length"
    assert result.details.generated_tokens == MAX_TOKENS
    assert [t.id for t in result.details.tokens] == expected.token_ids


def test_inference_client_stream(client, expected):
    texts = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True))
    assert "".join(texts) == expected.text
    events = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True,
                                         details=True))
    assert [e.token.id for e in events] == expected.token_ids
    assert events[-1].generated_text == expected.text
    assert events[-1].details.finish_reason == "length"
    assert all(e.details is None for e in events[:-1])


def test_top_n_tokens_are_the_engines_top_logprobs(client, tiny_offline, expected):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    steps = tiny_offline.generate([PROMPT], params)[0].outputs[0].logprobs
    top_ids = [list(step["top_logprobs"]) for step in steps]
    result = client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True,
                                    top_n_tokens=3)
    assert result.generated_text == expected.text
    assert [[_id(t) for t in top] for top in result.details.top_tokens] == top_ids
    assert all(_id(top[0]) == chosen for top, chosen in
               zip(result.details.top_tokens, expected.token_ids, strict=True))
    events = list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, stream=True,
                                         details=True, top_n_tokens=3))
    assert [[_id(t) for t in e.top_tokens] for e in events] == top_ids


def _id(token) -> int:
    # the client leaves the lists nested in `details.top_tokens` as plain dicts
    return token["id"] if isinstance(token, dict) else token.id


def test_generate_answers_one_object_and_root_a_list(tiny_server, expected):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}}
    one = httpx.post(tiny_server.url + "/generate", json=body, timeout=30)
    assert one.status_code == 200 and one.json() == {"generated_text": expected.text}
    listed = httpx.post(tiny_server.url + "/", json=body, timeout=30)
    assert listed.status_code == 200 and listed.json() == [{"generated_text": expected.text}]


def test_generate_stream_is_sse_whatever_the_accept(tiny_server, expected):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}}
    with httpx.stream("POST", tiny_server.url + "/generate_stream", json=body, timeout=30,
                      headers={"Accept": "application/json"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines()
                  if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == expected.token_ids
    assert events[-1]["generated_text"] == expected.text


def test_tgi_routes_answer_errors_in_tgi_shape(tiny_server, client):
    bad = httpx.post(tiny_server.url + "/generate",
                     json={"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    assert bad.status_code == 422
    assert bad.json()["error_type"] == "validation" and "max_new_tokens" in bad.json()["error"]
    wrong_shape = httpx.post(tiny_server.url + "/generate", json={"prompt": PROMPT})
    assert wrong_shape.status_code == 422 and "inputs" in wrong_shape.json()["error"]
    # the client turns TGI's error shape into its own exception types; TGI refuses the prompt's
    # details on a stream, and so do we
    with pytest.raises(TextGenerationValidationError, match="decoder_input_details"):
        list(client.text_generation(PROMPT, max_new_tokens=MAX_TOKENS, details=True,
                                    decoder_input_details=True, stream=True))


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


def test_info_describes_the_model_and_limits(tiny_server, tiny_offline):
    info = httpx.get(tiny_server.url + "/info").json()
    assert info["model_id"] == "tiny"
    assert info["max_total_tokens"] == tiny_offline.engine.max_model_len
    assert info["max_input_tokens"] == info["max_total_tokens"] - 1
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert httpx.get(tiny_server.url + "/health").status_code == 200


def test_openai_model_routes_know_what_is_served(tiny_server):
    assert httpx.get(tiny_server.url + "/v1/models/tiny").json()["id"] == "tiny"
    unknown = httpx.get(tiny_server.url + "/v1/models/gpt-4")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "NotFoundError"
    body = {"model": "gpt-4", "prompt": PROMPT, "max_tokens": 2}
    refused = httpx.post(tiny_server.url + "/v1/completions", json=body)
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
    # /invocations serves whatever the body names: SageMaker already chose the model
    assert httpx.post(tiny_server.url + "/invocations", json=body, timeout=30).status_code == 200


def test_openapi_describes_what_the_server_accepts(tiny_server):
    from jsonschema.exceptions import ValidationError
    from openapi_schema_validator import OAS31Validator
    from openapi_spec_validator import validate

    doc = httpx.get(tiny_server.url + "/openapi.json").json()
    validate(doc)  # a valid OpenAPI 3.1 document
    served = {route.path.replace(":path}", "}") for route in tiny_server.server.config.app.routes}
    assert served - {"/openapi.json"} == set(doc["paths"])

    def body_schema(path: str) -> OAS31Validator:
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        return OAS31Validator({**schema["schema"], "components": doc["components"]})

    body_schema("/v1/completions").validate({"prompt": "Hi", "max_tokens": 2})
    body_schema("/generate").validate({"inputs": "Hi", "parameters": {"top_n_tokens": 2}})
    body_schema("/invocations").validate({"messages": [{"role": "user", "content": "Hi"}]})
    for path, body in (("/v1/completions", {"max_tokens": 2}),
                       ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 0}})):
        with pytest.raises(ValidationError):
            body_schema(path).validate(body)
        assert httpx.post(tiny_server.url + path, json=body).status_code == 422  # server too
