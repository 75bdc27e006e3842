"""What a loaded engine tells its server about itself: limits, dtype and enough of the tokenizer
to name tokens. Pure Python and picklable, so it crosses from the engine process to the server,
which never imports torch or transformers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineInfo:
    max_model_len: int
    dtype: str  # "float32", "bfloat16", ...
    device_type: str  # "cpu", "cuda"
    eos_token_ids: tuple[int, ...]
    special_token_ids: tuple[int, ...] = ()
    tokenizer_json: str | None = None  # the fast tokenizer, serialized; None: no tokenizer
    # Token ids whose text transformers' decode changes after the fast tokenizer (its
    # `clean_up_tokenization_spaces`); empty for most models.
    token_text_overrides: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer | None, **limits: Any) -> EngineInfo:
        if tokenizer is None:
            return cls(**limits)
        facts = tokenizer.facts
        return cls(**limits, special_token_ids=facts.special_token_ids,
                   tokenizer_json=tokenizer.backend.to_str(),
                   token_text_overrides=facts.token_text_overrides)

    def token_text_decoder(self) -> Callable[[int], str]:
        """id -> the text transformers' `decode([id])` gives. The tokenizer behind it is built
        on the first call (~0.1 s holding the GIL): only requests that name tokens (logprobs,
        TGI details) need it, and the server's /ping should not wait for it."""
        if self.tokenizer_json is None:
            return lambda token_id: ""
        overrides = self.token_text_overrides
        tokenizer = _LazyTokenizer(self.tokenizer_json)

        def token_text(token_id: int) -> str:
            text = overrides.get(token_id)
            return text if text is not None else tokenizer.get().decode(
                [token_id], skip_special_tokens=False)

        return token_text


class _LazyTokenizer:
    def __init__(self, tokenizer_json: str):
        self.tokenizer_json = tokenizer_json
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from tokenizers import Tokenizer

                    self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer
