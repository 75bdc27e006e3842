"""Plain-torch references of the attention kernels: the CPU path, and the truth the Triton kernels
are tested against.

Shapes: a KV cache is `[num_blocks, block_size, num_kv_heads, head_dim]`; a block table is
`[num_seqs, max_blocks]` of block ids padded with -1; slot -1 is padding and is never written.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.layers.quantization import dequantize_int4, dequantize_int8, quantize_rows_int8


def store_kv_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = padding
) -> None:
    num_kv_heads, head_dim = k_cache.shape[2:]
    is_valid = slot_mapping >= 0
    slots = slot_mapping[is_valid].long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key[is_valid])
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value[is_valid])


def gather_context(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., max_blocks] block ids -> [..., max_blocks * block_size, num_kv_heads, head_dim]."""
    blocks = cache[block_table.clamp(min=0).long()]  # [..., max_blocks, bs, kvh, d]
    return blocks.flatten(-4, -3)


def paged_decode_attention_reference(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], one token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    context_lens: torch.Tensor,  # [num_seqs], tokens in the cache, the query's own included
    scale: float,
) -> torch.Tensor:
    """Two batched matmuls with the query heads grouped under their KV head. With one query
    token per sequence this is several times faster on the CPU than SDPA's flash kernel."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    keys = gather_context(k_cache, block_tables).to(query.dtype)  # [seqs, ctx, kvh, d]
    values = gather_context(v_cache, block_tables).to(query.dtype)
    grouped = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1)).float()  # [seqs, kvh, group, ctx]
    positions = torch.arange(keys.shape[1], device=query.device)
    is_hidden = positions[None, :] >= context_lens[:, None].to(query.device)  # [seqs, ctx]
    scores.mul_(scale).masked_fill_(is_hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))  # [seqs, kvh, group, d]
    return out.view(num_seqs, num_heads, head_dim)


def paged_prefill_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], chunks of several sequences
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1]
    context_lens: torch.Tensor,  # [num_seqs], cached prefix plus the new chunk
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    scale: float,
) -> torch.Tensor:
    """Each chunk attends causally to its cached prefix and to itself (already in the cache)."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(query)
    bounds = cu_seqlens_q.tolist()
    for i, context_len in enumerate(context_lens.tolist()):
        start, end = bounds[i], bounds[i + 1]
        num_blocks = -(-context_len // block_size)
        table = block_tables[i, :num_blocks]
        keys = gather_context(k_cache, table)[:context_len].transpose(0, 1)  # [kvh, ctx, d]
        values = gather_context(v_cache, table)[:context_len].transpose(0, 1)
        out[start:end] = _causal_attention(query[start:end], keys, values, scale)
    return out


def _causal_attention(
    query: torch.Tensor,  # [q_len, heads, d]: the last q_len positions of the context
    keys: torch.Tensor,  # [kvh, ctx, d]
    values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    q_len, context_len = query.shape[0], keys.shape[1]
    # 4-D inputs and an additive mask in the query's dtype: what SDPA's fused CPU kernel (flash)
    # takes. 3-D inputs or a boolean mask fall back to its math kernel: 3x slower for a 1,024-token
    # chunk over 2,048 of context, and 80% of the time to a first token at that length.
    dtype = torch.float32 if _is_sdpa_half_broken() else query.dtype
    mask = None
    if q_len != context_len:
        q_pos = torch.arange(q_len, device=query.device)[:, None] + (context_len - q_len)
        is_allowed = torch.arange(context_len, device=query.device)[None, :] <= q_pos
        mask = torch.zeros(is_allowed.shape, dtype=dtype, device=query.device)
        mask.masked_fill_(~is_allowed, float("-inf"))
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None].to(dtype),  # [1, heads, q_len, d]
        keys.to(dtype)[None],
        values.to(dtype)[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).to(query.dtype)


@functools.cache
def _is_sdpa_half_broken() -> bool:
    """torch 2.13's SDPA packs bf16 for AMX when the CPU has AMX, but refuses to ("pack_vnni2 is
    only supported when avx512 is supported") when told to dispatch lower (ATEN_CPU_CAPABILITY=avx2,
    how the other instruction sets' libraries are tested on an AMX machine): fp32 there."""
    return (torch.cpu._is_amx_tile_supported()
            and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"))


def add_rms_norm_reference(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden], updated to x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    """RMSNorm of (x + residual), computed in fp32 as Hugging Face Llama does."""
    if residual is not None:
        residual.copy_((x.float() + residual.float()).to(residual.dtype))
        x = residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * n] -> [num_tokens, n]: SiLU of the first half (the gate) times the rest."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def int8_linear_reference(
    x: torch.Tensor,  # [rows, in]
    qweight: torch.Tensor,  # int8 [out, in]
    scale: torch.Tensor,  # fp32 [out, groups]: each row's groups of in / groups weights
    bias: torch.Tensor | None,  # [out], x's dtype
) -> torch.Tensor:
    """x times the dequantized weights, in fp32, rounded once to x's dtype."""
    y = F.linear(x.float(), dequantize_int8(qweight, scale, torch.float32))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_rows_int16(x: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, in] -> (int16 [rows, in], fp32 scale [rows, in / group]): each group of a row
    rounded to int16 against its largest magnitude (x ~ q * scale), as the AVX2 int8 kernel
    rounds its activations."""
    num_rows, in_features = x.shape
    groups = x.float().reshape(num_rows, -1, group)  # [rows, groups, group]
    amax = groups.abs().amax(dim=2)
    inverse = torch.where(amax > 0, 32767 / amax, torch.zeros_like(amax))
    q = torch.round(groups * inverse[:, :, None]).to(torch.int16)
    return q.reshape(num_rows, in_features), amax / 32767


def int8_int16_linear_reference(
    x: torch.Tensor,  # [rows, in], in groups of 32
    qweight: torch.Tensor,  # int8 [out, in]
    scale: torch.Tensor,  # fp32 [out, in / 32]
    bias: torch.Tensor | None,  # [out], x's dtype
) -> torch.Tensor:
    """x rounded to int16 per group of 32 (`quantize_rows_int16`) times the dequantized
    weights, in fp64, rounded once to x's dtype: what the AVX2 int8 kernel computes."""
    return _int16_x_linear_reference(x, dequantize_int8(qweight, scale, torch.float64), bias)


