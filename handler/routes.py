"""HTTP routes that take requests: SageMaker's /invocations, OpenAI's (/v1/...), TGI's own
(/, /generate, /generate_stream, /info) and the SageMaker runtime API (/endpoints/{name}/...).
/ping, /health and /metrics are handler/probes.py's."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine import LoadState
from handler import sagemaker, version
from handler.formats import StreamFormat, choose_format
from handler.generation import GenerationService, api_error
from handler.openapi import openapi_document
from handler.probes import server_state as _state
from handler.protocol import (
    MAX_PROMPTS,
    MAX_STOP_SEQUENCES,
    ApiError,
    ApiKind,
    Job,
    decode_json,
    decode_records,
    parse_job,
)
from handler.responses import StreamFormatter, openai_response, tgi_response
from handler.state import ServerState

logger = logging.getLogger(__name__)


# -- the API ------------------------------------------------------------------------------------


async def models(request: Request) -> Response:
    _check_api_key(request)
    name = _state(request).settings.served_model_name
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "sagemaker-llm"}
    ]})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(version()))


async def model_info(request: Request) -> Response:
    """`GET /v1/models/{id}`: the served model, or OpenAI's 404 for any other id."""
    _check_api_key(request)
    _check_model(request, request.path_params["model_id"], "model_id")
    return JSONResponse({"id": request.path_params["model_id"], "object": "model", "created": 0,
                         "owned_by": "sagemaker-llm"})


def _check_model(request: Request, model: str | None, param: str = "model") -> None:
    served = _state(request).settings.served_model_name
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r} does not exist: this server serves {served!r}",
                       param)


async def info(request: Request) -> Response:
    """TGI's `GET /info`: what the router would say of its model and limits."""
    state = _state(request)
    info = state.loader.info if state.loader.state is LoadState.READY else None
    max_total = info.max_model_len if info is not None else None
    return JSONResponse({
        "model_id": state.settings.served_model_name, "model_sha": None,
        "model_dtype": info.dtype if info else None,
        "model_device_type": info.device_type if info else None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": state.settings.max_pending_requests,
        "max_best_of": 1, "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": None if max_total is None else max_total - 1,
        "max_total_tokens": max_total,
        "validation_workers": 1, "max_client_batch_size": MAX_PROMPTS,
        "router": "sagemaker-llm", "version": version(), "sha": None, "docker_label": None,
    })


# -- reading a request ------------------------------------------------------------------------


def _check_api_key(request: Request) -> None:
    key = _state(request).settings.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    is_valid = scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), key.encode()
    )
    if not is_valid:
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                       headers={"WWW-Authenticate": 'Bearer realm="sagemaker-llm"'})


