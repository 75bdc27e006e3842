"""The request shapes users send, as typed models: TGI/LMI (`inputs`), OpenAI completion
(`prompt`) and OpenAI chat (`messages`), each parsed into one `Job` for the engine.

Bodies are parsed strictly: no NaN or Infinity, no lone surrogates, bounded nesting and number
sizes; types are not coerced (a string is not a number, a bool is not an integer). A schema error
is a 422 naming the field path and the value; a field we know but do not implement is a 400 that
names it, never silently ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine import SamplingParams
from handler.errors import ApiError

MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 16
MAX_N = 16
MAX_TOP_N_TOKENS = 20  # TGI's top_n_tokens and OpenAI's logprobs alike
MAX_PROMPTS = 64  # prompts in one body (a TGI/LMI batch or a completion's list)
INT64_MAX = 2**63 - 1

TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
Seed = Annotated[int, Field(ge=0, le=INT64_MAX)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=1 << 20)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=100.0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Stop = NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None


class ApiKind(enum.StrEnum):
    TGI = "tgi"
    COMPLETION = "completion"
    CHAT = "chat"


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"{param}: {message}", param)


# -- the models -------------------------------------------------------------------------------


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send `user`, `metadata`...); known but unimplemented
    # ones are refused by `_refuse_unsupported`.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Sampling(_Strict):
    """The sampling fields every shape shares (vLLM's extensions included)."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None


class TGIParameters(_Sampling):
    max_new_tokens: MaxTokens | None = None
    do_sample: bool | None = None
    stop: Stop = None
    stop_sequences: Stop = None
    return_full_text: bool | None = None
    details: bool | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    decoder_input_details: bool | None = None
    watermark: Literal[False] | None = None
    typical_p: Literal[1.0] | None = None  # accepted only as "off"
    best_of: Literal[1] | None = None


class TGIRequest(_Strict):
    inputs: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1,
                                                             max_length=MAX_PROMPTS)]
    parameters: TGIParameters | None = None
    stream: bool = False


class _OpenAICommon(_Sampling):
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream_options: StreamOptions | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None

    @model_validator(mode="after")
    def _best_of_is_n(self) -> _OpenAICommon:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


PromptIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_OpenAICommon):
    prompt: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS)]
             | PromptIds | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: MaxTokens | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_OpenAICommon):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


_OpenAICommon.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()

# Fields of the APIs we know and do not implement: refused by name, never silently ignored.
UNSUPPORTED_FIELDS = {
    ApiKind.CHAT: ("tools", "tool_choice", "functions", "function_call", "response_format",
                   "parallel_tool_calls", "audio", "modalities", "prediction", "guided_json",
                   "guided_regex", "guided_choice", "guided_grammar"),
    ApiKind.COMPLETION: ("suffix", "response_format", "guided_json", "guided_regex",
                         "guided_choice", "guided_grammar"),
    ApiKind.TGI: ("grammar", "adapter_id"),
}


# -- the job the handler runs -----------------------------------------------------------------


@dataclass
class Job:
    kind: ApiKind
    prompts: list[str | list[int]] | None  # None for chat: built from `messages`
    params: SamplingParams
    is_stream: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)
    is_batch: bool = False  # TGI/LMI `inputs` given as a list
    details: bool = False
    return_full_text: bool = False
    echo: bool = False
    include_usage: bool = False
    chat_logprobs: bool = False
    model: str | None = None
    truncate: int | None = None  # TGI: keep only the last N prompt tokens
    top_n_tokens: int = 0  # TGI: the most likely tokens at each step, beside the chosen one


def decode_json(body: bytes) -> Any:
    """Strict JSON: a 400 naming the problem for anything `json` would accept but we must not
    (NaN, Infinity, lone surrogates, numbers past 4300 digits, nesting past 200 levels)."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from e


def decode_records(body: bytes) -> list[Any]:
    """The body's JSON value; or, for SageMaker Batch Transform (SplitType=Line with
    BatchStrategy=MultiRecord), one value per line when the body is several JSON documents, one
    per line (as application/jsonlines or application/json alike)."""
    try:
        return [decode_json(body)]
    except ApiError as whole_error:
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        try:
            return [decode_json(line) for line in lines]
        except ApiError:
            raise whole_error from None


def parse_job(body: Any, default_max_new_tokens: int) -> Job:
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    if "messages" in body:
        return _parse_chat(_validate(ChatRequest, body, ApiKind.CHAT))
    if "prompt" in body:
        return _parse_completion(_validate(CompletionRequest, body, ApiKind.COMPLETION))
    if "inputs" in body:
        return _parse_tgi(_validate(TGIRequest, body, ApiKind.TGI), default_max_new_tokens)
    raise ApiError(422, "the body needs 'inputs' (TGI/LMI), 'prompt' (completion) or "
                   "'messages' (chat)", "body")


def _validate(model: type[BaseModel], body: dict, kind: ApiKind) -> Any:
    _refuse_unsupported(body, kind)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _schema_error(e, body) from e


def _refuse_unsupported(body: dict, kind: ApiKind) -> None:
    fields = body.get("parameters") if kind is ApiKind.TGI else body
    prefix = "parameters." if kind is ApiKind.TGI else ""
    if not isinstance(fields, dict):
        return
    for name in UNSUPPORTED_FIELDS[kind]:
        if fields.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"{prefix}{name} is not supported by this server", prefix + name)


def _schema_error(error: ValidationError, body: dict) -> ApiError:
    # The most specific error: of a union's branches, the one that got furthest into the value,
    # and there a wrong value rather than a wrong type (the branch the caller meant).
    worst = max(error.errors(include_url=False),
                key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    path = _path(worst["loc"], body, worst["type"] == "missing")
    value = repr(worst.get("input"))
    shown = value if len(value) <= 80 else value[:77] + "..."
    return ApiError(422, f"{path}: {worst['msg']} (got {shown})", path)


def _path(loc: tuple, body: Any, is_missing: bool) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', following the body itself so that
    pydantic's union branch labels ('str', 'list[int]') drop out."""
    path, node = "", body
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (
            part in node or (is_missing and i == len(loc) - 1)
        ):
            path = f"{path}.{part}" if path else part
            node = node.get(part)
    return path or "body"