def int4_linear_reference(
    x: torch.Tensor,  # [rows, in], in groups of 32
    packed: torch.Tensor,  # uint8 [out, in / 2]
    step_min: torch.Tensor,  # fp16 [2, out, in / 32]
    bias: torch.Tensor | None,  # [out], x's dtype
) -> torch.Tensor:
    """x rounded to int16 per group of 32 (`quantize_rows_int16`) times the dequantized int4
    weights, in fp64, rounded once to x's dtype: what the int4 kernel computes."""
    return _int16_x_linear_reference(x, dequantize_int4(packed, step_min, torch.float64), bias)


def _int16_x_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    q, x_scale = quantize_rows_int16(x)
    x_rounded = q.double().reshape(*x_scale.shape, -1) * x_scale.double()[:, :, None]
    y = F.linear(x_rounded.reshape(x.shape), weight)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def int4_fp32_linear_reference(x: torch.Tensor, packed: torch.Tensor, step_min: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """What `llm_cpu::int4_fp32_linear` computes, up to the order of its fp32 sums: x times the
    weights rebuilt from engine/layers/lossless.py's nibbles and scales."""
    nibbles = packed.reshape(packed.shape[0], -1)  # [out, in / 2]
    weight = dequantize_int4(nibbles, step_min.permute(2, 0, 1), torch.float32)  # exact
    return F.linear(x, weight.to(x.dtype), bias)


def w8a8_linear_reference(
    x: torch.Tensor,  # [rows, in], in groups of 32
    qweight: torch.Tensor,  # int8 [out, in]
    scale: torch.Tensor,  # fp32 [out, in / 32]
    bias: torch.Tensor | None,  # [out], x's dtype
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """x rounded to int8 per group of 32 (`quantize_rows_int8`) times the dequantized int8
    weights, in `compute_dtype`, rounded once to x's dtype: in fp64 what `llm_cpu::w8a8_linear`
    computes up to its fp32 sums (each group's integer dot is exact in both)."""
    y = F.linear(_int8_rounded(x, compute_dtype), dequantize_int8(qweight, scale, compute_dtype))
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def w4a8_linear_reference(
    x: torch.Tensor,  # [rows, in], in groups of 32
    packed: torch.Tensor,  # uint8 [out, in / 2], quantize_int4's
    step_min: torch.Tensor,  # fp16 [2, out, in / 32]
    bias: torch.Tensor | None,  # [out], x's dtype
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """x rounded to int8 per group of 32 (`quantize_rows_int8`) times the dequantized int4
    weights, in `compute_dtype`, rounded once to x's dtype: in fp64 what `llm_cpu::w4a8_linear`
    computes up to its fp32 sums."""
    y = F.linear(_int8_rounded(x, compute_dtype),
                 dequantize_int4(packed, step_min, compute_dtype))
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def _int8_rounded(x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """x as w8a8 and w4a8 see it: each group of 32 of a row rounded to int8 (`quantize_rows_int8`),
    in `compute_dtype`."""
    q, x_scale = quantize_rows_int8(x)
    x_rounded = q.to(compute_dtype).reshape(*x_scale.shape, -1) * x_scale[:, :, None]
    return x_rounded.reshape(x.shape)
