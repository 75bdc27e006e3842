"""Sampling: seeds are per request, filters keep the right tokens, penalties and stops behave."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, RequestError, SamplingParams
from engine.sampler import Sampler
from engine.sequence import Sequence
from tests.tiny_models import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    prompt = random_prompts(1, 10, 10, seed=5)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = random_prompts(6, 3, 40, seed=9)
    noise = SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)
    batch = llm.generate(others[:3] + [prompt] + others[3:], [noise] * 3 + [seeded] + [noise] * 3)
    assert batch[3].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=43, max_tokens=16,
                                    ignore_eos=True)
    assert llm.generate([prompt], different_seed)[0].token_ids != alone


def test_n_samples_share_prompt_blocks_and_differ(llm):
    prompt = random_prompts(1, 40, 40, seed=2)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    engine = llm.engine
    engine.block_manager.reset_prefix_cache()
    before = engine.num_prompt_tokens_computed
    [out] = llm.generate([prompt], params)
    # the first sample computes 40 prompt tokens; each sibling only the 8 past its 2 full blocks
    assert engine.num_prompt_tokens_computed - before == 40 + 2 * 8
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _seq(tokens, **params) -> Sequence:
    return Sequence("r", tokens, SamplingParams(**params))


def _sample_many(logits: torch.Tensor, num: int, **params) -> set[int]:
    sampler = Sampler(eos_token_ids=(0,))
    return {
        sampler(logits[None].clone(), [_seq([1], seed=i, **params)])[0].token_id
        for i in range(num)
    }


def test_top_k_top_p_min_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05]))
    assert _sample_many(logits, 60, top_k=2) == {1, 2}
    assert _sample_many(logits, 60, top_p=0.65) == {1, 2}
    assert _sample_many(logits, 60, min_p=0.6) == {1, 2}
    assert _sample_many(logits, 5, temperature=0.0) == {1}


def test_penalties_and_min_tokens():
    sampler = Sampler(eos_token_ids=(0,))
    logits = torch.tensor([[5.0, 4.0, 3.9, 1.0]])
    # token 0 is EOS: banned until min_tokens outputs exist
    assert sampler(logits.clone(), [_seq([3], temperature=0, min_tokens=2)])[0].token_id == 1
    logits = torch.tensor([[1.0, 4.0, 3.9, 0.5]])
    # repetition penalty divides the positive logit of a seen token: 4.0 / 2 < 3.9
    seq = _seq([1], temperature=0, repetition_penalty=2.0)
    assert sampler(logits.clone(), [seq])[0].token_id == 2
    # presence penalty only counts generated tokens
    seq = _seq([3], temperature=0, presence_penalty=2.0)
    seq.append_token(1)
    assert sampler(logits.clone(), [seq])[0].token_id == 2


def test_logit_bias_moves_the_choice_and_not_the_logprobs():
    sampler = Sampler(eos_token_ids=())
    logits = torch.tensor([[1.0, 2.0, 3.0, 2.5]])
    [result] = sampler(logits.clone(), [_seq([0], temperature=0, logprobs=1,
                                             logit_bias={2: -100.0, 0: 1.0})])
    assert result.token_id == 3  # 3.0 - 100 < 2.5 > 2.0 = 1.0 + 1.0
    assert result.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[3]))
    assert _sample_many(logits[0], 30, temperature=1.0, logit_bias={1: 100.0}) == {1}


def test_logit_bias_forces_a_token_through_the_engine(llm):
    prompt = random_prompts(1, 10, 10, seed=3)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    forced_id = next(t for t in range(5, 100) if t not in free[0].token_ids)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                            logit_bias={forced_id: 100.0})
    assert llm.generate([prompt], params)[0].token_ids == [forced_id] * 4


def test_logprobs_are_the_raw_distribution():
    sampler = Sampler(eos_token_ids=())
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    [result] = sampler(logits.clone(), [_seq([0], temperature=0, logprobs=2)])
    expected = torch.log_softmax(logits[0], -1)
    assert result.token_id == 2
    assert result.logprob == pytest.approx(float(expected[2]))
    assert set(result.top_logprobs) == {2, 1}


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "empty"),
        ([1, 2, 99999], SamplingParams(), "99999 is not a token id"),
        ([1, 2], SamplingParams(stop_token_ids=[-1]), "-1 is not a token id"),
        ([1, 2], SamplingParams(stop_token_ids=[2**70]), "is not a token id"),
        ([1] * 500, SamplingParams(max_tokens=20), "context length"),
    ],
)
def test_requests_that_can_never_run_are_refused(llm, prompt, params, message):
    with pytest.raises(RequestError, match=message):
        llm.engine.add_request("bad", prompt, params)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    for i, prompt in enumerate(random_prompts(4, 20, 60, seed=4)):
        engine.add_request(f"a{i}", prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for i in range(4):
        engine.abort(f"a{i}")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_request_larger_than_the_whole_cache_is_refused(tiny_llama_dir):
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 tokens, 2 kv heads, d 16, fp32
    small = LLM(tiny_llama_dir, kv_cache_memory=2 * block_bytes)
    assert small.engine.cache_config.num_blocks == 2
    with pytest.raises(RequestError, match="KV blocks"):
        small.engine.add_request("big", [5] * 30, SamplingParams(max_tokens=10))
    [ok] = small.generate([[5] * 20], SamplingParams(max_tokens=10, ignore_eos=True))
    assert len(ok.token_ids) == 10
