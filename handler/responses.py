"""Engine outputs rendered in the schema the request came in: TGI/LMI, OpenAI completion, OpenAI
chat; whole responses and stream records."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from engine import CompletionOutput, RequestOutput
from handler.protocol import ApiKind, Job

TokenText = Callable[[int], str]


def tgi_finish_reason(c: CompletionOutput) -> str | None:
    if c.finish_reason == "stop":
        return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"
    return c.finish_reason


def _tgi_token(token_id: int, text: str, logprobs: dict | None, special_ids: set[int]) -> dict:
    return {"id": token_id, "text": text, "logprob": (logprobs or {}).get("logprob"),
            "special": token_id in special_ids}


def _tgi_tokens(c: CompletionOutput, token_text: TokenText, special_ids: set[int]) -> list[dict]:
    """`details.tokens`: each token with its own span of the text, so that they join into it."""
    texts = c.token_texts or [token_text(t) for t in c.token_ids]
    logprobs = c.logprobs or [None] * len(c.token_ids)
    return [_tgi_token(t, text, lp, special_ids)
            for t, text, lp in zip(c.token_ids, texts, logprobs, strict=True)]


def _tgi_prefill(out: RequestOutput, token_text: TokenText) -> list[dict]:
    """`details.prefill` (`decoder_input_details`): each prompt token and its logprob given the
    ones before it (none for the first)."""
    entries = out.prompt_logprobs or []
    return [{"id": t, "text": token_text(t), "logprob": e["logprob"] if e else None}
            for t, e in zip(out.prompt_token_ids, entries, strict=False)]


def _tgi_top_tokens(entry: dict, token_text: TokenText, special_ids: set[int]) -> list[dict]:
    """TGI's `top_tokens` of one step: the most likely tokens, most likely first."""
    ranked = sorted(entry["top_logprobs"].items(), key=lambda item: -item[1])
    return [{"id": t, "text": token_text(t), "logprob": lp, "special": t in special_ids}
            for t, lp in ranked]


def tgi_response(job: Job, outputs: list[RequestOutput], token_text: TokenText,
                 special_ids: set[int]) -> list[dict]:
    results = []
    for out in outputs:
        c = out.outputs[0]
        prefix = (out.prompt or "") if job.return_full_text else ""
        item: dict[str, Any] = {"generated_text": prefix + c.text}
        if job.details:
            item["details"] = {
                "finish_reason": tgi_finish_reason(c),
                "generated_tokens": len(c.token_ids),
                "seed": job.params.seed,
                "prefill": _tgi_prefill(out, token_text),
                "tokens": _tgi_tokens(c, token_text, special_ids),
            }
            if job.top_n_tokens:
                item["details"]["top_tokens"] = [
                    _tgi_top_tokens(e, token_text, special_ids) for e in c.logprobs or []]
        results.append(item)
    return results


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _completion_logprobs(c: CompletionOutput, token_text: TokenText,
                         entries: list[dict] | None = None,
                         echoed: RequestOutput | None = None) -> dict | None:
    """OpenAI's completion `logprobs`; with `echoed`, its prompt tokens first (the first one
    without a logprob, as OpenAI answers)."""
    entries = c.logprobs if entries is None else entries
    if entries is None:
        return None
    rows = [(e["token_id"], e["logprob"], e["top_logprobs"]) for e in entries]
    if echoed is not None and echoed.prompt_logprobs is not None:
        rows = [(t, e and e["logprob"], e and e["top_logprobs"]) for t, e in
                zip(echoed.prompt_token_ids, echoed.prompt_logprobs, strict=True)] + rows
    tokens = [token_text(t) for t, _, _ in rows]
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in rows],
        "top_logprobs": [None if top is None else {token_text(t): lp for t, lp in top.items()}
                         for _, _, top in rows],
        "text_offset": list(accumulate((len(t) for t in tokens), initial=0))[: len(tokens)],
    }


def _chat_logprobs(entries: list[dict] | None, token_text: TokenText) -> dict | None:
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [
        {**item(e["token_id"], e["logprob"]),
         "top_logprobs": [item(t, lp) for t, lp in e["top_logprobs"].items()]}
        for e in entries
    ]}


def openai_response(job: Job, outputs: list[RequestOutput], request_id: str, model: str,
                    token_text: TokenText) -> dict:
    n = job.params.n
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            choice: dict[str, Any] = {"index": i * n + c.index, "finish_reason": c.finish_reason}
            if job.kind is ApiKind.CHAT:
                choice["message"] = {"role": "assistant", "content": c.text}
                choice["logprobs"] = _chat_logprobs(c.logprobs, token_text)
            else:
                choice["text"] = ((out.prompt or "") if job.echo else "") + c.text
                choice["logprobs"] = _completion_logprobs(c, token_text,
                                                          echoed=out if job.echo else None)
            choices.append(choice)
    is_chat = job.kind is ApiKind.CHAT
    return {
        "id": request_id, "object": "chat.completion" if is_chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": choices,
        "usage": _usage(outputs),
    }


