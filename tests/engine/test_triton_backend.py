"""The engine on the Triton backend (interpreted on the CPU) gives the reference backend's greedy
tokens, with chunked prefill and prefix caching both exercised."""

from __future__ import annotations

from engine import LLM, SamplingParams
from tests.tiny_models import random_prompts


def test_triton_backend_matches_torch_backend(tiny_llama_dir):
    shared = random_prompts(1, 32, 32, seed=5)[0]
    prompts = [shared + p for p in random_prompts(4, 1, 20, seed=6)] + random_prompts(2, 3, 40)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    options = dict(max_num_batched_tokens=24, enable_prefix_caching=True)
    expected = LLM(tiny_llama_dir, attention_backend="torch", **options).generate(prompts, params)
    llm = LLM(tiny_llama_dir, attention_backend="triton", **options)
    assert llm.engine.runner.backend.name == "triton"
    llm.generate(prompts[:1], params)  # warm the prefix cache with the shared prefix
    actual = llm.generate(prompts, params)
    assert [o.token_ids for o in actual] == [o.token_ids for o in expected]
    assert llm.engine.block_manager.num_prefix_hit_tokens >= 4 * 32
