"""Attention kernels: Triton for the GPU (`store_kv`, `decode_attention`, `prefill_attention`),
plain-torch references (`reference.py`) for the CPU path and for the tests.

No GPU has run these yet: they are proven in Triton's interpreter against the references, and
written to compile on Ampere/Hopper (power-of-two tiles >= 16 for `tl.dot`, fp32 accumulation,
runtime sizes as arguments, shapes as `tl.constexpr`). What they should reach on an H100
(~3.0 TB/s copy bandwidth, ~800 TFLOP/s dense bf16), per call, with T tokens, H query heads,
Hkv KV heads, head_dim D, 2-byte elements:

store_kv (T new tokens)
    bytes: read K and V, write them to their slots = 2 x 2 x T x Hkv x D x 2 B; FLOPs: none.
    Llama-3-8B (Hkv 8, D 128), T = 8192: 67 MB -> floor 22 us. Pure bandwidth.

paged decode attention (S sequences, contexts C_i, one query token each)
    bytes: K and V of every context = 2 x sum(C_i) x Hkv x D x 2 B (q and out are negligible);
    FLOPs: 4 x sum(C_i) x H x D. Intensity = H / Hkv FLOP/B (8 for Llama-3-8B), far below the
    H100's ridge (~270 FLOP/B): memory-bound, so the target is most of 3 TB/s. One program per
    (sequence, KV head) reads each KV block once for all H / Hkv query heads sharing it.
    Llama-3-8B, S = 64, C = 4096: 1.07 GB per layer -> floor 0.36 ms per layer. With S x Hkv
    below ~256 programs the context is split (flash-decoding) so every SM streams KV.

paged prefill attention (chunks of q_i tokens after prefixes p_i, context C_i = p_i + q_i)
    FLOPs: 4 x H x D x sum(q_i x (p_i + (q_i + 1) / 2)) (causal); bytes: q and out
    (2 x sum(q_i) x H x D x 2 B) plus K/V re-read per 16-row query tile and head.
    Compute-bound for long chunks: 8 prompts of 2048 tokens, Llama-3-8B: 275 GFLOP per layer ->
    floor 0.34 ms per layer at 800 TFLOP/s.
"""
