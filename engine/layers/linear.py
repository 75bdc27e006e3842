"""Linear layers prepared once for the CPU: weights reordered into oneDNN's blocked layout.

Eager `F.linear` walks a plain [out, in] matrix through a generic GEMM on every call. At the row
counts of decoding (1-64 rows) oneDNN with its weights reordered ahead of time runs 1.5-2x faster
on this project's machines (`bench/linear.py`), in fp32 and bf16 alike; it is the rewrite
Inductor makes when it freezes a graph for the CPU, done here without compiling anything.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN lays the weights out for. It is a hint, not a limit: any row count runs.
# 32 measured as good as the exact count at 1 and 8 rows, and better at 32 and in prefill.
PACK_ROWS_HINT = 32


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` for 2-D `x`, with `weight` held only in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # An opaque oneDNN tensor: a plain attribute, outside the module's state dict.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), PACK_ROWS_HINT
        )
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear` (the plain weight is dropped);
    return how many. A tied output head gets its own packed copy of the embedding."""
    num_packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight, child.bias))
                num_packed += 1
    if getattr(model, "lm_head", False) is None:  # tied to the embedding
        model.lm_head = PackedLinear(model.embed_tokens.weight, None)
        num_packed += 1
    return num_packed