# -- each shape into a job --------------------------------------------------------------------


def _stops(*stops: str | list[str] | None) -> tuple[str, ...]:
    found: list[str] = []
    for stop in stops:
        found += [stop] if isinstance(stop, str) else (stop or [])
    if len(found) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    return tuple(found)


def _params(request: _Sampling, max_tokens: int, param: str = "", **extra: Any) -> SamplingParams:
    fields = request.model_dump(include=set(_Sampling.model_fields), exclude_none=True)
    if fields.get("min_tokens", 0) > max_tokens:
        raise invalid(param + "min_tokens", f"must be at most max tokens ({max_tokens})")
    try:
        return SamplingParams(max_tokens=max_tokens, **fields, **extra)
    except ValueError as e:
        raise ApiError(422, str(e), param.rstrip(".") or None) from e


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    parsed = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) > INT64_MAX:
            raise invalid("logit_bias", f"keys must be token ids, got {key!r}")
        parsed[int(key)] = value
    return parsed


def _parse_tgi(request: TGIRequest, default_max_new_tokens: int) -> Job:
    p = request.parameters or TGIParameters()
    is_sampled = bool(p.do_sample) or p.top_p is not None or p.top_k is not None
    is_sampled |= p.temperature not in (None, 0.0)
    extra: dict[str, Any] = {} if is_sampled else {"temperature": 0.0}
    # TGI keeps the stop sequence in `generated_text`: text and `details.tokens` then agree.
    extra["include_stop_str_in_output"] = True
    params = _params(p, p.max_new_tokens or default_max_new_tokens, "parameters.",
                     stop=_stops(p.stop, p.stop_sequences),
                     logprobs=p.top_n_tokens or (0 if p.details else None),
                     prompt_logprobs=0 if p.details and p.decoder_input_details else None,
                     **extra)
    is_batch = isinstance(request.inputs, list)
    return Job(
        ApiKind.TGI, list(request.inputs) if is_batch else [request.inputs], params,
        is_stream=request.stream, is_batch=is_batch, details=bool(p.details),
        return_full_text=bool(p.return_full_text), truncate=p.truncate,
        top_n_tokens=p.top_n_tokens or 0,
    )


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _openai_params(request: _OpenAICommon, max_tokens: int, logprobs: int | None,
                   prompt_logprobs: int | None = None) -> SamplingParams:
    return _params(request, max_tokens, n=request.n, stop=_stops(request.stop),
                   stop_token_ids=tuple(request.stop_token_ids or ()), logprobs=logprobs,
                   prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(request.logit_bias))


def _parse_completion(request: CompletionRequest) -> Job:
    # `echo` with `logprobs`: the prompt's tokens are scored too, as OpenAI and vLLM answer.
    is_echo_scored = request.echo and request.logprobs is not None and not request.stream
    params = _openai_params(request, request.max_tokens or 16, request.logprobs,
                            request.logprobs if is_echo_scored else None)
    return Job(
        ApiKind.COMPLETION, _completion_prompts(request.prompt), params,
        is_stream=request.stream, echo=request.echo,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        model=request.model,
    )


def _parse_chat(request: ChatRequest) -> Job:
    max_tokens = request.max_completion_tokens or request.max_tokens or 256
    top = request.top_logprobs or 0
    params = _openai_params(request, max_tokens, top if request.logprobs else None)
    messages = [_message_dict(m) for m in request.messages]
    return Job(
        ApiKind.CHAT, None, params, is_stream=request.stream, messages=messages,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        chat_logprobs=request.logprobs, model=request.model,
    )


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    text = "".join(p.text for p in content) if isinstance(content, list) else (content or "")
    extra = {k: v for k, v in (message.model_extra or {}).items() if k != "content"}
    if extra.get("tool_calls"):
        raise ApiError(400, "messages[].tool_calls is not supported by this server",
                       "messages.tool_calls")
    named = {"name": message.name} if message.name else {}
    return {"role": message.role, "content": text, **named}
