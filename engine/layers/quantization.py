"""Weight-only quantization for the CPU (`--quantization int8` or `int4`).

int8: each group of 32 consecutive weights of a row gets one fp32 scale, its largest magnitude
over 127, and is rounded to int8 (symmetric, as llama.cpp's Q8_0; no zero points, no calibration
data). int4: llama.cpp's Q4_1 (below). At a few rows a decode step streams every weight once, so
the small-batch kernels (`llm_cpu::int8_small_batch_linear`, `int4_small_batch_linear`) read
~28% and ~16% of fp32's bytes. Larger batches are compute-bound and stay on oneDNN, which is
given the dequantized weights: every path computes with the same rounded weights, so a
sequence's tokens do not depend on the batch it shares."""

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


# ---- int4 (`--quantization int4`): llama.cpp's Q4_1 layout. Each group of 32 weights of a row
# gets a step d and a minimum m (fp16, as Q4_1 stores them) and each weight a 4-bit q in 0..15,
# weight = m + d q. A group's 32 values sit in 16 bytes, the j-th holding weight j in its low
# nibble and weight j + 16 in its high one, as in a Q4_1 block. The embedded SmolLM2 is Q4_1:
# quantizing its dequantized layers again gives back the same q, d and m (every group holds its
# minimum at q = 0 and its maximum at q = 15), so int4 reads exactly the file's weights.


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (uint8 [out, in / 2], fp16 [2, out, in / 32]: each group's d, then its m).
    `in` must be a multiple of 32."""
    num_rows, in_features = weight.shape
    if in_features % GROUP_SIZE:
        raise ValueError(f"int4 needs rows of whole groups of {GROUP_SIZE}, got {in_features}")
    groups = weight.float().reshape(num_rows, -1, GROUP_SIZE)  # [out, groups, 32]
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    step = ((high - low) / 15).half()
    minimum = low.half()
    inverse = torch.where(step > 0, 1 / step.float(), torch.zeros_like(low))
    q = torch.round((groups - minimum.float()[:, :, None]) * inverse[:, :, None]).clamp_(0, 15)
    q = q.to(torch.uint8)
    packed = q[:, :, :16] | (q[:, :, 16:] << 4)  # [out, groups, 16]
    return packed.reshape(num_rows, in_features // 2), torch.stack([step, minimum])


def dequantize_int4(
    packed: torch.Tensor, step_min: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    num_rows, half_in = packed.shape
    nibbles = packed.reshape(num_rows, -1, 16)  # [out, groups, 16]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=2).float()  # [out, groups, 32]
    step, minimum = step_min.float()
    values = minimum[:, :, None] + step[:, :, None] * q
    return values.reshape(num_rows, half_in * 2).to(dtype)
