"""TGI's own routes over plain HTTP (huggingface_hub's client: tests/clients), and the OpenAI
model routes; each answer compared with the offline engine's greedy output."""

from __future__ import annotations

import importlib.metadata
import json

import httpx
import pytest

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


def test_generate_answers_one_object_and_root_a_list(tiny_server, expected_output):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}}
    one = httpx.post(tiny_server.url + "/generate", json=body, timeout=30)
    assert one.status_code == 200 and one.json() == {"generated_text": expected_output.text}
    listed = httpx.post(tiny_server.url + "/", json=body, timeout=30)
    assert listed.status_code == 200
    assert listed.json() == [{"generated_text": expected_output.text}]


def test_generate_stream_is_sse_whatever_the_accept(tiny_server, expected_output):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}}
    with httpx.stream("POST", tiny_server.url + "/generate_stream", json=body, timeout=30,
                      headers={"Accept": "application/json"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines()
                  if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == expected_output.token_ids
    assert events[-1]["generated_text"] == expected_output.text


def test_tgi_routes_answer_errors_in_tgi_shape(tiny_server):
    bad = httpx.post(tiny_server.url + "/generate",
                     json={"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    assert bad.status_code == 422
    assert bad.json()["error_type"] == "validation" and "max_new_tokens" in bad.json()["error"]
    wrong_shape = httpx.post(tiny_server.url + "/generate", json={"prompt": PROMPT})
    assert wrong_shape.status_code == 422 and "inputs" in wrong_shape.json()["error"]


def test_info_describes_the_model_and_limits(tiny_server, tiny_offline):
    info = httpx.get(tiny_server.url + "/info").json()
    assert info["model_id"] == "tiny"
    assert info["max_total_tokens"] == tiny_offline.engine.max_model_len
    assert info["max_input_tokens"] == info["max_total_tokens"] - 1
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert info["version"] == importlib.metadata.version("sagemaker-llm")  # the installed one
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
