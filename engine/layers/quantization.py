"""int8 weight-only quantization for the CPU (`--quantization int8`).

Each group of 32 consecutive weights of a row gets one fp32 scale, its largest magnitude over
127, and is rounded to int8 (symmetric, as llama.cpp's Q8_0; no zero points, no calibration
data). At a few rows a decode step streams every weight once, so the small-batch kernel
`llm_cpu::int8_small_batch_linear` reads ~56% of bf16's bytes and ~28% of fp32's. Larger batches
are compute-bound and stay on oneDNN, which is given the dequantized weights: every path computes
with the same rounded weights, so a sequence's tokens do not depend on the batch it shares.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32


def group_size(in_features: int) -> int:
    """32, or the whole row where it does not divide into groups of 32."""
    return GROUP_SIZE if in_features % GROUP_SIZE == 0 else in_features


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in], fp32 scale [out, in / group]): each group of the row is
    its int8 values times its scale."""
    num_rows, in_features = weight.shape
    groups = weight.float().reshape(num_rows, -1, group_size(in_features))  # [out, groups, g]
    scale = groups.abs().amax(dim=2).clamp_min(torch.finfo(torch.float32).tiny) / 127
    qweight = torch.round(groups / scale[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return qweight.reshape(num_rows, in_features), scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    num_rows, in_features = qweight.shape
    groups = qweight.float().reshape(num_rows, scale.shape[1], -1) * scale[:, :, None]
    return groups.reshape(num_rows, in_features).to(dtype)
