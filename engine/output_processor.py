"""Output processing, as vLLM v1 splits it: the core's token ids in, typed request outputs out.

Per request it keeps the detokenizers, the tokens and logprobs so far, and what has been reported;
it finds stop strings (the core is then told to finish those requests). A fault while processing
one request's output fails that request alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_core import SeqOutput
from engine.input_processor import EngineRequest
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sequence import FinishReason

logger = logging.getLogger(__name__)


@dataclass
class _SeqState:
    detokenizer: IncrementalDetokenizer
    wants_logprobs: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    cumulative_logprob: float = 0.0  # over the reported tokens
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_reported: int = 0

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _RequestState:
    request: EngineRequest
    seqs: list[_SeqState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict | None] | None = None
    error: str | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]
    stopped_seqs: list[tuple[str, int]]  # (request id, index) a stop string ended here
    failed_request_ids: list[str]  # failed here: the core must end them


class OutputProcessor:
    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`, or None: token ids only
        self.states: dict[str, _RequestState] = {}

    def add_request(self, request: EngineRequest) -> None:
        params = request.params
        seqs = [
            _SeqState(IncrementalDetokenizer(self.tokenizer, params, request.prompt_token_ids),
                      params.logprobs is not None)
            for _ in range(params.n)
        ]
        self.states[request.request_id] = _RequestState(
            request, seqs, RequestMetrics(request.arrival_time)
        )

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def process(self, seq_outputs: list[SeqOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        stopped: list[tuple[str, int]] = []
        failed: list[str] = []
        for seq_output in seq_outputs:
            request_id = seq_output.request_id
            state = self.states.get(request_id)
            if state is None or request_id in failed:
                continue
            touched[request_id] = state
            try:
                if self._apply(state, seq_output, now):
                    stopped.append((request_id, seq_output.index))
            except Exception as e:  # noqa: BLE001 - one request's fault ends it alone
                logger.error("request %s failed in output processing: %s", request_id, e)
                self._fail(state, f"{type(e).__name__}: {e}")
                failed.append(request_id)
        outputs = []
        for request_id, state in touched.items():
            try:
                outputs.append(self._make_output(state, now))
            except Exception as e:  # noqa: BLE001 - one request's fault ends it alone
                logger.error("request %s failed in output processing: %s", request_id, e)
                self._fail(state, f"{type(e).__name__}: {e}")
                failed.append(request_id)
                outputs.append(self._error_output(state, now))
        for output in outputs:
            if output.finished:
                del self.states[output.request_id]
        return ProcessedOutputs(outputs, stopped, failed)

    def _apply(self, state: _RequestState, out: SeqOutput, now: float) -> bool:
        """Fold one sequence's step in; True if a stop string ended the sequence here."""
        seq = state.seqs[out.index]
        if out.error is not None:
            self._fail(state, out.error)
            return False
        if seq.finish_reason is not None:  # a stop string ended it earlier in this step's tokens
            return False
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = out.first_scheduled_time
            state.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            state.prompt_logprobs = out.prompt_logprobs
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        seq.token_ids.append(out.token_id)
        if out.logprob is not None and seq.wants_logprobs:
            seq.logprobs.append({"token_id": out.token_id, "logprob": out.logprob,
                                 "top_logprobs": out.top_logprobs or {}})
        can_stop = len(seq.token_ids) >= state.request.params.min_tokens
        stop_string = seq.detokenizer.add_token(out.token_id, can_stop)
        if out.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
            return False
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop_string
            return True
        return False

    def _fail(self, state: _RequestState, error: str) -> None:
        state.error = state.error or error
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = FinishReason.ERROR

    def _make_output(self, state: _RequestState, now: float) -> RequestOutput:
        completions = [self._completion(i, seq) for i, seq in enumerate(state.seqs)]
        if state.is_finished:
            state.metrics.finished_time = now
        request = state.request
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions,
            state.is_finished, state.num_cached_tokens, state.metrics, state.error,
            state.prompt_logprobs,
        )

    @staticmethod
    def _error_output(state: _RequestState, now: float) -> RequestOutput:
        """The last output of a request whose output could not be built."""
        state.metrics.finished_time = now
        request = state.request
        completions = [
            CompletionOutput(index=i, text="", token_ids=list(seq.token_ids),
                             finish_reason=str(FinishReason.ERROR))
            for i, seq in enumerate(state.seqs)
        ]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             completions, True, state.num_cached_tokens, state.metrics,
                             state.error)

    @staticmethod
    def _completion(index: int, seq: _SeqState) -> CompletionOutput:
        """What is reported so far: tokens and logprobs only as far as their text is emitted."""
        detok = seq.detokenizer
        delta_text = detok.take_delta(seq.is_finished)
        begin = seq.num_reported
        end = seq.num_reported = detok.num_released_tokens(len(seq.token_ids), seq.is_finished)
        logprobs = seq.logprobs[:end] if seq.wants_logprobs else None
        if logprobs is not None:
            seq.cumulative_logprob += sum(e["logprob"] for e in logprobs[begin:])
        has_text = detok.tokenizer is not None
        return CompletionOutput(
            index=index,
            text=detok.text[: detok.num_emitted_chars],
            token_ids=seq.token_ids[:end],
            finish_reason=str(seq.finish_reason) if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
            delta_text=delta_text,
            delta_token_ids=seq.token_ids[begin:end],
            delta_token_texts=detok.token_texts(begin, end) if has_text else None,
            token_texts=detok.token_texts(0, end) if has_text and seq.is_finished else None,
            logprobs=logprobs,
            delta_logprobs=logprobs[begin:] if logprobs is not None else None,
            cumulative_logprob=seq.cumulative_logprob if logprobs is not None else None,
        )
