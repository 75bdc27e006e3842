"""The compiled one-sequence decode step (`compile_decode=True`): once built and swapped in, the
greedy tokens still equal transformers', and the batch steps stay eager."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import hf_greedy, random_prompts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_compiled_decode_matches_transformers(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    llm = LLM(folder, compile_decode=True)
    compiled = llm.engine.runner.compiled_decode
    assert compiled.is_ready.wait(600), "the compiled step was never built"
    calls = {"n": 0}
    real_call = compiled.compiled

    def counted(*args):
        calls["n"] += 1
        return real_call(*args)

    compiled.compiled = counted
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = random_prompts(3, 5, 60, seed=3)
    for prompt in prompts:  # one at a time: every decode step goes through the compiled graph
        [out] = llm.generate([prompt], params)
        assert out.token_ids == hf_greedy(folder, prompt, 24)
    assert calls["n"] == 3 * 23
    before = calls["n"]
    together = llm.generate(prompts, params)  # a batch of three: eager steps
    assert [o.token_ids for o in together] == [hf_greedy(folder, p, 24) for p in prompts]
    assert calls["n"] - before < 3 * 23
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
