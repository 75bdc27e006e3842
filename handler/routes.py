"""HTTP routes: the SageMaker contract (/ping, /invocations), OpenAI (/v1/...), the SageMaker
runtime API (/endpoints/{name}/...), /metrics and /health."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from handler import sagemaker
from handler.generation import GenerationService
from handler.protocol import ApiError, ApiKind, parse_job
from handler.responses import StreamFormatter, openai_response, tgi_response
from handler.state import ServerState

JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-ndjson")


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": _error_type(error.status),
                      "param": error.param, "code": error.status}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _error_type(status: int) -> str:
    return {400: "BadRequestError", 401: "AuthenticationError", 413: "RequestTooLargeError",
            415: "UnsupportedMediaTypeError", 422: "ValidationError", 429: "OverloadedError",
            503: "ServiceUnavailableError"}.get(status, "InternalServerError")


def _state(request: Request) -> ServerState:
    return request.app.state.server


# -- health -----------------------------------------------------------------------------------


async def ping(request: Request) -> Response:
    status, body = _state(request).health()
    return JSONResponse(body, status_code=status)


async def health(request: Request) -> Response:
    status, _ = _state(request).health()
    return Response(status_code=200 if status == 200 else 503)


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(request: Request) -> Response:
    _check_api_key(request)
    name = _state(request).settings.served_model_name
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "sagemaker-llm"}
    ]})


# -- invocations ------------------------------------------------------------------------------


def _check_api_key(request: Request) -> None:
    key = _state(request).settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                       headers={"WWW-Authenticate": "Bearer"})


async def _read_json(request: Request) -> Any:
    limit = _state(request).settings.max_body_bytes
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media and media.lower() != "application/json" and not media.lower().endswith("+json"):
        raise ApiError(415, f"content type {media!r} is not supported: send application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is over {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from e


async def invocations(request: Request) -> Response:
    return await _invoke(request, request.headers.get("accept", ""))


async def completions(request: Request) -> Response:
    return await _invoke(request, "", expected=ApiKind.COMPLETION)


async def chat_completions(request: Request) -> Response:
    return await _invoke(request, "", expected=ApiKind.CHAT)


async def _invoke(request: Request, accept: str, expected: ApiKind | None = None) -> Response:
    _check_api_key(request)
    state = _state(request)
    job = parse_job(await _read_json(request), state.settings.default_max_new_tokens)
    if expected is not None and job.kind is not expected:
        field = "messages" if expected is ApiKind.CHAT else "prompt"
        raise ApiError(422, f"this route needs '{field}'", field)
    service = await state.get_service()
    request_id = ("chatcmpl-" if job.kind is ApiKind.CHAT else "cmpl-") + uuid.uuid4().hex
    streams = await service.start(job, request_id)
    model = state.settings.served_model_name
    headers = _echo_headers(request)
    if job.is_stream:
        is_jsonlines = any(t in accept.lower() for t in JSONLINES_TYPES)
        formatter = StreamFormatter(job, request_id, model, service.token_text,
                                    service.special_ids, is_jsonlines)
        records = RecordStream(service, streams, formatter)
        media = "application/jsonlines" if formatter.is_jsonlines else "text/event-stream"
        return StreamingResponse(records, media_type=media,
                                 headers={**headers, "Cache-Control": "no-cache"})
    outputs = await _until_disconnected(request, service.collect(streams))
    if job.kind is ApiKind.TGI:
        body: Any = tgi_response(job, outputs, service.token_text, service.special_ids)
    else:
        body = openai_response(job, outputs, request_id, model, service.token_text)
    return JSONResponse(body, headers=headers)


def _echo_headers(request: Request) -> dict[str, str]:
    value = request.headers.get(sagemaker.CUSTOM_ATTRIBUTES_HEADER)
    return {sagemaker.CUSTOM_ATTRIBUTES_HEADER: value} if value else {}


async def _until_disconnected(request: Request, work: Any) -> Any:
    """Run `work`; if the client goes away first, cancel it (its requests are aborted)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    raise ApiError(499, "the client disconnected")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RecordStream:
    """The bytes of a streamed answer; a failure ends it with an error record and sets `error`."""

    def __init__(self, service: GenerationService, streams: list, formatter: StreamFormatter):
        self.service, self.streams, self.formatter = service, streams, formatter
        self.error: str | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._records()

    async def _records(self) -> AsyncIterator[bytes]:
        latest: dict[int, Any] = {}
        try:
            async for index, output in self.service.merged(self.streams):
                latest[index] = output
                for record in self.formatter.records(index, output):
                    yield record
            for record in self.formatter.usage_record(list(latest.values())):
                yield record
        except Exception as e:  # noqa: BLE001 - reported in-band: the status is already 200
            self.error = str(e)
            yield self.formatter.error_record(self.error, {
                i: out.outputs[0].text for i, out in latest.items()})
        for record in self.formatter.done_record():
            yield record


# -- the SageMaker runtime API ----------------------------------------------------------------


async def _inner_invocation(request: Request, accept: str) -> Response:
    try:
        return await _invoke(request, accept)
    except ApiError as e:
        body = sagemaker.model_error_body(e.status, e.message)
        return JSONResponse(body, status_code=424, headers={"x-amzn-ErrorType": "ModelError"})


async def runtime_invocations(request: Request) -> Response:
    response = await _inner_invocation(request, request.headers.get("accept", ""))
    if response.status_code == 200:
        response.headers[sagemaker.VARIANT_HEADER] = sagemaker.DEFAULT_VARIANT
    return response


async def runtime_invocations_stream(request: Request) -> Response:
    accept = request.headers.get("x-amzn-sagemaker-accept", "")
    response = await _inner_invocation(request, accept)
    if response.status_code != 200:
        return response
    headers = {
        sagemaker.VARIANT_HEADER: sagemaker.DEFAULT_VARIANT,
        "X-Amzn-SageMaker-Content-Type": response.media_type or "application/json",
        **_echo_headers(request),
    }
    return StreamingResponse(_event_stream(response), headers=headers,
                             media_type=sagemaker.EVENT_STREAM_CONTENT_TYPE)


async def _event_stream(response: Response) -> AsyncIterator[bytes]:
    if not isinstance(response, StreamingResponse):
        yield sagemaker.payload_part(response.body)
        return
    records = response.body_iterator
    async for chunk in records:
        yield sagemaker.payload_part(chunk if isinstance(chunk, bytes) else chunk.encode())
    if isinstance(records, RecordStream) and records.error:
        yield sagemaker.model_stream_error(records.error)
