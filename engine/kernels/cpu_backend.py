"""The C++ attention backend: the CPU path once `engine/kernels/cpu_ops.py` has loaded its library.

Decoding reads the KV blocks in place (`torch.ops.llm_cpu.paged_decode_attention`), where the
torch reference gathers each context into a copy first: 4-9x faster per call at one sequence,
2-3x at 32. Prefill chunks stay on the reference: SDPA's flash kernel is compute-bound there and
the gather is small beside it.
"""

from __future__ import annotations

import torch

from engine.layers.attention import TorchBackend


class CpuBackend(TorchBackend):
    """The torch backend with its decode and cache writes in C++ (prefill is inherited)."""

    name = "cpu"

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        torch.ops.llm_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, scale):
        return torch.ops.llm_cpu.paged_decode_attention(
            query, k_cache, v_cache, block_tables, context_lens, scale
        )
