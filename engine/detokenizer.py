"""Incremental detokenization with stop strings.

Text grows one token at a time through `tokenizers`' DecodeStream, which holds back bytes until
they form whole UTF-8 characters. Stop strings are searched across token boundaries; while a
sequence runs, the last `max_stop_len - 1` characters are held back, so that no streamed text is
ever part of a stop string.
"""

from __future__ import annotations

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
        self.text = ""
        self.num_emitted_chars = 0

    def add_token(self, token_id: int) -> str | None:
        """Append the token's text; return the stop string it completed, if any."""
        if self.tokenizer is None:
            return None
        piece = self.stream.step(self.tokenizer, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += piece
        return self._truncate_at_stop(search_from)

    def _truncate_at_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def take_delta(self, is_finished: bool) -> str:
        """The text not yet emitted, less a possible stop-string prefix while still running."""
        end = len(self.text)
        if not is_finished and self.max_stop_len > 1:
            end = max(self.num_emitted_chars, end - (self.max_stop_len - 1))
        delta = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta
