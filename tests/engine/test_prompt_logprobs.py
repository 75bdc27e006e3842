"""Prompt logprobs (TGI's `decoder_input_details`) equal transformers' for every prompt token,
across chunked prefill, a prefix the cache holds, and preemption."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.test_greedy_matches_transformers import TINY_BLOCK_BYTES
from tests.tiny_models import _hf_model, random_prompts

PROMPTS = random_prompts(4, 30, 70, seed=5)


def _hf_prompt_logprobs(folder: str, prompt: list[int]) -> torch.Tensor:
    """[len - 1, vocab]: transformers' logprobs of every position's next token."""
    with torch.inference_mode():
        logits = _hf_model(folder)(torch.tensor([prompt])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _check(folder: str, outputs, num_top: int) -> None:
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        reference = _hf_prompt_logprobs(folder, prompt)
        entries = out.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        assert [e["token_id"] for e in entries[1:]] == prompt[1:]
        expected = reference.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        got = torch.tensor([e["logprob"] for e in entries[1:]])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        for entry, row in zip(entries[1:], reference, strict=True):
            assert len(entry["top_logprobs"]) == num_top
            assert set(entry["top_logprobs"]) == set(row.topk(num_top).indices.tolist())


@pytest.mark.parametrize("num_top", [0, 3])
def test_prompt_logprobs_match_transformers_under_chunked_prefill(tiny_llama_dir, num_top):
    llm = LLM(tiny_llama_dir, max_num_batched_tokens=24, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=num_top)
    _check(tiny_llama_dir, llm.generate(PROMPTS, params), num_top)
    # Again: the prompts' blocks are cached now, yet every token is scored.
    _check(tiny_llama_dir, llm.generate(PROMPTS, params), num_top)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_prompt_logprobs_survive_preemption(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, kv_cache_memory=7 * TINY_BLOCK_BYTES, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate(PROMPTS, params)
    assert llm.engine.scheduler.num_preemptions > 0
    _check(tiny_llama_dir, outputs, 0)


def test_no_prompt_logprobs_unless_asked(tiny_llama_dir):
    [out] = LLM(tiny_llama_dir).generate(PROMPTS[:1], SamplingParams(max_tokens=2))
    assert out.prompt_logprobs is None