# -- stream records ---------------------------------------------------------------------------


def sse(payload: dict | str, *, space: bool = True, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data:{' ' if space else ''}{data}\n\n".encode()


def json_line(payload: dict) -> bytes:
    return (json.dumps(payload, separators=(",", ":")) + "\n").encode()


class StreamFormatter:
    """Turns (prompt index, output) steps into records of one API's stream format."""

    def __init__(self, job: Job, request_id: str, model: str, token_text: TokenText,
                 special_ids: set[int], is_jsonlines: bool):
        self.job, self.request_id, self.model = job, request_id, model
        self.token_text, self.special_ids = token_text, special_ids
        self.is_jsonlines = is_jsonlines
        self.created = int(time.time())
        self.sent_role: set[int] = set()

    def _frame(self, payload: dict, event: str | None = None) -> bytes:
        if self.is_jsonlines:
            return json_line(payload)
        return sse(payload, space=self.job.kind is not ApiKind.TGI, event=event)

    def records(self, prompt_index: int, out: RequestOutput) -> list[bytes]:
        if self.job.kind is ApiKind.TGI:
            return [self._frame(r) for r in self._tgi_records(prompt_index, out.outputs[0], out)]
        return [self._frame(chunk) for c in out.outputs
                for chunk in self._openai_chunks(prompt_index * self.job.params.n + c.index, c)]

    def _tgi_records(self, prompt_index: int, c: CompletionOutput,
                     out: RequestOutput) -> list[dict]:
        """One record per token, as TGI streams; the last one carries the text and details."""
        texts = c.delta_token_texts or [self.token_text(t) for t in c.delta_token_ids]
        logprobs = c.delta_logprobs or [None] * len(c.delta_token_ids)
        records = []
        for token_id, text, entry in zip(c.delta_token_ids, texts, logprobs, strict=True):
            record: dict[str, Any] = {
                "index": prompt_index,
                "token": _tgi_token(token_id, text, entry, self.special_ids),
                "generated_text": None, "details": None,
            }
            if self.job.top_n_tokens and entry:
                record["top_tokens"] = _tgi_top_tokens(entry, self.token_text, self.special_ids)
            records.append(record)
        if c.is_finished:
            if not records:  # nothing new in the last step: its record has no token
                records.append({"index": prompt_index, "token": None})
            prefix = (out.prompt or "") if self.job.return_full_text else ""
            records[-1]["generated_text"] = prefix + c.text
            records[-1]["details"] = {"finish_reason": tgi_finish_reason(c),
                                      "generated_tokens": len(c.token_ids),
                                      "seed": self.job.params.seed}
        return records

    def _chunk(self, choices: list[dict], **extra: Any) -> dict:
        is_chat = self.job.kind is ApiKind.CHAT
        return {"id": self.request_id,
                "object": "chat.completion.chunk" if is_chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}

    def _openai_chunks(self, index: int, c: CompletionOutput) -> list[dict]:
        if not c.delta_text and not c.is_finished and index in self.sent_role:
            return []
        chunks = []
        if self.job.kind is ApiKind.CHAT:
            if index not in self.sent_role:
                self.sent_role.add(index)
                delta = {"role": "assistant", "content": ""}
                chunks.append(self._chunk([{"index": index, "delta": delta, "logprobs": None,
                                            "finish_reason": None}]))
            if c.delta_text or c.is_finished:
                choice = {"index": index, "delta": {"content": c.delta_text} if c.delta_text
                          else {}, "logprobs": _chat_logprobs(c.delta_logprobs, self.token_text),
                          "finish_reason": c.finish_reason}
                chunks.append(self._chunk([choice]))
        else:
            self.sent_role.add(index)
            logprobs = (_completion_logprobs(c, self.token_text, c.delta_logprobs)
                        if c.delta_logprobs is not None else None)
            chunks.append(self._chunk([{"index": index, "text": c.delta_text,
                                        "logprobs": logprobs, "finish_reason": c.finish_reason}]))
        return chunks

    def usage_record(self, outputs: list[RequestOutput]) -> list[bytes]:
        if self.job.kind is ApiKind.TGI or not self.job.include_usage:
            return []
        return [self._frame(self._chunk([], usage=_usage(outputs)))]

    def done_record(self) -> list[bytes]:
        return [] if self.job.kind is ApiKind.TGI or self.is_jsonlines else [sse("[DONE]")]

    def error_record(self, message: str, generated: dict[int, str]) -> bytes:
        """The final record of a stream that failed: finish reason "error"."""
        error = {"message": message, "type": "generation_error"}
        if self.job.kind is ApiKind.TGI:
            return self._frame({"token": None, "generated_text": "".join(generated.values()),
                                "details": {"finish_reason": "error"}, "error": message,
                                "error_type": "generation"}, event="error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": "error", "logprobs": None}
        choice.update({"delta": {}} if self.job.kind is ApiKind.CHAT else {"text": ""})
        return self._frame(self._chunk([choice], error=error), event="error")
