"""fp32 weights that are exactly 4-bit values: found bit for bit (and nothing else is), served by
the small-batch kernel against the torch reference at every row count it takes, and the engine's
greedy tokens on such a model equal transformers'."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels import cpu_ops, reference
from engine.layers.linear import PackedLinear
from engine.layers.lossless import LOSSLESS_MAX_ROWS, lossless_int4
from engine.layers.quantization import dequantize_int4, quantize_int4
from tests.tiny_models import hf_greedy, random_prompts


def _int4_exact(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return dequantize_int4(*quantize_int4(weight), torch.float32)


def test_finds_4_bit_values_bit_for_bit():
    weight = _int4_exact(48, 96)
    found = lossless_int4(weight)
    assert found is not None
    packed, step_min = found
    assert packed.shape == (48, 3, 16) and packed.dtype == torch.uint8
    assert step_min.shape == (48, 3, 2) and step_min.dtype == torch.float16
    rebuilt = dequantize_int4(packed.reshape(48, 48), step_min.permute(2, 0, 1), torch.float32)
    assert torch.equal(rebuilt.view(torch.int32), weight.view(torch.int32))


def test_leaves_other_weights_alone():
    assert lossless_int4(torch.randn(48, 96)) is None  # fp32 values: fails at the probe
    weight = _int4_exact(48, 96)
    weight[40, 7] = torch.nextafter(weight[40, 7], torch.tensor(1.0))  # one bit, past the probe
    assert lossless_int4(weight) is None
    assert lossless_int4(_int4_exact(48, 96).bfloat16()) is None
    assert lossless_int4(torch.zeros(48, 80)) is None  # not in whole groups of 32


@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 96), (37, 64), (16, 1536)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_int4_fp32_linear_matches_reference(num_rows, out_features, in_features, has_bias):
    if not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    g = torch.Generator().manual_seed(num_rows)
    weight = _int4_exact(out_features, in_features, seed=num_rows)
    packed, step_min = lossless_int4(weight)
    x = torch.randn(num_rows, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if has_bias else None
    actual = torch.ops.llm_cpu.int4_fp32_linear(x, packed, step_min, bias)
    expected = reference.int4_fp32_linear_reference(x, packed, step_min, bias)
    exact = reference.int4_fp32_linear_reference(
        x.double(), packed, step_min, None if bias is None else bias.double())
    # fp32 sums in another order than the reference's: each within fp32 summation's bound of the
    # exact sums, K * 2^-24 * sum |x_k w_k| (plus the bias's rounding)
    magnitudes = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitudes += bias.double().abs()
    bound = (in_features + 1) * 2.0**-24 * magnitudes
    for y in (actual, expected):
        assert ((y.double() - exact).abs() <= bound).all()


def test_int4_fp32_linear_checks_its_inputs():
    if not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    packed, step_min = lossless_int4(_int4_exact(16, 64))
    with pytest.raises(RuntimeError, match="fp32 input"):
        torch.ops.llm_cpu.int4_fp32_linear(torch.randn(1, 64).bfloat16(), packed, step_min, None)
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.llm_cpu.int4_fp32_linear(torch.randn(1, 64), packed.reshape(16, 32), step_min,
                                           None)
    with pytest.raises(RuntimeError, match="step_min"):
        torch.ops.llm_cpu.int4_fp32_linear(torch.randn(1, 64), packed,
                                           step_min.permute(2, 0, 1).contiguous(), None)


@pytest.mark.parametrize("num_rows", [1, LOSSLESS_MAX_ROWS, LOSSLESS_MAX_ROWS + 1])
def test_packed_linear_serves_from_its_4_bit_copy(num_rows, monkeypatch):
    if not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    weight, bias = _int4_exact(40, 64), torch.randn(40)
    layer = PackedLinear(weight, bias)
    layer.max_small_batch_rows = 32
    layer.find_lossless()
    assert layer.lossless is not None
    calls = []
    kernel = torch.ops.llm_cpu.int4_fp32_linear
    monkeypatch.setattr(torch.ops.llm_cpu, "int4_fp32_linear",
                        lambda *args: calls.append(args) or kernel(*args), raising=False)
    x = torch.randn(num_rows, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == (num_rows <= LOSSLESS_MAX_ROWS)


def test_no_4_bit_copy_of_quantized_or_other_weights():
    layer = PackedLinear(_int4_exact(32, 64), None, "int8")
    layer.find_lossless()
    assert layer.lossless is None
    layer = PackedLinear(torch.randn(32, 64), None)
    layer.find_lossless()
    assert layer.lossless is None


def test_engine_greedy_matches_transformers(tiny_int4_exact_dir):
    llm = LLM(tiny_int4_exact_dir, dtype="float32", max_num_seqs=4)
    runner = llm.engine.runner
    runner.wait_for_weight_mover()
    linears = [m for m in runner.model.layers.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.lossless is not None for m in linears)
    prompts = random_prompts(6, 3, 40, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert runner.lossless_stack is not None  # it served the steps of up to 4 sequences
    assert [o.token_ids for o in outputs] == [hf_greedy(tiny_int4_exact_dir, p, 12)
                                              for p in prompts]
