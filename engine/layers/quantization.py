"""int8 weight-only quantization for the CPU (`--quantization int8`).

Each weight row gets one fp32 scale, its largest magnitude over 127, and is rounded to int8
(symmetric, per output channel: no zero points, no calibration data). At a few rows a decode step
streams every weight once, so the small-batch kernel `llm_cpu::int8_small_batch_linear` reads
half the bytes of bf16 and a quarter of fp32. Larger batches are compute-bound and stay on oneDNN,
which is given the dequantized weights: every path computes with the same rounded weights, so a
sequence's tokens do not depend on the batch it shares.
"""

from __future__ import annotations

import torch


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in], fp32 scale [out]); weight ~= qweight * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.float() * scale[:, None]).to(dtype)
