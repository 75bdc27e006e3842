"""`GET /openapi.json`: the routes and request shapes, generated from the pydantic models that
validate the requests (so the description cannot drift from what the server accepts)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from handler.protocol import ChatRequest, CompletionRequest, TGIRequest

REQUEST_MODELS: tuple[type[BaseModel], ...] = (TGIRequest, CompletionRequest, ChatRequest)

ERROR_SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": "integer"}},
        }},
    },
    "TGIError": {
        "type": "object", "required": ["error", "error_type"],
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _post(summary: str, bodies: list[str], error: str = "Error", stream: bool = False
          ) -> dict[str, Any]:
    schema = _ref(bodies[0]) if len(bodies) == 1 else {"oneOf": [_ref(b) for b in bodies]}
    content: dict[str, Any] = {"application/json": {}}
    if stream:
        content["text/event-stream"] = {}
        content["application/jsonlines"] = {}
    errors = {str(status): {"description": text,
                            "content": {"application/json": {"schema": _ref(error)}}}
              for status, text in ((400, "bad JSON or an unsupported field"),
                                   (401, "missing or wrong API key"),
                                   (413, "body too large"),
                                   (422, "a field out of its schema, named"),
                                   (429, "queue full"), (503, "model not ready"))}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "the answer", "content": content}, **errors},
    }}


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": summary}}}}


@lru_cache(maxsize=1)  # the same for the process's life: built once, on the first ask
def openapi_document(version: str) -> dict[str, Any]:
    _, schemas = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                    ref_template="#/components/schemas/{model}")
    all_shapes = [m.__name__ for m in REQUEST_MODELS]
    name_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    runtime = _post("SageMaker runtime InvokeEndpoint", all_shapes)
    runtime["post"]["parameters"] = name_param
    runtime_stream = _post("SageMaker runtime InvokeEndpointWithResponseStream", all_shapes)
    runtime_stream["post"]["parameters"] = name_param
    model_info = _get("the served model")
    model_info["get"]["parameters"] = [
        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "sagemaker-llm", "version": version},
        "paths": {
            "/ping": _get("health: 200 ready, 503 loading (with progress), 500 failed"),
            "/invocations": _post("SageMaker invocation: TGI/LMI, completion or chat body",
                                  all_shapes, stream=True),
            "/v1/completions": _post("OpenAI completion", ["CompletionRequest"], stream=True),
            "/v1/chat/completions": _post("OpenAI chat completion", ["ChatRequest"],
                                          stream=True),
            "/v1/models": _get("the served model, as a list"),
            "/v1/models/{model_id}": model_info,
            "/": _post("TGI: generate, streamed when stream is true", ["TGIRequest"],
                       "TGIError", stream=True),
            "/generate": _post("TGI: generate, one object", ["TGIRequest"], "TGIError"),
            "/generate_stream": _post("TGI: generate as server-sent events", ["TGIRequest"],
                                      "TGIError", stream=True),
            "/info": _get("TGI: the model and the router's limits"),
            "/health": _get("TGI: 200 when ready"),
            "/metrics": _get("Prometheus metrics"),
            "/endpoints/{name}/invocations": runtime,
            "/endpoints/{name}/invocations-response-stream": runtime_stream,
        },
        "components": {"schemas": {**schemas.get("$defs", {}), **ERROR_SCHEMAS}},
    }
