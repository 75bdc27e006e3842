"""The embedded SmolLM2 (GGUF) tensorized to the loopback S3 server, loaded back in the
background: held mid-load by the test (a proxy stops the weights' responses past a byte), /ping
tells the phase and the partial bytes; once let go, the greedy tokens equal transformers'."""

from __future__ import annotations

import pytest

from engine import BackgroundLoader, EngineConfig, LoadState, SamplingParams
from engine.weights.tensorize import tensorize
from tests.polling import eventually
from tests.s3_proxy import s3_proxy
from tests.tiny_models import hf_default_model, hf_model_greedy

pytestmark = pytest.mark.slow


def test_smollm2_from_s3_matches_transformers(s3, s3_endpoint):
    tensorize("", "s3://models/smollm2", "float32", s3_endpoint)
    with s3_proxy(s3_endpoint) as (endpoint, control):
        control.hold_key, control.hold_from_byte = "smollm2/model.tensors", 200 << 20
        loader = BackgroundLoader(EngineConfig("s3://models/smollm2", s3_endpoint=endpoint,
                                               max_model_len=1024))
        loader.start()
        assert control.held.wait(120), "the load never reached the held range"
        # The read starts before the imports (it may reach the held byte while torch still
        # imports): wait until the deserializer has taken bytes, then the load is mid-weights.
        assert eventually(lambda: loader.progress.loaded_bytes > 0, 120)
        status = loader.status()
        assert status["status"] == "loading" and status["phase"] == "weights"
        assert 0 < status["loaded_bytes"] < status["total_bytes"] == loader.progress.total_bytes
        control.release.set()
        assert loader.wait(120)
    assert loader.state is LoadState.READY, loader.status()
    engine = loader.engine
    assert engine.progress.loaded_bytes == engine.progress.total_bytes > 500e6

    prompt = engine.tokenizer.encode("Once upon a time, in a small village,")
    expected = hf_model_greedy(hf_default_model(), prompt, 32)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    output = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            output = out
    assert output is not None and output.token_ids == expected
