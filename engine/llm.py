"""The offline API, as vLLM users know it: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "", **engine_options: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        """transformers' tokenizer, as vLLM's `LLM.get_tokenizer` gives it."""
        tokenizer = self.engine.tokenizer
        return tokenizer.hf_tokenizer if tokenizer is not None else None

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (they also exit with this one)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or lists of token ids."""
        prompt_list = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompt_list) if isinstance(params, SamplingParams) else params
        if len(params_list) != len(prompt_list):
            raise ValueError("give one SamplingParams for all prompts or one per prompt")
        request_ids = [f"offline-{next(self._ids)}" for _ in prompt_list]
        for request_id, prompt, p in zip(request_ids, prompt_list, params_list, strict=True):
            self.engine.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None):
        """Apply the model's chat template, then generate."""
        return self.generate([self.engine.chat_prompt_ids(messages)], sampling_params)[0]


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts
