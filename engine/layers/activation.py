"""The MLP's gated activation: SiLU(gate) * up over the fused gate/up projection's output."""

from __future__ import annotations

import torch

from engine.kernels import cpu_ops
from engine.kernels.reference import silu_and_mul_reference


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * n] -> [num_tokens, n]; one pass on the CPU kernel, three ops in torch."""
    if cpu_ops.serves(x) and x.stride(-1) == 1:
        return torch.ops.llm_cpu.silu_and_mul(x)
    return silu_and_mul_reference(x)
