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
