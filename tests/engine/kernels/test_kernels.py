"""Each Triton kernel against its torch reference, under Triton's interpreter on the CPU.

Fresh random inputs each run; outputs poisoned with NaN before the call so an unwritten element
fails. Contexts end on, just before and just after block boundaries; batches mix a 1-token
context with multi-block ones; padding slots and padded block tables are included.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.rms_norm import add_rms_norm
from engine.kernels.store_kv import store_kv

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}
NUM_KV_HEADS = 2


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: the storage dtype's own rounding stays below the
    tolerances (a max-element ratio would flag one bf16 ulp of a large element)."""
    assert not torch.isnan(actual).any(), "an output element was never written"
    diff = (actual.float() - expected.float()).norm()
    return float(diff / expected.float().norm().clamp(min=1e-6))


def _paged_cache(context_lens: list[int], block_size: int, head_dim: int, dtype):
    """A cache with every sequence's blocks scattered at random, plus spare blocks."""
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks).tolist()
    width = max(blocks_per_seq)
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(order[used:used + n] + [-1] * (width - n))
        used += n
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    k_cache = torch.randn(shape).to(dtype)
    v_cache = torch.randn(shape).to(dtype)
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32)


def _context_lens(block_size: int) -> list[int]:
    # on, just before and just after a block boundary; a 1-token context; a multi-block one
    return [block_size, block_size - 1, block_size + 1, 1, 3 * block_size + 5]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def decode_case(dtype, group: int, head_dim: int, block_size: int):
    """Decode inputs (query, caches, tables, lens, scale) and the fp32 reference's output."""
    context_lens = _context_lens(block_size)
    k_cache, v_cache, tables = _paged_cache(context_lens, block_size, head_dim, dtype)
    query = torch.randn(len(context_lens), NUM_KV_HEADS * group, head_dim).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    expected = reference.paged_decode_attention_reference(
        query.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    return query, k_cache, v_cache, tables, lens, scale, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_store_kv_matches_reference(dtype, block_size, head_dim):
    k_cache, v_cache, _ = _paged_cache([3 * block_size], block_size, head_dim, dtype)
    num_tokens = 9
    key = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    slots = torch.randperm(k_cache.shape[0] * block_size)[:num_tokens]
    slots[[2, 5]] = -1  # padding
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv_reference(key, value, expected_k, expected_v, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_matches_reference(dtype, group, head_dim, block_size, num_splits):
    query, k_cache, v_cache, tables, lens, scale, expected = decode_case(
        dtype, group, head_dim, block_size)
    poisoned = torch.full_like(query, float("nan"))
    actual = paged_decode_attention(query, k_cache, v_cache, tables, lens, scale,
                                    num_splits=num_splits, out=poisoned)
    assert actual is poisoned
    assert actual.dtype == dtype
    assert _rel_error(actual, expected) < TOLERANCE[dtype]


def prefill_case(dtype, group: int, head_dim: int, block_size: int):
    """Prefill inputs (query, caches, cu_seqlens, lens, tables, scale) and the fp32 reference's
    output. Chunks: a whole prompt, one after a cached prefix, single tokens, a long one."""
    context_lens = _context_lens(block_size)
    q_lens = [block_size, 5, block_size + 1, 1, 2 * block_size + 3]
    k_cache, v_cache, tables = _paged_cache(context_lens, block_size, head_dim, dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    query = torch.randn(int(cu[-1]), NUM_KV_HEADS * group, head_dim).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    expected = reference.paged_prefill_attention_reference(
        query.float(), k_cache.float(), v_cache.float(), cu, lens, tables, scale)
    return query, k_cache, v_cache, cu, lens, tables, scale, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_attention_matches_reference(dtype, group, head_dim, block_size):
    query, k_cache, v_cache, cu, lens, tables, scale, expected = prefill_case(
        dtype, group, head_dim, block_size)
    actual = paged_prefill_attention(query, k_cache, v_cache, cu, lens, tables, scale,
                                     out=torch.full_like(query, float("nan")))
    assert _rel_error(actual, expected) < TOLERANCE[dtype]


def test_wrappers_refuse_bad_arguments():
    k_cache, v_cache, tables = _paged_cache([20], 16, 64, torch.float32)
    query = torch.randn(1, 2, 64)
    lens = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_decode_attention(query.half(), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        paged_decode_attention(query, k_cache, v_cache, tables.float(), lens, 0.1)
    with pytest.raises(ValueError, match="block_size"):
        small = torch.zeros(4, 8, 2, 64)
        paged_decode_attention(query, small, small, tables, lens, 0.1)
    with pytest.raises(ValueError, match="one slot per token"):
        store_kv(torch.randn(3, 2, 64), torch.randn(3, 2, 64), k_cache, v_cache,
                 torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype, hidden, with_residual):
    x = torch.randn(7, hidden).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    residual = torch.randn(7, hidden).to(dtype) if with_residual else None
    expected_residual = residual.clone() if with_residual else None
    expected = reference.add_rms_norm_reference(x, expected_residual, weight, 1e-5)
    actual = add_rms_norm(x, residual, weight, 1e-5, out=torch.full_like(x, float("nan")))
    # Triton 3.9's interpreter truncates fp32 -> bf16 on store (torch rounds to nearest; seen:
    # 1.2982 stored as 1.2891, not 1.2969): a whole ulp per bf16 store, so a looser bound here.
    tolerance = 1e-2 if dtype == torch.bfloat16 else TOLERANCE[dtype]
    assert _rel_error(actual, expected) < tolerance
    if with_residual:
        assert _rel_error(residual, expected_residual) < tolerance
