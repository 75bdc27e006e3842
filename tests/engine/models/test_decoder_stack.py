"""The C++ decoder stack gives what the Python layers give, bit for bit: the same greedy tokens and
the same log-probabilities, plain and int8 (and fp32 weights kept as 4-bit values), with and
without biases, at 1-4 decoding sequences (the stack) and beside steps of more (the Python
layers)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.linear import can_pack

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18], [19, 20, 21], [22, 23]]


def _generate(llm: LLM, use_stack: bool, num_prompts: int) -> list[tuple]:
    runner = llm.engine.runner
    runner.decoder_stack, runner.lossless_stack, runner.may_build_stack = None, None, use_stack
    runner.max_stack_rows = 4  # whatever this CPU's kernels take: steps of more go to Python
    # Lengths differ, so six sequences become four, then fewer: both paths in one run.
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True, logprobs=3)
              for i in range(num_prompts)]
    outputs = llm.generate(PROMPTS[:num_prompts], params)
    if use_stack:
        assert runner.decoder_stack is not None  # it served
    return [(o.token_ids, o.outputs[0].logprobs) for o in outputs]


# bf16 is packed (and so stacked) only where the CPU has native bf16.
NATIVE_BF16 = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                                 reason="no native bf16 on this CPU")


@pytest.mark.parametrize(("kind", "dtype", "quantization"), [
    ("llama", "float32", None), ("qwen2", "float32", None),
    pytest.param("llama", "bfloat16", None, marks=NATIVE_BF16),
    ("qwen2", "float32", "int8"), pytest.param("llama", "bfloat16", "int8", marks=NATIVE_BF16),
    ("qwen2", "float32", "int4"),  # int4 layers, an int8 head
    ("qwen2", "float32", "w8a8"), pytest.param("llama", "bfloat16", "w8a8", marks=NATIVE_BF16),
    ("qwen2", "float32", "w4a8"), pytest.param("llama", "bfloat16", "w4a8", marks=NATIVE_BF16),
])
@pytest.mark.parametrize("num_prompts", [1, 3, 6])
def test_stack_equals_the_python_layers(tiny_model_dirs, kind, dtype, quantization,
                                        num_prompts):
    llm = LLM(tiny_model_dirs[kind], dtype=dtype, quantization=quantization)
    llm.engine.runner.wait_for_weight_mover()
    expected = _generate(llm, use_stack=False, num_prompts=num_prompts)
    assert _generate(llm, use_stack=True, num_prompts=num_prompts) == expected


@pytest.mark.parametrize("num_prompts", [1, 3, 6])
def test_lossless_stack_equals_the_python_layers(tiny_int4_exact_dir, num_prompts):
    # fp32 weights that are exactly 4-bit values: both read the 4-bit copies at these rows.
    llm = LLM(tiny_int4_exact_dir, dtype="float32")
    llm.engine.runner.wait_for_weight_mover()
    expected = _generate(llm, use_stack=False, num_prompts=num_prompts)
    assert _generate(llm, use_stack=True, num_prompts=num_prompts) == expected
    assert llm.engine.runner.lossless_stack is not None


def test_no_stack_without_the_cpu_kernels(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], attention_backend="torch")
    llm.engine.runner.wait_for_weight_mover()
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3))
    assert llm.engine.runner.decoder_stack is None
