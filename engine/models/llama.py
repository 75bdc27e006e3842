"""Llama-family decoders (Llama 2/3, Mistral, Qwen2) for the paged engine.

q, k and v are one fused projection, gate and up another: fewer, larger matmuls. The loader maps
Hugging Face's separate weights into their slices (`packed_slice`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.distributed.tensor_parallel import SINGLE
from engine.layers.activation import silu_and_mul
from engine.layers.attention import AttentionBackend, AttentionMetadata, paged_attention
from engine.layers.norm import RMSNorm
from engine.layers.rotary import rotate_query_key


@dataclass
class ForwardContext:
    """What every layer needs for one step, built once per step by the model runner."""

    cos: torch.Tensor  # [num_tokens, 1, head_dim / 2]
    sin: torch.Tensor
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)
    backend: AttentionBackend
    # Set for decode steps of a few sequences: every layer in one C++ call (decoder_stack.py).
    decoder_stack: Any = None


class Linear(nn.Linear):
    """`nn.Linear` without its random init: the weights always come from a checkpoint, and the
    init dispatched on the meta device cost 50-90 ms of a cold start for SmolLM2's 121 linears
    (the model is built there, then its parameters placed)."""

    def reset_parameters(self) -> None:
        pass


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.tp = SINGLE  # this rank's heads only once sharded (engine/distributed/sharding.py)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotate_query_key(
            q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
            ctx.cos, ctx.sin,
        )
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = paged_attention(ctx.backend, q, k, v, k_cache, v_cache, ctx.attn, self.scale)
        # [num_tokens, hidden]: the sum over ranks of each one's heads
        return self.tp.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.tp = SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor | None, residual: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """x: the last layer's output, added into the residual stream by the first norm (None
        on the first layer, whose input is the stream itself); returns this layer's output."""
        h = self.input_layernorm(residual) if x is None else self.input_layernorm(x, residual)
        x = self.self_attn(h, ctx)
        return self.mlp(self.post_attention_layernorm(x, residual))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Given its weight, the embedding skips its random init: the weights always come from a
        # checkpoint, and `normal_` on the meta device imports torch._dynamo (1.6 s of a start).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Sharded, this rank holds vocabulary rows [vocab_start, vocab_start + rows) of the
        # embedding and the head, the last rank's padded with zero rows to the same count.
        self.tp, self.vocab_start = SINGLE, 0

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # [num_tokens, hidden]: the residual stream, which each norm adds a sublayer's output into
        residual = self._embed(input_ids)
        if ctx.decoder_stack is not None:
            meta = ctx.attn
            x = ctx.decoder_stack.forward(residual, ctx.cos, ctx.sin, meta.slot_mapping,
                                          meta.decode_block_tables, meta.decode_context_lens)
            return self.norm(x, residual)
        x = None
        for layer in self.layers:
            x = layer(x, residual, ctx)
        return self.norm(x, residual)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self.embed_tokens(input_ids)
        local_ids = input_ids - self.vocab_start
        is_other = (local_ids < 0) | (local_ids >= self.embed_tokens.weight.shape[0])
        x = self.embed_tokens(local_ids.masked_fill(is_other, 0))
        return self.tp.all_reduce(x.masked_fill_(is_other[:, None], 0.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab]: on every rank, each rank's slice of the vocabulary gathered."""
        if self.lm_head is None:  # tied to the embedding
            logits = F.linear(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather_last_dim(logits)[:, : self.config.vocab_size]

    def packed_slice(self, name: str) -> tuple[str, int, int]:
        """Map a Hugging Face weight name to (our parameter, first row, number of rows).

        The number of rows is -1 for a whole parameter.
        """
        name = name.removeprefix("model.")
        c = self.config
        q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        packed = {
            "q_proj": ("qkv_proj", 0, q_rows),
            "k_proj": ("qkv_proj", q_rows, kv_rows),
            "v_proj": ("qkv_proj", q_rows + kv_rows, kv_rows),
            "gate_proj": ("gate_up_proj", 0, c.intermediate_size),
            "up_proj": ("gate_up_proj", c.intermediate_size, c.intermediate_size),
        }
        for part, (fused, start, rows) in packed.items():
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), start, rows
        return name, 0, -1
