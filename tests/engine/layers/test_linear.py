"""`PackedLinear` before its packing (plain `F.linear`, what serves while the background thread
packs) and after it (oneDNN's packed weight) against `F.linear`, at the row counts of decoding
and prefill, with and without int8 or int4 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops, reference
from engine.layers.linear import PackedLinear, can_pack
from engine.layers.quantization import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

DTYPES = [torch.float32] + ([torch.bfloat16] if can_pack(torch.device("cpu"), torch.bfloat16)
                            else [])


QUANTIZE = {"int8": quantize_int8, "int4": quantize_int4}
DEQUANTIZE = {"int8": dequantize_int8, "int4": dequantize_int4}
INT16_REFERENCE = {"int8": reference.int8_int16_linear_reference,
                   "int4": reference.int4_linear_reference}


def _rounds_activations_to_int16(layer: PackedLinear, quantization: str, num_rows: int) -> bool:
    """A kernel that rounds x to int16 serves these rows: int4's, and int8's AVX2 one."""
    return (cpu_ops.is_loaded() and num_rows <= layer.max_small_batch_rows
            and (quantization == "int4" or cpu_ops.capability() == "AVX2"))


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("num_rows", [5, 33, 130])
def test_before_and_after_packing_equal_f_linear(dtype, quantization, num_rows):
    torch.manual_seed(num_rows)
    weight, bias = torch.randn(96, 128, dtype=dtype), torch.randn(96, dtype=dtype)
    x = torch.randn(num_rows, 128, dtype=dtype)
    reference_weight = weight
    if quantization:
        reference_weight = DEQUANTIZE[quantization](*QUANTIZE[quantization](weight), dtype)
    expected = F.linear(x.float(), reference_weight.float(), bias.float())
    layer = PackedLinear(weight, bias, quantization)
    if quantization and _rounds_activations_to_int16(layer, quantization, num_rows):
        expected = INT16_REFERENCE[quantization](
            x, *QUANTIZE[quantization](weight), bias).float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    before = layer(x)
    assert layer.packed_weight is None
    torch.testing.assert_close(before.float(), expected, rtol=tolerance, atol=tolerance)
    layer.pack()
    assert layer.unpacked_weight is None and layer.packed_weight is not None
    after = layer(x)
    torch.testing.assert_close(after.float(), expected, rtol=tolerance, atol=tolerance)
    layer.pack()  # a second call changes nothing
    torch.testing.assert_close(layer(x), after, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 5, 130])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_w8a8_layer_equals_its_reference_at_every_row_count(dtype, num_rows, with_kernels,
                                                          monkeypatch):
    """With the kernels (any rows, no oneDNN) and before they are built (fp32 matmuls)."""
    torch.manual_seed(num_rows)
    weight, bias = torch.randn(96, 128, dtype=dtype), torch.randn(96, dtype=dtype)
    x = torch.randn(num_rows, 128, dtype=dtype)
    layer = PackedLinear(weight, bias, "w8a8")
    assert layer.weight.shape == (6, 32, 16, 4) and layer.unpacked_weight is None
    if not with_kernels:
        monkeypatch.setattr(cpu_ops, "is_loaded", lambda: False)
    expected = reference.w8a8_linear_reference(x, *quantize_int8(weight), bias).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x).float(), expected, rtol=tolerance, atol=tolerance)
    layer.pack()  # nothing for oneDNN
    assert layer.packed_weight is None
    torch.testing.assert_close(layer(x).float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 5, 130])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_w4a8_layer_equals_its_reference_at_every_row_count(dtype, num_rows, with_kernels,
                                                          monkeypatch):
    torch.manual_seed(num_rows)
    weight, bias = torch.randn(96, 128, dtype=dtype), torch.randn(96, dtype=dtype)
    x = torch.randn(num_rows, 128, dtype=dtype)
    layer = PackedLinear(weight, bias, "w4a8")
    assert layer.weight.shape == (6, 4, 4, 16, 4) and layer.unpacked_weight is None
    if not with_kernels:
        monkeypatch.setattr(cpu_ops, "is_loaded", lambda: False)
    expected = reference.w4a8_linear_reference(x, *quantize_int4(weight), bias).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x).float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("quantization", ["w8a8", "w4a8"])
def test_int8_activations_fall_back_to_int8_where_their_tiles_do_not_fit(quantization):
    assert PackedLinear(torch.randn(20, 64), None, quantization).quantization == "int8"
    assert PackedLinear(torch.randn(32, 40), None, quantization).quantization == "int8"
