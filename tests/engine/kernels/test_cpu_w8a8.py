"""`llm_cpu::w8a8_linear` (engine/kernels/cpu/gemm_w8a8.cpp) against its torch reference: int8
weights and activations rounded per group of 32, on each path this machine has (VNNI, AVX2,
scalar), and the paths against each other."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops, reference
from engine.layers.quantization import (
    pack_w8a8,
    quantize_int8,
    quantize_rows_int8,
    unpack_w8a8,
)
from tests.engine.kernels.conftest import on_each_int8_path
from tests.engine.kernels.test_kernels import DTYPES, TOLERANCE, _rel_error


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    assert cpu_ops.load(), "the C++ CPU kernels did not build (see the log)"


def _layer(out_features: int, in_features: int, seed: int):
    torch.manual_seed(seed)
    qweight, scale = quantize_int8(torch.randn(out_features, in_features) / in_features**0.5)
    return qweight, scale, *pack_w8a8(qweight, scale)


@pytest.mark.parametrize("dtype", DTYPES)
# 1-4: one register tile of rows, 5 and 9: whole tiles and a tail, 33: many
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 9, 33])
# 16: one tile; 48: three (one task); 112: three tasks, the last of one tile
@pytest.mark.parametrize("out_features", [16, 48, 112])
@pytest.mark.parametrize("in_features", [32, 64, 576])
def test_w8a8_linear_matches_reference(int8_path, dtype, rows, out_features, in_features):
    qweight, scale, packed, packed_scale = _layer(out_features, in_features, rows + in_features)
    bias = torch.randn(out_features).to(dtype) if rows % 2 else None
    x = torch.randn(rows, in_features).to(dtype)
    if rows:
        x[0, 3] = 40.0  # an outlier: its group's other values get fewer int8 steps
        x[-1, :32] = 0.0  # an all-zero group: scale 0, no division by it
    actual = torch.ops.llm_cpu.w8a8_linear(x, packed, packed_scale, bias)
    assert actual.dtype == dtype and actual.shape == (rows, out_features)
    if rows:
        expected = reference.w8a8_linear_reference(x, qweight, scale, bias)
        assert _rel_error(actual, expected) < TOLERANCE[dtype]



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_paths_agree(dtype):
    """VNNI's and AVX2's fp32 sums are the same operations in the same order: the same bits. The
    scalar loop sums the same integers (its fp32 sums may round an ulp apart)."""
    _, _, packed, packed_scale = _layer(112, 576, 4)
    x, bias = torch.randn(9, 576).to(dtype), torch.randn(112).to(dtype)
    w8a8 = torch.ops.llm_cpu.w8a8_linear
    results = on_each_int8_path(lambda: w8a8(x, packed, packed_scale, bias))
    if "vnni" in results:
        assert torch.equal(results["vnni"], results["avx2"])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(results["scalar"], results[list(results)[-1]], rtol=tolerance,
                               atol=tolerance)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(int8_path):
    """Bit for bit: a sequence's tokens must not depend on the batch it shares."""
    _, _, packed, packed_scale = _layer(112, 576, 0)
    x = torch.randn(11, 576)
    together = torch.ops.llm_cpu.w8a8_linear(x, packed, packed_scale, None)
    for m in range(11):
        alone = torch.ops.llm_cpu.w8a8_linear(x[m:m + 1], packed, packed_scale, None)
        assert torch.equal(alone[0], together[m])


def test_w8a8_error_is_int8_sized():
    """Against the exact product of the int8 weights: rounding x to int8 costs about what the
    weights' own rounding does (a relative error near 1e-2), not more."""
    qweight, scale, packed, packed_scale = _layer(64, 576, 1)
    x = torch.randn(8, 576)
    actual = torch.ops.llm_cpu.w8a8_linear(x, packed, packed_scale, None)
    exact_x = reference.int8_linear_reference(x, qweight, scale, None)
    assert 1e-4 < _rel_error(actual, exact_x) < 2e-2


def test_activation_rounding_is_what_the_reference_says():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2] = 2.0, -1.0, 2.0 / 127 * 0.5  # a tie: rounds to even (0)
    q, scale = quantize_rows_int8(x)
    assert q[0, :3].tolist() == [127, -64, 0] and scale[0, 1] == 0  # an all-zero group
    torch.testing.assert_close(scale[0, 0], torch.tensor(2.0 / 127))


def test_packing_keeps_every_weight_and_scale():
    qweight, scale, packed, packed_scale = _layer(32, 64, 2)
    assert packed.shape == (2, 16, 16, 4) and packed_scale.shape == (2, 2, 16)
    assert packed.dtype == torch.uint8 and int(packed.min()) >= 1  # q + 128, q in -127..127
    unpacked, unpacked_scale = unpack_w8a8(packed, packed_scale)
    assert torch.equal(unpacked, qweight) and torch.equal(unpacked_scale, scale)
    for shape in [(16, 40), (20, 64)]:
        with pytest.raises(ValueError, match="whole tiles of 16 rows in whole groups of 32"):
            pack_w8a8(*quantize_int8(torch.randn(*shape)))


def test_w8a8_linear_refuses_bad_arguments():
    _, _, packed, packed_scale = _layer(32, 64, 3)
    w8a8 = torch.ops.llm_cpu.w8a8_linear
    with pytest.raises(RuntimeError, match="input's width"):
        w8a8(torch.randn(1, 32), packed, packed_scale, None)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        w8a8(torch.randn(1, 64), packed.to(torch.int8), packed_scale, None)
    with pytest.raises(RuntimeError, match="packed_scale"):
        w8a8(torch.randn(1, 64), packed, packed_scale[:, :1], None)
    with pytest.raises(RuntimeError, match="bias"):
        w8a8(torch.randn(1, 64), packed, packed_scale, torch.ones(3))
