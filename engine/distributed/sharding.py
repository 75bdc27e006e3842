"""Cut a loaded Llama-family model down to one rank's share (Megatron-style, as vLLM shards).

- q/k/v and gate/up are split by output rows: each rank keeps its attention heads and its slice
  of the MLP; with fewer KV heads than ranks, each KV head is replicated on the ranks whose query
  heads use it.
- o_proj and down_proj are split by input columns: each rank's partial sums are all-reduced
  (`Attention.forward`, `MLP.forward`); a bias stays on rank 0 only, so it is added once.
- The embedding and the LM head are split by vocabulary rows; the logits are gathered.

Any checkpoint (tensorizer, safetensors, GGUF) loads whole on every rank and is then cut here:
the same artifact serves any rank count, at the cost of reading all of it on each rank.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.distributed.tensor_parallel import TensorParallel


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """Refuse, with the reason, a model whose shapes do not split across `world_size` ranks."""
    problems = []
    if config.num_heads % world_size:
        problems.append(f"{config.num_heads} attention heads")
    kv = config.num_kv_heads
    if (kv % world_size) if kv >= world_size else (world_size % kv):
        problems.append(f"{kv} KV heads (a multiple of the rank count, or a divisor of it)")
    if config.intermediate_size % world_size:
        problems.append(f"an MLP of {config.intermediate_size}")
    if problems:
        raise ValueError(
            f"tensor_parallel_size {world_size} does not divide the model: "
            + ", ".join(problems)
        )


def local_kv_heads(config: ModelConfig, world_size: int) -> int:
    return max(1, config.num_kv_heads // world_size)


def shard_model(model: nn.Module, tp: TensorParallel) -> None:
    """In place: keep this rank's share of every weight (the rest is freed). A model already
    cut for `tp` (loaded from a per-rank artifact) is left as it is."""
    if tp.world_size == 1 or model.tp == tp:
        return
    config: ModelConfig = model.config
    check_divisible(config, tp.world_size)
    for layer in model.layers:
        _shard_attention(layer.self_attn, config, tp)
        _shard_mlp(layer.mlp, config, tp)
    _shard_vocabulary(model, config, tp)


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if linear.bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def _shard_attention(attn: nn.Module, config: ModelConfig, tp: TensorParallel) -> None:
    d = config.head_dim
    q_start, q_end = tp.split(config.num_heads)
    num_kv = local_kv_heads(config, tp.world_size)
    # The KV heads this rank's query heads use (one, replicated, when there are fewer than ranks).
    kv_start = q_start * config.num_kv_heads // config.num_heads
    q_rows = slice(q_start * d, q_end * d)
    k_rows = slice(attn.q_size + kv_start * d, attn.q_size + (kv_start + num_kv) * d)
    v_rows = slice(k_rows.start + attn.kv_size, k_rows.stop + attn.kv_size)

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat((t[q_rows], t[k_rows], t[v_rows]))

    _set(attn.qkv_proj, rows(attn.qkv_proj.weight), rows(attn.qkv_proj.bias))
    o_bias = attn.o_proj.bias
    _set(attn.o_proj, attn.o_proj.weight[:, q_rows],
         None if o_bias is None else (o_bias if tp.is_driver else torch.zeros_like(o_bias)))
    attn.num_heads, attn.num_kv_heads = q_end - q_start, num_kv
    attn.q_size, attn.kv_size = attn.num_heads * d, num_kv * d
    attn.tp = tp


def _shard_mlp(mlp: nn.Module, config: ModelConfig, tp: TensorParallel) -> None:
    size = config.intermediate_size
    start, end = tp.split(size)
    gate_up = mlp.gate_up_proj.weight
    _set(mlp.gate_up_proj, torch.cat((gate_up[start:end], gate_up[size + start : size + end])),
         None)
    _set(mlp.down_proj, mlp.down_proj.weight[:, start:end], None)
    mlp.tp = tp


def _shard_vocabulary(model: nn.Module, config: ModelConfig, tp: TensorParallel) -> None:
    rows_per_rank = -(-config.vocab_size // tp.world_size)
    start = tp.rank * rows_per_rank

    def rows(weight: torch.Tensor) -> torch.Tensor:
        local = weight[start : start + rows_per_rank]
        padding = weight.new_zeros(rows_per_rank - local.shape[0], weight.shape[1])
        return torch.cat((local, padding))

    embed = model.embed_tokens
    embed.weight = nn.Parameter(rows(embed.weight), requires_grad=False)
    embed.num_embeddings = rows_per_rank
    if model.lm_head is not None:
        _set(model.lm_head, rows(model.lm_head.weight), None)
    model.tp, model.vocab_start = tp, start
