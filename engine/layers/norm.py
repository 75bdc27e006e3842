"""RMSNorm, computed in fp32 as the reference implementations do, with the residual add fused in.

The residual stream is one tensor updated in place: each norm first adds the last sublayer's
output into it (`residual`), then normalises the sum, one pass over both on the CPU kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import cpu_ops
from engine.kernels.reference import add_rms_norm_reference


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm(x), or RMSNorm(x + residual) with `residual` set to that sum."""
        if cpu_ops.serves(x) and self.weight.dtype == x.dtype:
            return torch.ops.llm_cpu.rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm_reference(x, residual, self.weight, self.eps)
