"""The background load turns the garbage collector off while it runs and back on after, a
failed load too, and freezes what the load made."""

from __future__ import annotations

import gc

import pytest

from engine import BackgroundLoader, EngineConfig, LoadState


@pytest.mark.parametrize("is_missing", [False, True])
def test_the_collector_is_off_during_a_load_and_on_after(tiny_llama_dir, tmp_path, monkeypatch,
                                                         is_missing):
    from engine import llm_engine

    seen: list[bool] = []
    original = llm_engine.LLMEngine.__init__

    def init(self, *args, **kwargs):
        seen.append(gc.isenabled())
        original(self, *args, **kwargs)

    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", init)
    model = str(tmp_path / "no-such-model") if is_missing else tiny_llama_dir
    num_frozen = gc.get_freeze_count()
    loader = BackgroundLoader(EngineConfig(model))
    loader.start()
    assert loader.wait(120)
    try:
        assert loader.state is (LoadState.FAILED if is_missing else LoadState.READY)
        assert seen == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() > num_frozen
    finally:
        loader.shutdown()


def test_nothing_collectable_is_frozen_by_a_load(tiny_llama_dir, tmp_path):
    """A tensorized model's load leaves tensorizer's records (which hold every loaded tensor) in
    reference cycles: they must be collected before the freeze, or the weights the model has
    replaced stay resident for good."""
    import torch

    from engine.weights.tensorize import tensorize

    tensorize(tiny_llama_dir, str(tmp_path / "tensorized"), "float32")
    # The load freezes what exists when it starts: garbage earlier tests left uncollected would
    # be frozen with it and show up below, though no load made it. So would what earlier tests'
    # loads froze (unfrozen below with the rest) and has died since, and tensors of earlier
    # tests that die during the load: tensors that existed before the load are not the load's.
    gc.unfreeze()
    gc.collect()
    earlier = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    loader = BackgroundLoader(EngineConfig(str(tmp_path / "tensorized"), quantization="int8"))
    loader.start()
    assert loader.wait(120)
    try:
        assert loader.state is LoadState.READY
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, torch.Tensor) and id(o) not in earlier]
        assert leaked == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.freeze()
        loader.shutdown()
