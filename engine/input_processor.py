"""Input processing, as vLLM v1 splits it: text or token ids in, a validated engine request out.

Tokenizes (off the engine thread: any thread may call it), applies the chat template, and checks
the request against the model before it can reach the engine core: every token id it carries is
in the vocabulary, the prompt fits the context and the cache. Hopeless prompts are refused from
their length in characters before any tokenizing, whatever their size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.block_manager import cdiv
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer


class RequestError(ValueError):
    """A request the engine refuses: it could never run, or its input is invalid.

    `param` names the offending field as the caller spelled it ("prompt", "stop_token_ids"...).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineRequest:
    """What the engine core runs: token ids and sampling parameters, already validated."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class InputLimits:
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, limits: InputLimits):
        self.tokenizer = tokenizer
        self.limits = limits
        # No token decodes to more characters than its longest vocabulary entry: a text longer
        # than max_model_len x that many characters cannot fit the context, whatever it says.
        self.max_chars_per_token = _max_chars_per_token(tokenizer)

    @property
    def max_prompt_chars(self) -> int:
        return self.limits.max_model_len * self.max_chars_per_token

    def process(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        arrival_time: float,
    ) -> EngineRequest:
        """Tokenize and validate; raise RequestError for a request that could never run."""
        if isinstance(prompt, str):
            prompt_text, prompt_token_ids = prompt, self._encode(prompt)
        else:
            prompt_text, prompt_token_ids = None, list(prompt)
        self.validate(prompt_token_ids, params)
        return EngineRequest(request_id, prompt_text, prompt_token_ids, params, arrival_time)

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The model's chat template applied to `messages`, ready to generate from."""
        tokenizer = self.tokenizer
        if tokenizer is None or not tokenizer.facts.has_chat_template:
            raise RequestError("this model has no chat template: send a plain prompt", "messages")
        num_chars = sum(len(str(m.get("content") or "")) for m in messages)
        self._check_chars(num_chars, "messages")
        hf_tokenizer = tokenizer.hf_tokenizer  # transformers' part, loaded on first use
        try:
            text = hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # noqa: BLE001 - template errors come from the caller's input
            raise RequestError(f"the chat template rejected the messages: {e}", "messages") from e
        # The template already holds the special tokens (BOS included).
        return self._encode(text, add_special_tokens=False)

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send token ids", "prompt")
        self._check_chars(len(text), "prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise RequestError(
                f"the prompt ({num_chars} characters) cannot fit the model's context of "
                f"{self.limits.max_model_len} tokens", param,
            )

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        limits = self.limits
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("the prompt is empty", "prompt")
        self.check_token_ids(prompt_token_ids, "prompt")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_token_ids(list(params.logit_bias), "logit_bias")
        if num_prompt + params.max_tokens > limits.max_model_len:
            raise RequestError(
                f"prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context length ({limits.max_model_len} tokens)", "prompt",
            )
        num_blocks = cdiv(num_prompt + params.max_tokens, limits.block_size)
        if num_blocks > limits.num_blocks:
            raise RequestError(
                f"the request needs {num_blocks} KV blocks; the whole cache holds "
                f"{limits.num_blocks}", "max_tokens",
            )

    def check_token_ids(self, token_ids: Any, param: str) -> None:
        vocab_size = self.limits.vocab_size
        for i, token_id in enumerate(token_ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not (
                0 <= token_id < vocab_size
            ):
                raise RequestError(
                    f"{param}[{i}]: {token_id!r} is not a token id of this model "
                    f"(0 to {vocab_size - 1})", param,
                )


def _max_chars_per_token(tokenizer: Tokenizer | None) -> int:
    return tokenizer.max_token_chars() if tokenizer is not None else 1
