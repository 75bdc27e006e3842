"""The Triton attention backend: the GPU path, behind the same interface as the torch one."""

from __future__ import annotations

from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.store_kv import store_kv


class TritonBackend:
    name = "triton"

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        store_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, scale):
        return paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)

    def prefill(
        self, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q_len,
    ):
        return paged_prefill_attention(
            query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q_len
        )
