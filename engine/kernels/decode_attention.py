"""Paged decode attention: one query token per sequence against its paged context.

One program per (sequence, KV head, context split): the group of query heads that share the KV
head is one [GROUP_PAD, head_dim] tile, so each KV block is read once per KV head. Online softmax
over the blocks. With few sequences and long contexts the context is split across programs
(flash-decoding) and a second kernel reduces the partial results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.common import (
    check,
    check_cache,
    check_index,
    check_same_device,
    compute_dtype,
    next_power_of_2,
)

TARGET_PROGRAMS = 256  # enough programs to fill an H100's 132 SMs twice
MIN_BLOCKS_PER_SPLIT = 4


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, m_ptr, l_ptr,  # out: [seqs, heads, splits, d]; m, l: [seqs, heads, splits]
    scale, blocks_per_split,
    stride_q_seq, stride_q_head, stride_table_seq,
    stride_cache_block, stride_cache_token, stride_cache_head,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + g
    is_head = g < GROUP
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :],
                mask=is_head[:, None], other=0.0).to(COMPUTE)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    for b in range(first, last):
        block_id = tl.load(block_tables_ptr + seq * stride_table_seq + b).to(tl.int64)
        offsets = (block_id * stride_cache_block + t[:, None] * stride_cache_token
                   + kv_head * stride_cache_head + d[None, :])
        k = tl.load(k_cache_ptr + offsets).to(COMPUTE)  # [BLOCK_SIZE, HEAD_DIM]
        v = tl.load(v_cache_ptr + offsets).to(COMPUTE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_SIZE]
        s = tl.where((b * BLOCK_SIZE + t)[None, :] < context_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
        m_i = m_new
    row = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
    if NUM_SPLITS == 1:
        acc = acc / l_i[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=is_head[:, None])
    tl.store(m_ptr + row, m_i, mask=is_head)
    tl.store(l_ptr + row, l_i, mask=is_head)


@triton.jit
def _reduce_kernel(
    partial_ptr, m_ptr, l_ptr, out_ptr, stride_out_seq, stride_out_head,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + s
    is_split = s < NUM_SPLITS
    m = tl.load(m_ptr + row, mask=is_split, other=float("-inf"))
    l_part = tl.load(l_ptr + row, mask=is_split, other=0.0)
    m_max = tl.max(m, 0)
    # Splits past the context end have l = 0 and m = -inf: weight 0.
    weight = tl.where(l_part > 0, tl.exp(m - m_max), 0.0)
    acc = tl.load(partial_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=is_split[:, None],
                  other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_part * weight, 0)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + d,
             out.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int,
                      block_size: int) -> int:
    """Split the context only when sequences x KV heads leave the GPU underused."""
    programs = num_seqs * num_kv_heads
    max_blocks = -(-max_context_len // block_size)
    if programs >= TARGET_PROGRAMS or max_blocks < 2 * MIN_BLOCKS_PER_SPLIT:
        return 1
    return max(1, min(TARGET_PROGRAMS // programs, max_blocks // MIN_BLOCKS_PER_SPLIT, 64))


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks], -1 padded
    context_lens: torch.Tensor,  # [num_seqs]
    scale: float,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], contiguous
) -> torch.Tensor:
    check_cache(k_cache, v_cache)
    check_index(block_tables, "block_tables", 2)
    check_index(context_lens, "context_lens", 1)
    check(query.dim() == 3 and query.shape[2] == k_cache.shape[3], "query must be [seqs, h, d]")
    check(query.stride(2) == 1, "query's head_dim must be contiguous")
    check(query.dtype == k_cache.dtype, "query and cache dtypes differ")
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    check(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
    check(block_tables.shape[0] == num_seqs == context_lens.shape[0], "one row per sequence")
    check_same_device(query, k_cache, v_cache, block_tables, context_lens)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    check(out.shape == query.shape and out.is_contiguous() and out.dtype == query.dtype,
          "out must be a contiguous tensor shaped and typed like query")
    if num_seqs == 0:
        return out
    if num_splits is None:
        longest = max_context_len or block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, longest, block_size)
    blocks_per_split = -(-block_tables.shape[1] // num_splits)
    group = num_heads // num_kv_heads
    partial = out if num_splits == 1 else query.new_empty(
        num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32)
    m = query.new_empty(num_seqs, num_heads, num_splits, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, partial, m, l_sum,
        scale, blocks_per_split,
        query.stride(0), query.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        COMPUTE=compute_dtype(query.dtype), PRECISION=precision,
    )
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            partial, m, l_sum, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits,
            SPLITS_PAD=next_power_of_2(num_splits), HEAD_DIM=head_dim,
        )
    return out
