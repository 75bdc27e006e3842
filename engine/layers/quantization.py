"""Quantization for the CPU (`--quantization int8`, `int4`, `w8a8` or `w4a8`).

int8: each group of 32 consecutive weights of a row gets one fp32 scale, its largest magnitude
over 127, and is rounded to int8 (symmetric, as llama.cpp's Q8_0; no zero points, no calibration
data). int4: llama.cpp's Q4_1 (below). At a few rows a decode step streams every weight once, so
the small-batch kernels (`llm_cpu::int8_small_batch_linear`, `int4_small_batch_linear`) read
~28% and ~16% of fp32's bytes. Larger batches are compute-bound and stay on oneDNN, which is
given the dequantized weights: every path computes with the same rounded weights, so a
sequence's tokens do not depend on the batch it shares.

w8a8: int8's weights, laid out for VNNI (`pack_w8a8`), and each linear's input rounded to int8
per group of 32 as well (`quantize_rows_int8`): llama.cpp's Q8_0 x Q8_0 arithmetic, by
`llm_cpu::w8a8_linear` at every row count, so here too a sequence's tokens do not depend on its
batch. Rounding x per token instead of per group was measured unusable on SmolLM2 (no greedy
completion of 16 identical to fp32's): its activations have outliers. w4a8: int4's weights (the
embedded Q4_1 file's own), laid out for VNNI (`pack_w4a8`), times x rounded as w8a8 rounds it:
llama.cpp's Q4_1 x Q8_1, by `llm_cpu::w4a8_linear`; half w8a8's bytes a step."""

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


def pack_w8a8(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8`'s output laid out for `llm_cpu::w8a8_linear` (gemm_w8a8.cpp): tiles of 16
    output rows, uint8 [tiles, in / 4, 16, 4] holding q + 128 (VNNI multiplies unsigned by signed
    bytes), and the fp32 scales as [tiles, in / 32, 16]."""
    num_rows, in_features = qweight.shape
    if not can_pack_w8a8(num_rows, in_features):
        raise ValueError(f"w8a8 needs whole tiles of 16 rows in whole groups of {GROUP_SIZE}, "
                         f"got [{num_rows}, {in_features}]")
    unsigned = (qweight.to(torch.int16) + 128).to(torch.uint8)
    packed = unsigned.reshape(-1, 16, in_features // 4, 4).transpose(1, 2)  # [tiles, in/4, 16, 4]
    packed_scale = scale.reshape(-1, 16, scale.shape[1]).transpose(1, 2)  # [tiles, groups, 16]
    return packed.contiguous(), packed_scale.contiguous()


def unpack_w8a8(packed: torch.Tensor, packed_scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_w8a8`'s inverse: (int8 [out, in], fp32 scale [out, in / 32])."""
    num_tiles, num_quads = packed.shape[:2]
    unsigned = packed.transpose(1, 2).reshape(num_tiles * 16, num_quads * 4)
    qweight = (unsigned.to(torch.int16) - 128).to(torch.int8)
    return qweight, packed_scale.transpose(1, 2).reshape(num_tiles * 16, -1)


def can_pack_w8a8(out_features: int, in_features: int) -> bool:
    return out_features % 16 == 0 and in_features % GROUP_SIZE == 0


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, in] -> (int8 [rows, in], fp32 scale [rows, in / 32]): each group of 32 of a row
    rounded to int8 against its largest magnitude (x ~ q * scale), as w8a8 rounds activations."""
    num_rows, in_features = x.shape
    groups = x.float().reshape(num_rows, -1, GROUP_SIZE)  # [rows, groups, 32]
    amax = groups.abs().amax(dim=2)
    # 127 / amax as one division (a Python number over a tensor is 127 times its reciprocal in
    # torch, a rounding apart): the kernel's own, so values at a tie round alike
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q = torch.round(groups * inverse[:, :, None]).to(torch.int8)
    return q.reshape(num_rows, in_features), amax / 127


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


def pack_w4a8(packed: torch.Tensor, step_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int4`'s output laid out for `llm_cpu::w4a8_linear` (gemm_w4a8.cpp): tiles of 16
    output rows, uint8 [tiles, in / 32, 4, 16, 4] where the i-th 64 bytes of a group hold each
    row's weights 4i..4i+3 in their low nibbles and 16+4i.. in their high ones, and the steps and
    minimums as fp16 [tiles, in / 32, 2, 16]."""
    num_rows, half_in = packed.shape
    if not can_pack_w8a8(num_rows, half_in * 2):
        raise ValueError(f"w4a8 needs whole tiles of 16 rows in whole groups of {GROUP_SIZE}, "
                         f"got [{num_rows}, {half_in * 2}]")
    q = _int4_values(packed)  # [out, in], 0..15
    q = q.reshape(-1, 16, half_in // 16, 2, 4, 4)  # [tiles, 16, groups, nibble, i, j]
    paired = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [tiles, 16, groups, i, j]
    tiles = paired.permute(0, 2, 3, 1, 4)  # [tiles, groups, i, 16, j]
    scales = step_min.reshape(2, -1, 16, step_min.shape[2]).permute(1, 3, 0, 2)
    return tiles.contiguous(), scales.contiguous()  # scales: [tiles, groups, 2, 16]


def unpack_w4a8(packed: torch.Tensor, packed_scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_w4a8`'s inverse: `quantize_int4`'s (uint8 [out, in / 2], fp16 [2, out, in / 32])."""
    num_tiles, num_groups = packed.shape[:2]
    paired = packed.permute(0, 3, 1, 2, 4)  # [tiles, 16, groups, i, j]
    q = torch.stack([paired & 15, paired >> 4], dim=3)  # [tiles, 16, groups, nibble, i, j]
    q = q.reshape(num_tiles * 16, num_groups, 2, 16)  # [out, groups, nibble, 16]
    int4 = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(num_tiles * 16, num_groups * 16)
    step_min = packed_scale.permute(2, 0, 3, 1).reshape(2, num_tiles * 16, num_groups)
    return int4, step_min


def _int4_values(packed: torch.Tensor) -> torch.Tensor:
    """`quantize_int4`'s bytes -> each weight's q, uint8 [out, in] in 0..15."""
    num_rows, half_in = packed.shape
    nibbles = packed.reshape(num_rows, -1, 16)  # [out, groups, 16]
    return torch.cat([nibbles & 15, nibbles >> 4], dim=2).reshape(num_rows, half_in * 2)
