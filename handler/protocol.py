"""The request shapes users send, parsed into one job: TGI/LMI (`inputs`), OpenAI completion
(`prompt`) and OpenAI chat (`messages`). Schema errors name the field (HTTP 422)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine import SamplingParams

MAX_TOKENS_LIMIT = 1 << 20


class ApiKind(enum.StrEnum):
    TGI = "tgi"
    COMPLETION = "completion"
    CHAT = "chat"


class ApiError(Exception):
    """An error answered to the client as JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"{param}: {message}", param)


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


def parse_job(body: Any, default_max_new_tokens: int) -> Job:
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    if "messages" in body:
        return _parse_chat(body)
    if "prompt" in body:
        return _parse_completion(body)
    if "inputs" in body:
        return _parse_tgi(body, default_max_new_tokens)
    raise ApiError(422, "the body needs 'inputs' (TGI/LMI), 'prompt' (completion) or "
                   "'messages' (chat)", "body")


# -- field readers ----------------------------------------------------------------------------


def _number(d: dict, key: str, default: Any, lo: float, hi: float, *, integer: bool = False,
            prefix: str = "") -> Any:
    value = d.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise invalid(prefix + key, f"must be {'an integer' if integer else 'a number'}")
    if not lo <= value <= hi:
        raise invalid(prefix + key, f"must be in [{lo}, {hi}], got {value}")
    return value


def _bool(d: dict, key: str, default: bool, prefix: str = "") -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(prefix + key, "must be true or false")
    return value


def _stop(d: dict, key: str, prefix: str = "") -> tuple[str, ...]:
    value = d.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid(prefix + key, "must be a non-empty string or a list of them")
    if len(value) > 16:
        raise invalid(prefix + key, "at most 16 stop sequences")
    return tuple(value)


def _token_ids(d: dict, key: str) -> tuple[int, ...]:
    value = d.get(key) or []
    if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
        raise invalid(key, "must be a list of token ids")
    return tuple(value)


def _sampling(d: dict, max_tokens: int, prefix: str = "", **overrides: Any) -> SamplingParams:
    args = dict(
        max_tokens=max_tokens,
        temperature=_number(d, "temperature", 1.0, 0.0, 100.0, prefix=prefix),
        top_p=_number(d, "top_p", 1.0, 1e-9, 1.0, prefix=prefix),
        top_k=_number(d, "top_k", 0, -1, 1 << 20, integer=True, prefix=prefix),
        min_p=_number(d, "min_p", 0.0, 0.0, 1.0, prefix=prefix),
        repetition_penalty=_number(d, "repetition_penalty", 1.0, 1e-3, 100.0, prefix=prefix),
        presence_penalty=_number(d, "presence_penalty", 0.0, -2.0, 2.0, prefix=prefix),
        frequency_penalty=_number(d, "frequency_penalty", 0.0, -2.0, 2.0, prefix=prefix),
        seed=_number(d, "seed", None, 0, 2**63 - 1, integer=True, prefix=prefix),
        min_tokens=_number(d, "min_tokens", 0, 0, max_tokens, integer=True, prefix=prefix),
        ignore_eos=_bool(d, "ignore_eos", False, prefix),
        skip_special_tokens=_bool(d, "skip_special_tokens", True, prefix),
    )
    args.update(overrides)
    try:
        return SamplingParams(**args)
    except ValueError as e:
        raise ApiError(422, str(e), prefix.rstrip(".") or None) from e


# -- the three shapes -------------------------------------------------------------------------


def _parse_tgi(body: dict, default_max_new_tokens: int) -> Job:
    inputs = body["inputs"]
    is_batch = isinstance(inputs, list)
    prompts = inputs if is_batch else [inputs]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise invalid("inputs", "must be a non-empty string or a list of them")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid("parameters", "must be an object")
    pre = "parameters."
    max_new = _number(params, "max_new_tokens", default_max_new_tokens, 1, MAX_TOKENS_LIMIT,
                      integer=True, prefix=pre)
    stop = _stop(params, "stop", pre) + _stop(params, "stop_sequences", pre)
    do_sample = _bool(params, "do_sample", False, pre)
    is_sampled = do_sample or any(params.get(k) is not None for k in ("top_p", "top_k"))
    is_sampled |= params.get("temperature") not in (None, 0, 0.0)
    details = _bool(params, "details", False, pre)
    sampling = _sampling(
        params, max_new, pre, stop=stop, logprobs=0 if details else None,
        **({} if is_sampled else {"temperature": 0.0}),
    )
    return Job(
        ApiKind.TGI, list(prompts), sampling, is_stream=_bool(body, "stream", False),
        is_batch=is_batch, details=details,
        return_full_text=_bool(params, "return_full_text", False, pre),
    )


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise invalid("prompt", "must be a string, a list of strings, a list of token ids, or a "
                  "list of lists of token ids")


def _openai_common(body: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
    n = _number(body, "n", 1, 1, 16, integer=True)
    return _sampling(body, max_tokens, n=n, stop=_stop(body, "stop"),
                     stop_token_ids=_token_ids(body, "stop_token_ids"), logprobs=logprobs)


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "must be an object")
    return _bool(options, "include_usage", False, "stream_options.")


def _parse_completion(body: dict) -> Job:
    prompts = _completion_prompts(body["prompt"])
    max_tokens = _number(body, "max_tokens", 16, 1, MAX_TOKENS_LIMIT, integer=True)
    logprobs = _number(body, "logprobs", None, 0, 20, integer=True)
    return Job(
        ApiKind.COMPLETION, prompts, _openai_common(body, max_tokens, logprobs),
        is_stream=_bool(body, "stream", False), echo=_bool(body, "echo", False),
        include_usage=_stream_options(body), model=body.get("model"),
    )


def _parse_chat(body: dict) -> Job:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}]", "must be an object with a 'role'")
        message["content"] = _message_text(message.get("content"), f"messages[{i}].content")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, MAX_TOKENS_LIMIT,
                         integer=True)
    wants_logprobs = _bool(body, "logprobs", False)
    top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    return Job(
        ApiKind.CHAT, None, _openai_common(body, max_tokens, top if wants_logprobs else None),
        is_stream=_bool(body, "stream", False), messages=messages,
        include_usage=_stream_options(body), chat_logprobs=wants_logprobs,
        model=body.get("model"),
    )


def _message_text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(param, "only text parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise invalid(param, "must be a string or a list of text parts")
