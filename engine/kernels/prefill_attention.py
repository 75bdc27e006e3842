"""Paged prefill attention: variable-length query chunks (`cu_seqlens_q`) attending causally to
their cached prefix plus themselves, read from the paged blocks (the chunk is already stored).

One program per (sequence, query head, BLOCK_M query rows). What chunked prefill and prefix
caching need: a chunk's queries start at position `context_len - q_len`, not at 0.
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
)

BLOCK_M = 16


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr,
    scale,
    stride_q_token, stride_q_head, stride_out_token, stride_out_head, stride_table_seq,
    stride_cache_block, stride_cache_token, stride_cache_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    is_row = rows < q_len
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_SIZE)
    kv_head = head // GROUP
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_q_token + head * stride_q_head
                + d[None, :], mask=is_row[:, None], other=0.0).to(COMPUTE)
    q_pos = prefix_len + rows
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Causality: this tile's last row sees keys up to its own position, never past the context.
    visible = tl.minimum(context_len, prefix_len + (m_block + 1) * BLOCK_M)
    num_blocks = tl.where(m_block * BLOCK_M < q_len, tl.cdiv(visible, BLOCK_SIZE), 0)
    for b in range(0, num_blocks):
        block_id = tl.load(block_tables_ptr + seq * stride_table_seq + b).to(tl.int64)
        offsets = (block_id * stride_cache_block + t[:, None] * stride_cache_token
                   + kv_head * stride_cache_head + d[None, :])
        k = tl.load(k_cache_ptr + offsets).to(COMPUTE)
        v = tl.load(v_cache_ptr + offsets).to(COMPUTE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_SIZE]
        k_pos = b * BLOCK_SIZE + t
        is_visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < context_len)
        s = tl.where(is_visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the chunk: all masked
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_out_token + head * stride_out_head
             + d[None, :], out.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1]
    context_lens: torch.Tensor,  # [num_seqs]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    scale: float,
    max_q_len: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    check_cache(k_cache, v_cache)
    check_index(cu_seqlens_q, "cu_seqlens_q", 1)
    check_index(context_lens, "context_lens", 1)
    check_index(block_tables, "block_tables", 2)
    check(query.dim() == 3 and query.shape[2] == k_cache.shape[3], "query must be [tokens, h, d]")
    check(query.stride(2) == 1, "query's head_dim must be contiguous")
    check(query.dtype == k_cache.dtype, "query and cache dtypes differ")
    num_seqs = context_lens.shape[0]
    check(cu_seqlens_q.shape[0] == num_seqs + 1 == block_tables.shape[0] + 1,
          "cu_seqlens_q has num_seqs + 1 entries, block_tables num_seqs rows")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    check(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads")
    check_same_device(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    check(out.shape == query.shape and out.stride(2) == 1 and out.dtype == query.dtype,
          "out must be shaped and typed like query")
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    grid = (num_seqs, num_heads, triton.cdiv(max_q_len, BLOCK_M))
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=BLOCK_M, COMPUTE=compute_dtype(query.dtype),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out
