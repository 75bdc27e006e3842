"""store_kv: write the K and V of a flat batch of new tokens into their cache slots.

slot = block_id * block_size + offset; slot -1 is padding and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.common import check, check_cache, check_index, check_same_device


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_key_token, stride_value_token,
    KV_WIDTH: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    # A padding slot (-1) writes nothing: its mask is empty.
    mask = offsets < tl.where(slot >= 0, KV_WIDTH, 0)
    k = tl.load(key_ptr + token * stride_key_token + offsets, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + offsets, mask=mask)
    tl.store(k_cache_ptr + slot * KV_WIDTH + offsets, k, mask=mask)
    tl.store(v_cache_ptr + slot * KV_WIDTH + offsets, v, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    check_cache(k_cache, v_cache)
    check_index(slot_mapping, "slot_mapping", 1)
    check(key.shape == value.shape and key.dim() == 3, "key and value must be [tokens, kvh, d]")
    check(key.shape[1:] == k_cache.shape[2:], "key heads/dim do not match the cache")
    check(key.shape[0] == slot_mapping.shape[0], "one slot per token")
    check(key.dtype == k_cache.dtype == value.dtype, "key, value and cache dtypes differ")
    check(key[0].is_contiguous() and value[0].is_contiguous() if key.shape[0] else True,
          "each token's [kvh, d] must be contiguous")
    check_same_device(key, value, k_cache, v_cache, slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    width = key.shape[1] * key.shape[2]
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        KV_WIDTH=width, BLOCK=triton.next_power_of_2(width),
    )
