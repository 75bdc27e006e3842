"""Weights moved into huge pages: the same values, one copy per storage, a tied head still tied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.layers.linear import (
    PackedLinear,
    move_plain_weights_to_huge_pages,
    pack_and_move,
    pack_linears,
)
from engine.weights.huge_pages import ALIGNMENT, huge_page_zeros, move_to_huge_pages, populate
from tests.residency import resident_bytes


def test_copies_are_equal_aligned_and_shared_where_the_inputs_were():
    a = torch.randn(300, 7)
    b = torch.randn(5, 64).to(torch.bfloat16)
    moved = move_to_huge_pages([a, b, a])
    assert [torch.equal(m, t) for m, t in zip(moved, [a, b, a], strict=True)] == [True] * 3
    assert [m.dtype for m in moved] == [torch.float32, torch.bfloat16, torch.float32]
    assert all(m.is_contiguous() and m.data_ptr() % ALIGNMENT == 0 for m in moved)
    assert moved[0].data_ptr() == moved[2].data_ptr() != a.data_ptr()
    a.zero_()  # a copy, not a view of the input
    assert moved[0].abs().sum() > 0


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = None  # tied to the embedding


def test_pack_linears_keeps_a_tied_head_tied_in_huge_pages():
    model = TiedModel()
    x = torch.randn(2, 16)
    expected = (model.proj(x), x @ model.embed_tokens.weight.T)
    with torch.no_grad():
        assert pack_linears(model) == 2
        move_plain_weights_to_huge_pages(model)
    assert isinstance(model.lm_head, PackedLinear)
    # one copy of the embedding: the module's parameter and the head's plain weight
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert model.embed_tokens.weight.data_ptr() % ALIGNMENT == 0
    with torch.inference_mode():
        torch.testing.assert_close(model.proj(x), expected[0])
        torch.testing.assert_close(model.lm_head(x), expected[1])


def test_the_engine_packs_and_moves_its_weights_in_the_background(tiny_model_dirs):
    from engine import LLM, SamplingParams

    llm = LLM(tiny_model_dirs["qwen2"])  # a tied head
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = llm.generate([[5, 6, 7]], params)[0].token_ids  # may run while the copy does
    llm.engine.runner.wait_for_weight_mover()
    model = llm.engine.runner.model
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() % ALIGNMENT == 0
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.packed_weight is not None for m in packed)
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == before


def test_shutdown_waits_for_the_move(tiny_model_dirs, monkeypatch):
    """A daemon thread still copying when the interpreter finalizes aborts the process, so the
    engine's shutdown returns only once the move is done."""
    import threading
    import time

    from engine import LLM, model_runner

    finished = threading.Event()

    def slow_move(model: nn.Module) -> None:
        time.sleep(0.5)
        pack_and_move(model)
        finished.set()

    monkeypatch.setattr(model_runner, "pack_and_move", slow_move)
    llm = LLM(tiny_model_dirs["llama"])
    llm.engine.runner.start_weight_mover()
    llm.shutdown()
    assert finished.is_set()


def test_the_move_waits_for_the_first_step_to_be_out(tiny_model_dirs, monkeypatch):
    """A cold start's first request arrives as the engine turns ready: packing and moving (both
    cores for ~2 s) start with the second step, or when the engine is idle, not before."""
    from engine import LLM, SamplingParams, model_runner

    started = []
    monkeypatch.setattr(model_runner, "pack_and_move", lambda model: started.append(model))
    llm = LLM(tiny_model_dirs["llama"])
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([[5, 6, 7]], params)  # one step
    assert not started
    llm.generate([[5, 6, 7]], params)
    llm.engine.runner.wait_for_weight_mover(start=False)
    assert len(started) == 1

    idle = LLM(tiny_model_dirs["llama"])
    idle.engine.when_idle()
    idle.engine.runner.wait_for_weight_mover(start=False)
    assert len(started) == 2
    idle.shutdown()
    llm.shutdown()


def test_populate_maps_pages_in_and_keeps_their_contents():
    memory = huge_page_zeros(8 << 20)
    memory[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # written: these pages are in
    before = resident_bytes(memory)
    if not populate(memory, 0, 4 << 20):
        pytest.skip("no MADV_POPULATE_WRITE on this kernel")
    assert resident_bytes(memory[: 4 << 20]) == 4 << 20 > before
    assert memory[:4].tolist() == [1, 2, 3, 4] and int(memory[4:].sum()) == 0


def test_idle_engine_faults_its_kv_cache_in(tiny_model_dirs):
    # The cache is mapped untouched at start; idle calls fault it in, a slice each, with the
    # blocks a request wrote unchanged.
    llm = LLM(tiny_model_dirs["llama"], kv_cache_memory=48 << 20)
    runner = llm.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], params)[0].token_ids
    cache_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    assert resident_bytes(runner.kv_cache) < cache_bytes
    written = runner.kv_cache.clone()
    runner.wait_for_weight_mover()
    calls = 0
    while llm.engine.when_idle():
        calls += 1
    if runner.kv_prefaulted is None and calls == 0:
        pytest.skip("no MADV_POPULATE_WRITE on this kernel")
    assert calls == -(-cache_bytes // (16 << 20))
    assert resident_bytes(runner.kv_cache) == cache_bytes
    assert torch.equal(runner.kv_cache, written)
    assert not llm.engine.when_idle()  # done: the loop goes back to its long wait
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == expected
    llm.shutdown()
