"""One request's fault never harms another: a fault injected into one request of a running batch
(its forward, its sampling, its stop checks, its detokenization) ends that request with an error
and frees its blocks, while every other request's tokens equal its solo run, token for token."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams, SpeculativeConfig, speculative
from engine.engine_core import EngineFaultError
from tests.tiny_models import random_prompts

VICTIM = "victim"
POISON = 383  # a valid token id that only the victim's prompt holds


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir)


def _prompts() -> dict[str, list[int]]:
    prompts = random_prompts(5, 8, 40, vocab_size=POISON, seed=11)
    named = {f"r{i}": p for i, p in enumerate(prompts)}
    named[VICTIM] = prompts[0][:5] + [POISON] + prompts[0][5:]
    return named


PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _solo(llm: LLM, prompt: list[int]) -> list[int]:
    return llm.generate([prompt], PARAMS)[0].token_ids


def _run_batch(llm: LLM) -> dict:
    engine = llm.engine
    for request_id, prompt in _prompts().items():
        engine.add_request(request_id, prompt, PARAMS)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def _fault_in_forward(llm, monkeypatch):
    embed = llm.engine.runner.model.embed_tokens
    real = embed.forward

    def forward(input_ids):
        if (input_ids == POISON).any():
            raise RuntimeError("injected fault in the forward")
        return real(input_ids)

    monkeypatch.setattr(embed, "forward", forward)


def _fault_in_sampling(llm, monkeypatch):
    core = llm.engine.core
    real = core.sampler

    def sampler(logits, seqs):
        if any(s.request_id == VICTIM and s.num_output_tokens >= 2 for s in seqs):
            raise RuntimeError("injected fault in sampling")
        return real(logits, seqs)

    monkeypatch.setattr(core, "sampler", sampler)
    monkeypatch.setattr(sampler, "release", real.release, raising=False)


def _fault_in_stop_check(llm, monkeypatch):
    core = llm.engine.core
    real = core.check_stop

    def check_stop(seq, token_id):
        if seq.request_id == VICTIM and seq.num_output_tokens == 4:
            raise RuntimeError("injected fault in the stop check")
        return real(seq, token_id)

    monkeypatch.setattr(core, "check_stop", check_stop)


def _fault_in_detokenizer(llm, monkeypatch):
    processor = llm.engine.output_processor
    real = processor.add_request

    def add_request(request):
        real(request)
        if request.request_id == VICTIM:
            detokenizer = processor.states[VICTIM].seqs[0].detokenizer
            calls = {"n": 0}
            add_token = detokenizer.add_token

            def failing_add_token(token_id, *args):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("injected fault in detokenization")
                return add_token(token_id, *args)

            detokenizer.add_token = failing_add_token

    monkeypatch.setattr(processor, "add_request", add_request)


FAULTS = [_fault_in_forward, _fault_in_sampling, _fault_in_stop_check, _fault_in_detokenizer]


@pytest.mark.parametrize("inject", FAULTS)
def test_a_fault_in_one_request_leaves_the_others_exact(llm, monkeypatch, inject):
    _check_fault_isolation(llm, monkeypatch, inject)


@pytest.mark.parametrize("inject", FAULTS)
def test_a_fault_while_drafting_leaves_the_others_exact(tiny_llama_dir, monkeypatch, inject):
    """The same with speculative decoding drafting for every sequence at every step."""
    llm = LLM(tiny_llama_dir,
              speculative=SpeculativeConfig(num_speculative_tokens=3, max_num_seqs=8))
    monkeypatch.setattr(speculative.DraftPolicy, "should_draft", lambda self: True)
    monkeypatch.setattr(speculative, "propose_ngram",  # the last tokens again, as a draft
                        lambda tokens, max_draft, *_: tokens[-max_draft:] if max_draft else [])
    _check_fault_isolation(llm, monkeypatch, inject)
    assert llm.engine.core.speculator.num_draft_tokens > 0


def _check_fault_isolation(llm: LLM, monkeypatch, inject) -> None:
    solo = {rid: _solo(llm, p) for rid, p in _prompts().items() if rid != VICTIM}
    inject(llm, monkeypatch)
    finished = _run_batch(llm)
    victim = finished[VICTIM]
    assert victim.finish_reason == "error" and "injected fault" in victim.error
    for request_id, tokens in solo.items():
        assert finished[request_id].token_ids == tokens, request_id
        assert finished[request_id].error is None
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    monkeypatch.undo()
    assert _solo(llm, _prompts()["r1"]) == solo["r1"]  # and the engine serves on


def test_only_a_step_where_everything_fails_again_and_again_is_an_engine_fault(llm, monkeypatch):
    embed = llm.engine.runner.model.embed_tokens

    def broken(input_ids):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(embed, "forward", broken)
    engine = llm.engine
    outputs = []
    with pytest.raises(EngineFaultError, match="the device is gone"):
        for i in range(10):
            engine.add_request(f"dead{i}", [5, 6, 7], PARAMS)
            outputs.extend(engine.step())
    # Each request before the verdict failed alone, with its reason, and freed its blocks.
    assert [o.finish_reason for o in outputs] == ["error", "error"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
