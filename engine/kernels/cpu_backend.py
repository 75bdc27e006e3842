"""The C++ attention backend: the CPU path once `engine/kernels/cpu_ops.py` has loaded its library.

Decoding reads the KV blocks in place (`torch.ops.llm_cpu.paged_decode_attention`), where the
torch reference gathers each context into a copy first: 4-9x faster per call at one sequence,
2-3x at 32. Prefill chunks with contexts of up to 512 tokens go through the same kernel, each
token a query whose context ends at itself; longer ones stay on the reference's SDPA (flash).
"""

from __future__ import annotations

import torch

from engine.layers.attention import TorchBackend

# Prefill chunks whose contexts are all at most this long go through the decode kernel. bf16,
# ms a layer, kernel / SDPA: 4 prompts of 128 tokens 1.33 / 2.48, 16 of 128 4.57 / 9.07, three
# 24-token chunks after 100 0.39 / 0.92, two 512-token prompts 8.2 / 12.4, one 6.2 / 6.0; longer
# contexts favour SDPA (a 512-token chunk after 1,536: 29.9 / 24.6; 1,024 tokens 25.9 / 23.1).
MAX_KERNEL_CONTEXT = 512


class CpuBackend(TorchBackend):
    """The torch backend with its decode, cache writes and short prefill chunks in C++."""

    name = "cpu"

    def __init__(self):
        # The last step's prefill metadata and its per-token tables and lengths, built once for
        # all its layers (None: the contexts are too long for the kernel).
        self._per_token: tuple[tuple, tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        torch.ops.llm_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, scale):
        return torch.ops.llm_cpu.paged_decode_attention(
            query, k_cache, v_cache, block_tables, context_lens, scale
        )

    def prefill(
        self, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q_len,
    ):
        """Each prefill token attends to its sequence's context up to itself: a decode query
        whose context ends at its own position, so the decode kernel serves it, reading the
        blocks in place (its chunk's keys are in the cache already). Long contexts stay on
        SDPA's flash kernel, faster there."""
        key = (cu_seqlens_q, context_lens, block_tables)  # one step's: the same every layer
        cached = self._per_token
        if cached is None or any(a is not b for a, b in zip(cached[0], key, strict=True)):
            self._per_token = (key, _per_token_contexts(cu_seqlens_q, context_lens, block_tables))
        token_tables_lens = self._per_token[1]
        if token_tables_lens is None:
            return super().prefill(query, k_cache, v_cache, cu_seqlens_q, context_lens,
                                   block_tables, scale, max_q_len)
        token_tables, token_lens = token_tables_lens
        return torch.ops.llm_cpu.paged_decode_attention(
            query, k_cache, v_cache, token_tables, token_lens, scale
        )


def _per_token_contexts(cu_seqlens_q, context_lens, block_tables
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each prefill token's block table and context length (its chunk's cached prefix, then the
    chunk up to and with it), or None where a context is longer than MAX_KERNEL_CONTEXT."""
    if int(context_lens.max()) > MAX_KERNEL_CONTEXT:
        return None
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [num_prefills]
    token_tables = block_tables.repeat_interleave(q_lens, dim=0)  # [num_tokens, max_blocks]
    chunk_starts = (context_lens - q_lens).repeat_interleave(q_lens)
    num_tokens = int(cu_seqlens_q[-1])
    within_chunk = torch.arange(num_tokens) - cu_seqlens_q[:-1].repeat_interleave(q_lens)
    return token_tables, chunk_starts + within_chunk + 1