async def _read_body(request: Request) -> bytes:
    settings = _state(request).settings
    limit = settings.max_body_bytes
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media and media not in ("application/json", "application/jsonlines",
                               "application/x-ndjson") and not media.endswith("+json"):
        raise ApiError(415, f"content type {media!r} is not supported: send application/json")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"content encoding {encoding!r} is not supported: send the body "
                       "uncompressed")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is over {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(settings.timeout_request_body):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the body is over {limit} bytes")
    except TimeoutError as e:
        raise ApiError(408, f"the body took more than {settings.timeout_request_body:g} s to "
                       "arrive") from e
    except ClientDisconnect as e:
        raise ApiError(499, "the client disconnected while sending the body") from e
    return bytes(body)


# -- invocations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteStyle:
    """How a route reads and answers a body."""

    expected: ApiKind | None = None  # the one request shape the route takes (None: any)
    stream: bool | None = None  # None: the body's "stream" decides; True/False: forced
    is_sse_route: bool = False  # its API always streams SSE (see handler.formats)
    is_single_object: bool = False  # TGI's /generate: one object, not a list
    # OpenAI's routes answer 404 to a `model` they do not serve (as vLLM does). /invocations and
    # the runtime routes do not: there SageMaker has already chosen the model, and clients
    # (LiteLLM, the SDKs) fill `model` with whatever names the endpoint on their side.
    checks_model: bool = False


ANY = RouteStyle()
OPENAI_COMPLETION = RouteStyle(ApiKind.COMPLETION, is_sse_route=True, checks_model=True)
OPENAI_CHAT = RouteStyle(ApiKind.CHAT, is_sse_route=True, checks_model=True)
TGI_ROOT = RouteStyle(ApiKind.TGI, is_sse_route=True)
TGI_GENERATE = RouteStyle(ApiKind.TGI, stream=False, is_single_object=True)
TGI_GENERATE_STREAM = RouteStyle(ApiKind.TGI, stream=True, is_sse_route=True)
RUNTIME_STREAM = RouteStyle(stream=True)
REQUIRED_FIELD = {ApiKind.CHAT: "messages", ApiKind.COMPLETION: "prompt", ApiKind.TGI: "inputs"}


def _generation_endpoint(style: RouteStyle) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await _invoke(request, request.headers.get("accept", ""), style)

    return endpoint


invocations = _generation_endpoint(ANY)
completions = _generation_endpoint(OPENAI_COMPLETION)
chat_completions = _generation_endpoint(OPENAI_CHAT)
tgi_root = _generation_endpoint(TGI_ROOT)
tgi_generate = _generation_endpoint(TGI_GENERATE)
tgi_generate_stream = _generation_endpoint(TGI_GENERATE_STREAM)


async def _invoke(request: Request, accept: str, style: RouteStyle) -> Response:
    request_id = uuid.uuid4().hex
    state = _state(request)
    try:
        response = await _run(request, state, request_id, accept, style)
    except ApiError as e:
        state.metrics.request_ended("client_gone" if e.status == 499 else
                                    "error" if e.status >= 500 else "refused")
        logger.info("request %s: %d %s", request_id, e.status, e.message)
        raise
    return response


async def _run(request: Request, state: ServerState, request_id: str, accept: str,
               style: RouteStyle) -> Response:
    _check_api_key(request)
    arrival = time.monotonic()
    timeout = state.settings.request_timeout
    deadline = arrival + timeout if timeout else None
    body = await _read_body(request)
    records = decode_records(body) if style == ANY else [decode_json(body)]
    if len(records) > 1:
        return await _run_records(request, state, request_id, records, deadline)
    job = parse_job(records[0], state.settings.default_max_new_tokens)
    if style.expected is not None and job.kind is not style.expected:
        field = REQUIRED_FIELD[style.expected]
        raise ApiError(422, f"this route needs '{field}'", field)
    if style.checks_model:
        _check_model(request, job.model)
    is_stream = job.is_stream if style.stream is None else style.stream
    if is_stream and job.params.prompt_logprobs is not None:  # as TGI refuses it
        raise ApiError(422, "`decoder_input_details` == true is not supported when streaming "
                       "tokens", "parameters.decoder_input_details")
    stream_format = choose_format(accept, is_stream, is_sse_route=style.is_sse_route)
    service = await state.get_service()
    prefix = "chatcmpl-" if job.kind is ApiKind.CHAT else "cmpl-"
    streams = await service.start(job, prefix + request_id)
    model = state.settings.served_model_name
    headers = _echo_headers(request)
    if is_stream:
        formatter = StreamFormatter(job, prefix + request_id, model, service.token_text,
                                    service.special_ids, stream_format is StreamFormat.JSONLINES)
        records = RecordStream(service, streams, formatter, deadline, state, request_id)
        return StreamingResponse(records, media_type=stream_format.media_type,
                                 headers={**headers, "Cache-Control": "no-cache"})
    outputs = await _until_disconnected(request, service.collect(streams, deadline))
    state.metrics.request_ended("finished")
    body = _render(job, outputs, prefix + request_id, model, service)
    return JSONResponse(body[0] if style.is_single_object else body, headers=headers)


def _render(job: Job, outputs: list, request_id: str, model: str,
            service: GenerationService) -> Any:
    if job.kind is ApiKind.TGI:
        return tgi_response(job, outputs, service.token_text, service.special_ids)
    return openai_response(job, outputs, request_id, model, service.token_text)


async def _run_records(request: Request, state: ServerState, request_id: str,
                       records: list[Any], deadline: float | None) -> Response:
    """Batch Transform's multi-record body: every record runs at once, and the answer is one
    JSON line per record, in order (the transform job joins them line by line)."""
    jobs = []
    for number, record in enumerate(records, 1):
        try:
            jobs.append(parse_job(record, state.settings.default_max_new_tokens))
        except ApiError as e:
            raise ApiError(e.status, f"record {number}: {e.message}", e.param) from e
    if any(job.is_stream for job in jobs):
        raise ApiError(400, "a body of several JSON records (Batch Transform) cannot stream",
                       "stream")
    service = await state.get_service()
    started: list[list] = []
    try:
        for number, job in enumerate(jobs, 1):
            started.append(await service.start(job, f"batch-{request_id}-{number}"))
    except BaseException:
        for streams in started:
            for stream in streams:
                stream.abort()
        raise
    outputs = await _until_disconnected(request, asyncio.gather(
        *(service.collect(streams, deadline) for streams in started)))
    state.metrics.request_ended("finished")
    model = state.settings.served_model_name
    lines = [json.dumps(_render(job, out, f"batch-{request_id}-{number}", model, service))
             for number, (job, out) in enumerate(zip(jobs, outputs, strict=True), 1)]
    return Response("\n".join(lines) + "\n", media_type="application/jsonlines",
                    headers=_echo_headers(request))


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

    def __init__(self, service: GenerationService, streams: list, formatter: StreamFormatter,
                 deadline: float | None, state: ServerState, request_id: str):
        self.service, self.streams, self.formatter = service, streams, formatter
        self.deadline, self.state, self.request_id = deadline, state, request_id
        self.error: str | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._records()

    async def _records(self) -> AsyncIterator[bytes]:
        latest: dict[int, Any] = {}
        is_done = False
        try:
            async for index, output in self.service.merged(self.streams, self.deadline):
                latest[index] = output
                for record in self.formatter.records(index, output):
                    yield record
            for record in self.formatter.usage_record(list(latest.values())):
                yield record
            is_done = True
        except Exception as e:  # noqa: BLE001 - reported in-band: the status is already 200
            error = api_error(e)
            self.error = error.message if isinstance(error, ApiError) else str(e)
            logger.info("request %s: stream ended by an error: %s", self.request_id, self.error)
            yield self.formatter.error_record(self.error, {
                i: out.outputs[0].text for i, out in latest.items()})
        finally:
            if not is_done and self.error is None:
                self.state.metrics.request_ended("client_gone")
                logger.info("request %s: the client left mid-stream", self.request_id)
        self.state.metrics.request_ended("finished" if is_done else "error")
        for record in self.formatter.done_record():
            yield record


# -- the SageMaker runtime API ----------------------------------------------------------------


async def _inner_invocation(request: Request, accept: str, force_stream: bool) -> Response:
    _check_api_key(request)  # a 401 is the caller's, not the model's: never wrapped
    try:
        return await _invoke(request, accept, RUNTIME_STREAM if force_stream else ANY)
    except ApiError as e:
        body = sagemaker.model_error_body(e.status, e.message)
        return JSONResponse(body, status_code=424, headers={"x-amzn-ErrorType": "ModelError"})


async def runtime_invocations(request: Request) -> Response:
    response = await _inner_invocation(request, request.headers.get("accept", ""), False)
    if response.status_code == 200:
        response.headers[sagemaker.VARIANT_HEADER] = sagemaker.DEFAULT_VARIANT
    return response


async def runtime_invocations_stream(request: Request) -> Response:
    accept = request.headers.get("x-amzn-sagemaker-accept", "")
    response = await _inner_invocation(request, accept, True)
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
