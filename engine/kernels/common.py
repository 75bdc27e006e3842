"""Shared by the Triton wrappers: argument checks and the compute dtype.

Triton 3.9's interpreter mishandles bf16 arithmetic, so under `TRITON_INTERPRET=1` every load is
upcast to fp32 at once. On a GPU, q/k/p/v stay in the input dtype for `tl.dot` (fp32 accumulate);
fp32 inputs use IEEE dot products, not tf32.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(dtype: torch.dtype):
    import triton.language as tl

    if is_interpreted() or dtype == torch.float32:
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim]")
    check(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    check(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    check(k_cache.dtype in SUPPORTED_DTYPES, f"unsupported cache dtype {k_cache.dtype}")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous")
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    check(block_size >= 16 and block_size & (block_size - 1) == 0,
          f"block_size must be a power of two >= 16, got {block_size}")
    check(head_dim >= 16 and head_dim & (head_dim - 1) == 0,
          f"head_dim must be a power of two >= 16, got {head_dim}")


def check_same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    check(len(devices) == 1, f"tensors are on different devices: {devices}")


def check_index(t: torch.Tensor, name: str, dim: int) -> None:
    check(t.dim() == dim, f"{name} must have {dim} dimension(s)")
    check(t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64")
    check(t.is_contiguous(), f"{name} must be contiguous")
