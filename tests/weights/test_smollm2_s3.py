"""The embedded SmolLM2 (GGUF) tensorized to the loopback S3 server, loaded back in the
background: progress is visible mid-load, and the greedy tokens equal transformers'."""

from __future__ import annotations

import time

import pytest

from engine import EngineConfig, SamplingParams
from engine.background import BackgroundLoader, LoadState
from engine.weights.tensorize import tensorize
from tests.tiny_models import hf_default_model, hf_model_greedy

pytestmark = pytest.mark.slow


def test_smollm2_from_s3_matches_transformers(s3, s3_endpoint):
    tensorize("", "s3://models/smollm2", "float32", s3_endpoint)
    loader = BackgroundLoader(EngineConfig("s3://models/smollm2", s3_endpoint=s3_endpoint,
                                           max_model_len=1024))
    loader.start()
    seen_partial = False
    while not loader.wait(0.005):
        snap = loader.progress.snapshot()
        seen_partial |= 0 < snap["loaded_bytes"] < snap["total_bytes"]
        assert loader.status()["status"] == "loading"
    assert loader.state is LoadState.READY, loader.status()
    assert seen_partial, "no partial progress was observed while loading"
    engine = loader.engine
    assert engine.progress.loaded_bytes == engine.progress.total_bytes > 500e6

    prompt = engine.hf_tokenizer.encode("Once upon a time, in a small village,")
    expected = hf_model_greedy(hf_default_model(), prompt, 32)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    output = None
    start = time.monotonic()
    while engine.has_unfinished_requests() and time.monotonic() - start < 60:
        for out in engine.step():
            output = out
    assert output is not None and output.token_ids == expected
