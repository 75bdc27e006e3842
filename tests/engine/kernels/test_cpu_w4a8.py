"""`llm_cpu::w4a8_linear` (engine/kernels/cpu/gemm_w4a8.cpp) against its torch reference: int4
weights (Q4_1's steps and minimums) times activations rounded to int8 per group of 32, on each
path this machine has (VNNI, AVX2, scalar), and the paths against each other."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops, reference
from engine.layers.quantization import dequantize_int4, pack_w4a8, quantize_int4, unpack_w4a8
from tests.engine.kernels.conftest import on_each_int8_path
from tests.engine.kernels.test_kernels import DTYPES, TOLERANCE, _rel_error


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    assert cpu_ops.load(), "the C++ CPU kernels did not build (see the log)"


def _layer(out_features: int, in_features: int, seed: int):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    weight[0, :32] += 0.5  # a group whose minimum is far from zero: the minimum's term counts
    packed, step_min = quantize_int4(weight)
    return packed, step_min, *pack_w4a8(packed, step_min)


@pytest.mark.parametrize("dtype", DTYPES)
# 1-4: one register tile of rows, 5 and 9: whole tiles and a tail, 33: many
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 9, 33])
# 16: one tile; 32: two (one task); 112: seven, the last task of one tile
@pytest.mark.parametrize("out_features", [16, 32, 112])
@pytest.mark.parametrize("in_features", [32, 64, 576])
def test_w4a8_linear_matches_reference(int8_path, dtype, rows, out_features, in_features):
    packed, step_min, tiles, tile_scales = _layer(out_features, in_features, rows + in_features)
    bias = torch.randn(out_features).to(dtype) if rows % 2 else None
    x = torch.randn(rows, in_features).to(dtype)
    if rows:
        x[0, 3] = 40.0  # an outlier: its group's other values get fewer int8 steps
        x[-1, :32] = 0.0  # an all-zero group: scale 0, no division by it
    actual = torch.ops.llm_cpu.w4a8_linear(x, tiles, tile_scales, bias)
    assert actual.dtype == dtype and actual.shape == (rows, out_features)
    if rows:
        expected = reference.w4a8_linear_reference(x, packed, step_min, bias)
        assert _rel_error(actual, expected) < TOLERANCE[dtype]



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_paths_agree(dtype):
    """VNNI's and AVX2's fp32 sums are the same operations in the same order: the same bits. The
    scalar loop sums the same integers (its fp32 sums may round an ulp apart)."""
    _, _, tiles, tile_scales = _layer(112, 576, 4)
    x, bias = torch.randn(9, 576).to(dtype), torch.randn(112).to(dtype)
    results = on_each_int8_path(lambda: torch.ops.llm_cpu.w4a8_linear(x, tiles, tile_scales, bias))
    if "vnni" in results:
        assert torch.equal(results["vnni"], results["avx2"])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(results["scalar"], results[list(results)[-1]], rtol=tolerance,
                               atol=tolerance)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(int8_path):
    """Bit for bit: a sequence's tokens must not depend on the batch it shares."""
    _, _, tiles, tile_scales = _layer(112, 576, 0)
    x = torch.randn(11, 576)
    together = torch.ops.llm_cpu.w4a8_linear(x, tiles, tile_scales, None)
    for m in range(11):
        alone = torch.ops.llm_cpu.w4a8_linear(x[m:m + 1], tiles, tile_scales, None)
        assert torch.equal(alone[0], together[m])


def test_w4a8_error_is_int8_sized():
    """Against the exact product of the int4 weights: rounding x to int8 costs about a 1e-2
    relative error, as in w8a8, on top of the weights' own rounding (which both share)."""
    packed, step_min, tiles, tile_scales = _layer(64, 576, 1)
    x = torch.randn(8, 576)
    actual = torch.ops.llm_cpu.w4a8_linear(x, tiles, tile_scales, None)
    exact_x = torch.nn.functional.linear(x.double(), dequantize_int4(packed, step_min,
                                                                     torch.float64))
    assert 1e-4 < _rel_error(actual, exact_x.float()) < 2e-2


def test_packing_keeps_every_weight_step_and_minimum():
    packed, step_min, tiles, tile_scales = _layer(32, 64, 2)
    assert tiles.shape == (2, 2, 4, 16, 4) and tiles.dtype == torch.uint8
    assert tile_scales.shape == (2, 2, 2, 16) and tile_scales.dtype == torch.float16
    # row 17's weight 21 (group 0, high nibble of step i = 1, j = 1) sits where the kernel reads it
    q = torch.cat([packed.reshape(32, 2, 16) & 15, packed.reshape(32, 2, 16) >> 4], dim=2)
    assert int(tiles[1, 0, 1, 1, 1]) >> 4 == int(q[17, 0, 21])
    assert torch.equal(tile_scales[1, 1, 1], step_min[1, 16:, 1])  # minimums of group 1
    unpacked, unpacked_step_min = unpack_w4a8(tiles, tile_scales)
    assert torch.equal(unpacked, packed) and torch.equal(unpacked_step_min, step_min)
    for shape in [(16, 48), (20, 64)]:
        with pytest.raises(ValueError, match="whole tiles of 16 rows in whole groups of 32"):
            pack_w4a8(torch.zeros(shape[0], shape[1] // 2, dtype=torch.uint8),
                      torch.zeros(2, shape[0], 1, dtype=torch.float16))


def test_w4a8_linear_refuses_bad_arguments():
    _, _, tiles, tile_scales = _layer(32, 64, 3)
    w4a8 = torch.ops.llm_cpu.w4a8_linear
    with pytest.raises(RuntimeError, match="input's width"):
        w4a8(torch.randn(1, 32), tiles, tile_scales, None)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        w4a8(torch.randn(1, 64), tiles.to(torch.int8), tile_scales, None)
    with pytest.raises(RuntimeError, match="packed_scale"):
        w4a8(torch.randn(1, 64), tiles, tile_scales.float(), None)
    with pytest.raises(RuntimeError, match="bias"):
        w4a8(torch.randn(1, 64), tiles, tile_scales, torch.ones(3))
