"""Per-request sampling parameters, named as in vLLM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # True: the text keeps the stop string (all of the tokens' text, as TGI answers); False: the
    # text, tokens and logprobs all end where the stop string begins.
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; N: and the top N
    prompt_logprobs: int | None = None  # the same for each prompt token (given the ones before)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        # Accept a single string or lists where a tuple is stored, as users write them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        floats = (self.temperature, self.top_p, self.min_p, self.repetition_penalty,
                  self.presence_penalty, self.frequency_penalty, *self.logit_bias.values())
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in floats):
            raise ValueError("sampling parameters must be finite numbers")
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be -1, 0 (off) or positive"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be ints"),
            (all(isinstance(t, int) for t in self.logit_bias), "logit_bias keys must be ints"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()),
             "logit_bias values must be in [-100, 100]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def needs_only_argmax(self) -> bool:
        """Greedy, and nothing else reads the logits: no logprobs, bias, penalties or
        min_tokens. The model runner may then compute only the argmax (greedy_head.py)."""
        return (self.is_greedy and self.logprobs is None and not self.logit_bias
                and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and self.min_tokens == 0)

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def for_sibling(self, index: int) -> SamplingParams:
        """The params of the index-th of n samples: a distinct seed so siblings differ."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=self.seed + index)
