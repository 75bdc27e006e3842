"""Speculative decoding by prompt lookup: the tokens are the greedy ones, drafts kept or not, with
every stop honoured inside the kept tokens, no block leaked and no draft in the prefix cache."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams, SpeculativeConfig, speculative
from engine.speculative import propose_ngram
from tests.tiny_models import TINY_MODEL_KINDS, hf_greedy, random_prompts

MAX_TOKENS = 16
SPECULATIVE = SpeculativeConfig(num_speculative_tokens=4)


def _greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **extra)


def test_propose_ngram_takes_the_longest_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert propose_ngram(tokens, 2, 1, 3) == [7, 8]  # "2 3" last seen before 7 8 (no "5 2 3")
    assert propose_ngram(tokens + [7], 3, 1, 3) == [8, 5, 2]  # "2 3 7" recurs
    assert propose_ngram([4, 5, 6], 3, 1, 3) == []
    assert propose_ngram(tokens, 0, 1, 3) == []
    assert propose_ngram([5, 5], 4, 1, 3) == [5]  # what follows the match, as far as it goes


def test_policy_drafts_while_drafted_steps_yield_more_and_looks_again_now_and_then():
    policy = speculative.DraftPolicy(explore_every=4)
    assert not policy.should_draft()  # a plain step is measured first
    policy.record(False, 1, 0.020)  # 50 tok/s plain
    assert policy.should_draft()  # then a drafted one
    policy.record(True, 3, 0.030)  # 100 tok/s drafted
    decisions = [policy.should_draft() for _ in range(8)]
    assert decisions == [True, True, True, False] * 2  # a plain step every 4th
    for _ in range(20):  # drafts stop being kept: drafted steps now yield 33 tok/s
        policy.record(True, 1, 0.030)
    decisions = [policy.should_draft() for _ in range(8)]
    assert decisions == [False, False, False, True] * 2
    policy.record(True, 0, 0.0)  # a step that emitted nothing teaches nothing
    assert policy.drafted_tok_s == pytest.approx(1 / 0.030, rel=0.01)


def _repetitive_prompts() -> list[list[int]]:
    """Prompts whose tokens recur, so that prompt lookup finds drafts; and plain random ones."""
    patterns = random_prompts(4, 3, 6, seed=5)
    return [p * 6 for p in patterns] + random_prompts(4, 1, 40, seed=6)


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_greedy_tokens_match_transformers_with_drafts(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    prompts = _repetitive_prompts()
    llm = LLM(folder, speculative=SPECULATIVE, max_num_seqs=4)
    outputs = llm.generate(prompts, _greedy())
    assert [o.token_ids for o in outputs] == [hf_greedy(folder, p, MAX_TOKENS) for p in prompts]
    assert llm.engine.core.speculator.num_draft_tokens > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.fixture
def oracle(monkeypatch, tiny_llama_dir):
    """Drafts from the known greedy continuation (all kept), or wrong from their `wrong_at`-th
    token on (kept up to there): the proposer replaced, the engine's own bookkeeping tested."""
    continuations: dict[tuple[int, ...], list[int]] = {}
    settings = {"wrong_at": None}

    def propose(token_ids, max_draft, min_n, max_n):
        for prompt, expected in continuations.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                draft = list(expected[done : done + max_draft])
                wrong_at = settings["wrong_at"]
                if wrong_at is not None and wrong_at < len(draft):
                    draft[wrong_at] = (draft[wrong_at] + 1) % 384
                return draft
        return []

    def expect(prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
        expected = [hf_greedy(tiny_llama_dir, p, num_tokens) for p in prompts]
        continuations.update({tuple(p): e for p, e in zip(prompts, expected, strict=True)})
        return expected

    monkeypatch.setattr(speculative, "propose_ngram", propose)
    monkeypatch.setattr(speculative.DraftPolicy, "should_draft", lambda self: True)
    return expect, settings


@pytest.mark.parametrize("wrong_at", [None, 0, 2])
def test_drafts_kept_or_taken_back_give_the_greedy_tokens(tiny_llama_dir, oracle, wrong_at):
    expect, settings = oracle
    settings["wrong_at"] = wrong_at
    prompts = random_prompts(3, 5, 40, seed=9)
    expected = expect(prompts, MAX_TOKENS)
    llm = LLM(tiny_llama_dir, speculative=SPECULATIVE, max_num_seqs=4)
    outputs = llm.generate(prompts, _greedy())
    assert [o.token_ids for o in outputs] == expected
    speculator = llm.engine.core.speculator
    assert speculator.num_draft_tokens > 0
    if wrong_at is None:
        assert speculator.num_accepted_tokens == speculator.num_draft_tokens
    else:
        assert speculator.num_accepted_tokens < speculator.num_draft_tokens
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_stops_inside_the_kept_tokens_are_honoured(tiny_llama_dir, oracle):
    expect, _ = oracle
    prompt = random_prompts(1, 20, 20, seed=13)[0]
    [continuation] = expect([prompt], MAX_TOKENS)
    llm = LLM(tiny_llama_dir, speculative=SPECULATIVE)
    # max_tokens and a stop token both fall inside a step's kept draft (1 + 4 tokens a step).
    [short] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert short.token_ids == continuation[:7] and short.finish_reason == "length"
    stop_id = continuation[8]
    first = continuation.index(stop_id)
    [stopped] = llm.generate([prompt], _greedy(stop_token_ids=[stop_id]))
    assert stopped.token_ids == continuation[: first + 1] and stopped.finish_reason == "stop"
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_rejected_drafts_never_reach_the_prefix_cache(tiny_llama_dir, oracle):
    """A block that held a rejected draft is written again with the real tokens: were it keyed
    by the draft, a later prompt would reuse the wrong KV. Later prompts that extend the first
    one's output reuse its blocks and still get transformers' tokens."""
    expect, settings = oracle
    settings["wrong_at"] = 1
    prompt = random_prompts(1, 30, 30, seed=17)[0]
    [continuation] = expect([prompt], 40)
    llm = LLM(tiny_llama_dir, speculative=SPECULATIVE, enable_prefix_caching=True)
    [first] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert first.token_ids == continuation
    longer = prompt + continuation[:33]  # whole blocks of the first one's tokens, and more
    [second] = llm.generate([longer], _greedy())
    assert second.num_cached_tokens >= 48
    assert second.token_ids == hf_greedy(tiny_llama_dir, longer, MAX_TOKENS)


def test_no_drafts_where_the_next_token_is_not_the_argmax(tiny_llama_dir):
    prompts = _repetitive_prompts()
    llm = LLM(tiny_llama_dir, speculative=SPECULATIVE)
    llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=8, seed=1))
    llm.generate(prompts, _greedy(logprobs=2))
    llm.generate(prompts, _greedy(repetition_penalty=1.2))
    assert llm.engine.core.speculator.num_draft_tokens == 0


def test_no_drafts_above_the_batch_limit(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, speculative=SpeculativeConfig(max_num_seqs=2), max_num_seqs=8)
    prompts = _repetitive_prompts()
    outputs = llm.generate(prompts, _greedy())
    assert [o.token_ids for o in outputs] == [hf_greedy(tiny_llama_dir, p, MAX_TOKENS)
                                              for p in prompts]
    assert llm.engine.core.speculator.num_draft_tokens == 0  # 8 sequences run at once
