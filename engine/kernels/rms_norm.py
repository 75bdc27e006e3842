"""Fused residual add + RMSNorm: one read of x and the residual, one write of each result.

bytes: (2 reads + 2 writes) x tokens x hidden x 2 B; FLOPs ~4 per element: bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.common import check, check_same_device


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_residual, stride_out,
    num_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(
            tl.float32)
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_residual + cols, x, mask=mask)
        x = x.to(tl.float32)
    variance = tl.sum(x * x, 0) / num_cols
    # One rounding at the end (the reference rounds twice, as HF does: <= 1 ulp apart).
    normed = x * tl.rsqrt(variance + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden], updated in place to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    check(x.dim() == 2 and x.stride(1) == 1, "x must be [tokens, hidden] with contiguous rows")
    check(weight.shape == (x.shape[1],), "weight must be [hidden]")
    if residual is not None:
        check(residual.shape == x.shape and residual.stride(1) == 1,
              "residual must be shaped like x, rows contiguous")
        check_same_device(x, residual, weight)
    check_same_device(x, weight)
    if out is None:
        out = torch.empty_like(x)
    check(out.shape == x.shape and out.stride(1) == 1 and out.dtype == x.dtype,
          "out must be shaped and typed like x")
    if x.shape[0] == 0:
        return out
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), x.shape[1], eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]),
    )
    return out
