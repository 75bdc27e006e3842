"""Tensor parallelism on the CPU with gloo: greedy tokens with 2 ranks equal transformers' (and so
one rank's) for tiny Llama, Mistral and Qwen2 models, under chunked prefill and preemption; a
model that does not split is refused; no worker outlives its engine."""

from __future__ import annotations

import multiprocessing

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import TINY_MODEL_KINDS, hf_greedy, random_prompts

MAX_TOKENS = 10
PROMPTS = random_prompts(6, 1, 70, seed=21)
# one 16-token block of a tiny model on one of 2 ranks: k and v, 2 layers, 1 kv head, dim 16, fp32
RANK_BLOCK_BYTES = 2 * 2 * 16 * 1 * 16 * 4


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_two_ranks_match_transformers(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    expected = [hf_greedy(folder, p, MAX_TOKENS) for p in PROMPTS]
    with LLM(folder, tensor_parallel_size=2, max_num_batched_tokens=24, max_num_seqs=4) as llm:
        assert llm.engine.runner.config.num_heads * 2 == llm.engine.model_config.num_heads
        outputs = llm.generate(PROMPTS, _greedy())
        assert [o.token_ids for o in outputs] == expected
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_two_ranks_match_under_preemption(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    expected = [hf_greedy(folder, p, MAX_TOKENS) for p in PROMPTS]
    with LLM(folder, tensor_parallel_size=2, kv_cache_memory=8 * RANK_BLOCK_BYTES,
             max_num_batched_tokens=64) as llm:
        assert llm.engine.cache_config.num_blocks == 8
        outputs = llm.generate(PROMPTS, _greedy())
        assert llm.engine.scheduler.num_preemptions > 0
        assert [o.token_ids for o in outputs] == expected
        assert llm.engine.block_manager.num_free_blocks == 8
    assert not multiprocessing.active_children()


def test_a_model_that_does_not_split_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model"):
        LLM(tiny_llama_dir, tensor_parallel_size=3)
    assert not multiprocessing.active_children()


def test_four_ranks_replicate_the_kv_heads(tiny_llama_dir):
    # 4 query heads and 2 KV heads on 4 ranks: each rank one query head, its KV head a copy.
    prompts = PROMPTS[:3]
    expected = [hf_greedy(tiny_llama_dir, p, MAX_TOKENS) for p in prompts]
    with LLM(tiny_llama_dir, tensor_parallel_size=4) as llm:
        assert llm.engine.runner.config.num_kv_heads == 1
        assert [o.token_ids for o in llm.generate(prompts, _greedy())] == expected
    assert not multiprocessing.active_children()


def test_a_dead_worker_stops_the_engine_naming_its_rank(tiny_llama_dir):
    from engine.llm_engine import WorkerDiedError

    llm = LLM(tiny_llama_dir, tensor_parallel_size=2)
    try:
        [worker] = llm.engine.executor.processes
        worker.kill()
        worker.join(30)
        llm.engine.add_request("r", [1, 2, 3], _greedy())
        with pytest.raises(WorkerDiedError, match=r"rank 1 exited with code -9"):
            llm.engine.step()
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_per_rank_artifact_is_read_one_file_per_rank(tiny_llama_dir, tmp_path, where, request):
    from engine.weights.errors import WeightsError
    from engine.weights.tensorize import tensorize

    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        request.getfixturevalue("s3")  # the bucket
        dest = "s3://models/tiny-llama-tp2"
    else:
        endpoint, dest = None, str(tmp_path / "tp2")
    manifest = tensorize(tiny_llama_dir, dest, "float32", endpoint, tensor_parallel_size=2)
    assert manifest["tensor_parallel_size"] == 2 and len(manifest["rank_weights_bytes"]) == 2
    whole = tensorize(tiny_llama_dir, str(tmp_path / "whole"), "float32")["weights_bytes"]
    assert all(size < whole for size in manifest["rank_weights_bytes"])
    expected = [hf_greedy(tiny_llama_dir, p, MAX_TOKENS) for p in PROMPTS[:3]]
    with LLM(dest, tensor_parallel_size=2, s3_endpoint=endpoint) as llm:
        assert llm.engine.progress.total_bytes == manifest["rank_weights_bytes"][0]
        assert [o.token_ids for o in llm.generate(PROMPTS[:3], _greedy())] == expected
    with pytest.raises(WeightsError, match="cut for 2 tensor-parallel ranks, this server runs 1"):
        LLM(dest, s3_endpoint=endpoint)


def test_a_failed_start_stops_the_workers_it_started(tiny_llama_dir):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        LLM(tiny_llama_dir, tensor_parallel_size=2, max_model_len=10**7)
    assert not multiprocessing.active_children()
