"""int8 weights: the rounding is as small as one scale allows, and the engine with int8 weights
gives transformers' greedy tokens for the same model with those weights dequantized, through
the int8 kernel (one to four sequences) and oneDNN (prefill, larger batches) alike."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.linear import PackedLinear
from engine.layers.quantization import dequantize_int8, quantize_int8
from tests.tiny_models import hf_model_greedy, random_prompts


@pytest.mark.parametrize(("in_features", "num_groups"), [(128, 4), (100, 1)])  # 100: one group
def test_quantize_int8_rounds_each_group_to_its_own_scale(in_features, num_groups):
    # magnitudes from 1e-3 to 10 along the row: groups of every size
    torch.manual_seed(in_features)
    weight = torch.randn(64, in_features) * torch.logspace(-3, 1, in_features)
    weight[5] = 0.0  # an all-zero group must not divide by zero
    qweight, scale = quantize_int8(weight)
    assert qweight.dtype == torch.int8 and scale.shape == (64, num_groups)
    assert (qweight.reshape(64, num_groups, -1)[torch.arange(64) != 5].abs().amax(2) == 127).all()
    error = (dequantize_int8(qweight, scale, torch.float32) - weight).abs()
    # half a scale, plus fp32's rounding of `q * scale` near the weight's own magnitude
    bound = (scale.repeat_interleave(in_features // num_groups, dim=1) / 2 * (1 + 1e-6)
             + weight.abs() * torch.finfo(torch.float32).eps)
    assert (error <= bound).all()
    assert (dequantize_int8(qweight, scale, torch.float32)[5] == 0).all()


def _hf_with_int8_weights(folder: str):
    """transformers' model with every linear (the head untied from the embedding, as the engine
    keeps the embedding exact) replaced by its int8 rounding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight = torch.nn.Parameter(model.get_output_embeddings().weight.detach().clone())
    model.lm_head = head
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize_int8(*quantize_int8(module.weight), torch.float32))
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: a tied head and q/k/v biases
def test_int8_engine_matches_transformers_with_the_same_weights(tiny_model_dirs, kind):
    folder = tiny_model_dirs[kind]
    prompts = random_prompts(6, 1, 60, seed=3)
    # 3 sequences at a time: the int8 kernel decodes; prefill chunks of 24 go through oneDNN
    llm = LLM(folder, quantization="int8", max_num_seqs=3, max_num_batched_tokens=24,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    actual = [o.token_ids for o in llm.generate(prompts, params)]
    reference = _hf_with_int8_weights(folder)
    assert actual == [hf_model_greedy(reference, p, 10) for p in prompts]
    # every linear, the head included, holds int8 weights for the kernel
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 2 * 4 + 1  # 2 layers of qkv, o, gate_up and down; the head
    assert all(m.weight.dtype == torch.int8 and m.weight_scale is not None for m in linears)


def test_quantization_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM("", quantization="int4")
    with pytest.raises(ValueError, match="not with quantization"):
        LLM("", quantization="int8", compile_decode=True)
