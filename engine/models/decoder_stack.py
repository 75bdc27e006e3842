"""The decoder layers as one C++ call for decode steps of a few sequences (as many as the
small-batch kernels take; w8a8's and w4a8's kernels take any number)
(`torch.classes.llm_cpu.DecoderStack`, engine/kernels/cpu/decoder_stack.cpp).

There a step streams every weight through the small-batch kernels, and the Python around them
(module calls, views, one op call at a time: ~30 per layer) took a third of the step. The stack
holds each layer's tensors and runs the same kernels in the same order, so its output is the
Python layers' own, bit for bit (tests/engine/models/test_decoder_stack.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.kernels import cpu_ops
from engine.layers.linear import PackedLinear


def build_decoder_stack(model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                        dtype: torch.dtype, lossless: bool = False) -> Any | None:
    """The stack over `model`'s layers and caches, or None where it cannot serve: no C++
    kernels, linears not packed for the CPU, a tensor-parallel shard, norms in another dtype.
    `lossless`: the linears' 4-bit copies where they have one (engine/layers/lossless.py), as
    the Python layers read them at up to `LOSSLESS_MAX_ROWS` rows; None if none has."""
    if not cpu_ops.is_loaded() or model.tp.world_size > 1:
        return None
    if lossless and not any(isinstance(m, PackedLinear) and m.lossless is not None
                            for m in model.layers.modules()):
        return None
    first = model.layers[0]
    attn = first.self_attn
    stack = torch.classes.llm_cpu.DecoderStack(
        attn.num_heads, attn.num_kv_heads, attn.head_dim, first.input_layernorm.eps, attn.scale)
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if not all(isinstance(m, PackedLinear) for m in linears):
            return None
        if any(w.dtype != dtype for w in norms):
            return None
        qkv, o, gate_up, down = (_linear(m, lossless) for m in linears)
        stack.add_layer(norms[0], *qkv, *o, norms[1], *gate_up[:2], *down[:2], k_cache, v_cache)
    return stack


def _linear(m: PackedLinear, lossless: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if lossless and m.lossless is not None:
        return *m.lossless, m.bias
    return m.weight, m.weight_scale, m.bias
