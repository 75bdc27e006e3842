"""Attention on the paged KV cache through one small backend interface.

A step's tokens are laid out decodes first (one query token per sequence), then prefill chunks.
The backend writes the new K and V into their cache slots, then attends from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.kernels import reference


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token, -1 = padding
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # [num_decodes]
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1], offsets into the prefill tokens
    prefill_context_lens: torch.Tensor  # [num_prefills]
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks]
    max_prefill_q_len: int = 0


class AttentionBackend(Protocol):
    name: str

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None: ...

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
        ...

    def prefill(
        self, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q_len,
    ) -> torch.Tensor: ...


class TorchBackend:
    """The plain-torch reference: the CPU path."""

    name = "torch"

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        reference.store_kv_reference(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, scale):
        return reference.paged_decode_attention_reference(
            query, k_cache, v_cache, block_tables, context_lens, scale
        )

    def prefill(
        self, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q_len,
    ):
        return reference.paged_prefill_attention_reference(
            query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale
        )


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        from engine.kernels.backend import TritonBackend

        return TritonBackend()
    if name == "cpu":
        from engine.kernels.cpu_backend import CpuBackend

        return CpuBackend()
    raise ValueError(f"unknown attention backend {name!r}")


def paged_attention(
    backend: AttentionBackend,
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    backend.store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    num_decodes = meta.num_decode_tokens
    if num_decodes == query.shape[0]:
        return backend.decode(
            query, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
        )
    prefill_out = backend.prefill(
        query[num_decodes:], k_cache, v_cache, meta.prefill_cu_seqlens_q,
        meta.prefill_context_lens, meta.prefill_block_tables, scale, meta.max_prefill_q_len,
    )
    if num_decodes == 0:
        return prefill_out
    decode_out = backend.decode(
        query[:num_decodes], k_cache, v_cache, meta.decode_block_tables,
        meta.decode_context_lens, scale,
    )
    return torch.cat((decode_out, prefill_out))
