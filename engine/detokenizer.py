"""Incremental detokenization with stop strings.

Text grows one token at a time through `tokenizers`' DecodeStream, which holds back bytes until
they form whole UTF-8 characters. Stop strings are searched across token boundaries; while a
sequence runs, the last `max_stop_len - 1` characters are held back, so that no streamed text is
ever part of a stop string, and with them the tokens that begin there: text, tokens and logprobs
end at the same place (as vLLM does it). With `include_stop_str_in_output` nothing is cut.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

from tokenizers.decoders import DecodeStream

from engine.sampling_params import SamplingParams

# Prompt tokens the stream starts from: enough context that the first generated word keeps its
# leading space with SentencePiece-style decoders (they strip it at the start of a text).
NUM_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any | None, params: SamplingParams,
                 prompt_token_ids: list[int] = ()):
        # `tokenizer` is a `tokenizers.Tokenizer` (the fast backend), or None: ids only.
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        self.stream = DecodeStream(context or None, params.skip_special_tokens)
        self.stop = params.stop
        self.max_stop_len = params.max_stop_len
        self.is_stop_kept = params.include_stop_str_in_output
        # Text that may begin a stop string is held back unless stop strings are kept.
        self.num_held_chars = 0 if self.is_stop_kept else max(0, params.max_stop_len - 1)
        self.text = ""
        self.num_emitted_chars = 0
        self.token_starts: list[int] = []  # where each token's text begins in `text`
        self.is_stopped = False  # a stop string was found (and, unless kept, cut off)

    def add_token(self, token_id: int, can_stop: bool = True) -> str | None:
        """Append the token's text; return the stop string it completed, if any (only looked for
        when `can_stop`: not before `min_tokens`)."""
        if self.tokenizer is None:
            return None
        self.token_starts.append(len(self.text))
        piece = self.stream.step(self.tokenizer, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += piece
        return self._find_stop(search_from) if can_stop else None

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.is_stopped = True
        if not self.is_stop_kept:
            self.text = self.text[: best[0]]
        return best[1]

    def take_delta(self, is_finished: bool) -> str:
        """The text not yet emitted, less a possible stop-string prefix while still running."""
        end = len(self.text)
        if not is_finished and self.num_held_chars:
            end = max(self.num_emitted_chars, end - self.num_held_chars)
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta

    def num_released_tokens(self, num_tokens: int, is_finished: bool) -> int:
        """How many of the first `num_tokens` tokens may be reported. While text is held back, a
        token once all of its text is emitted; at a stop string that was cut, every token that
        begins before the cut; otherwise all."""
        if self.tokenizer is None or not self.stop or self.is_stop_kept:
            return num_tokens
        starts, emitted = self.token_starts, self.num_emitted_chars
        if is_finished:
            return bisect_left(starts, emitted, hi=num_tokens) if self.is_stopped else num_tokens
        if num_tokens == 0:
            return 0
        # Token i ends where token i + 1 begins; the last one at the end of the text.
        num_ended = bisect_right(starts, emitted, lo=1, hi=num_tokens) - 1
        if num_ended == num_tokens - 1 and len(self.text) <= emitted:
            return num_tokens
        return num_ended

    def token_texts(self, begin: int, end: int) -> list[str]:
        """The emitted text of tokens `begin..end-1`, each its own span (empty while a token only
        holds part of a character); they join into the emitted text."""
        starts = self.token_starts
        limit = self.num_emitted_chars
        if begin >= end:
            return []
        ends = [*starts[begin + 1 : end + 1], limit][: end - begin]
        return [self.text[min(start, limit) : min(stop, limit)]
                for start, stop in zip(starts[begin:end], ends, strict=True)]
