"""What the engine returns for a request: the whole output so far, and what is new since the last
step (for streaming)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    # Each reported token's own span of the text (they join into it); None without a tokenizer.
    # `token_texts` covers every token and is set on the last output only.
    delta_token_texts: list[str] | None = None
    token_texts: list[str] | None = None
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top_logprobs"}
    delta_logprobs: list[dict] | None = None
    cumulative_logprob: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request failed in the engine (finish reason "error")
    # Per prompt token (None for the first) when asked by `prompt_logprobs`.
    prompt_logprobs: list[dict | None] | None = None

    # The first (usually only) completion, for `n == 1` callers.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
