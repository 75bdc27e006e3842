"""fp32 weights that are exactly 4-bit values, stored as such: the same weights in a sixth of the
bytes, for the decode step's small-batch linears.

A model dequantized from a 4-bit GGUF (the embedded SmolLM2 is Q4_1) holds fp32 weights that are,
per group of 32 of a row, w = m + d q for fp16 d and m and q in 0..15. Serving it in fp32 then
streams 4 bytes a weight where 0.625 hold the same information. Where `quantize_int4` of a weight
gives it back bit for bit, `lossless_int4` keeps those nibbles and scales, and the small-batch
kernel (`llm_cpu::int4_fp32_linear`) rebuilds each fp32 weight in a register as fma(q, d, m):
d q is exact in fp32 (11 by 4 significant bits), so that is the weight itself, and x stays fp32.
Nothing is approximated: the products and the fp32 sums are those of any fp32 GEMV, in another
order. Weights that are not exactly so (any model trained and saved in fp32 or bf16) are left
as they were: the check stops at the first 16 rows that differ.

SmolLM2's 120 linears, one row of x, Zen 4, 2 threads, ms, the fp32 GEMV / this: 1 row 13.6 /
5.9, 4 rows 15.9 / 8.3, 8 rows 17.4 / 14.4 (the fp32 register tiles), 16 rows 21.3 / 26.8, hence
`LOSSLESS_MAX_ROWS`; past it the fp32 weights serve, and oneDNN past them.
"""

from __future__ import annotations

import torch

from engine.layers.quantization import GROUP_SIZE, dequantize_int4, quantize_int4

LOSSLESS_MAX_ROWS = 8
_PROBE_ROWS = 16  # checked first: most weights that are not 4-bit values fail here, cheaply


def lossless_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(uint8 [out, in / 32, 16] nibbles, fp16 [out, in / 32, 2] each group's d then m) holding
    `weight` (fp32 [out, in]) exactly, or None where it is not 4-bit values."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % GROUP_SIZE:
        return None
    probe = weight[:_PROBE_ROWS]
    if not _is_exact(probe, *quantize_int4(probe)):
        return None
    packed, step_min = quantize_int4(weight)
    if not _is_exact(weight, packed, step_min):
        return None
    num_rows, num_groups = weight.shape[0], weight.shape[1] // GROUP_SIZE
    return (packed.view(num_rows, num_groups, GROUP_SIZE // 2),
            step_min.permute(1, 2, 0).contiguous())  # [out, groups, 2]: d and m side by side


def _is_exact(weight: torch.Tensor, packed: torch.Tensor, step_min: torch.Tensor) -> bool:
    rebuilt = dequantize_int4(packed, step_min, torch.float32)
    return torch.equal(rebuilt.view(torch.int32), weight.contiguous().view(torch.int32))
