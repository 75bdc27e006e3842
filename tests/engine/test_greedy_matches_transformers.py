"""The engine's greedy tokens equal transformers' for tiny random Llama, Mistral, Qwen2 and a
llama3-rope-scaled Llama, under chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import TINY_MODEL_KINDS, hf_greedy, random_prompts

MAX_TOKENS = 12
# bytes of one 16-token block of the tiny models: k and v, 2 layers, 2 kv heads, head_dim 16, fp32
TINY_BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4


def _greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **extra)


def _expected(folder: str, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(folder, p, MAX_TOKENS) for p in prompts]


PROMPTS = random_prompts(10, 1, 90, seed=7)


@pytest.mark.parametrize("backend", ["cpu", "torch"])  # the C++ kernels and the references
@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_chunked_prefill_matches(tiny_model_dirs, kind, backend):
    folder = tiny_model_dirs[kind]
    llm = LLM(folder, max_num_batched_tokens=24, max_num_seqs=4, enable_prefix_caching=False,
              attention_backend=backend)
    assert llm.engine.runner.backend.name == backend
    outputs = llm.generate(PROMPTS, _greedy())
    assert [o.token_ids for o in outputs] == _expected(folder, PROMPTS)
    assert all(o.finish_reason == "length" for o in outputs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_preemption_matches(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    # 8 blocks: any one request fits, but the batch does not, so running requests get preempted.
    llm = LLM(folder, kv_cache_memory=8 * TINY_BLOCK_BYTES, max_num_batched_tokens=64)
    assert llm.engine.cache_config.num_blocks == 8
    outputs = llm.generate(PROMPTS, _greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == _expected(folder, PROMPTS)
    assert llm.engine.block_manager.num_free_blocks == 8


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_prefix_caching_skips_shared_blocks(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    shared = random_prompts(1, 48, 48, seed=11)[0]  # exactly 3 blocks of 16
    first, second = shared + [5, 6, 7, 8, 9], shared + [10, 11, 12]
    llm = LLM(folder, enable_prefix_caching=True)
    engine = llm.engine
    [out_first] = llm.generate([first], _greedy())
    before = engine.num_prompt_tokens_computed
    [out_second] = llm.generate([second], _greedy())
    computed_for_second = engine.num_prompt_tokens_computed - before
    assert computed_for_second <= len(second) - 48
    assert engine.block_manager.num_prefix_hit_tokens >= 48
    assert out_first.token_ids == hf_greedy(folder, first, MAX_TOKENS)
    assert out_second.token_ids == hf_greedy(folder, second, MAX_TOKENS)
    # The batch as a whole, with prefixes shared between its prompts, matches too.
    batch = [shared + p for p in random_prompts(8, 1, 30, seed=3)]
    outputs = llm.generate(batch, _greedy())
    assert [o.token_ids for o in outputs] == _expected(folder, batch)
