"""The one-sequence decode step, compiled by Inductor in the background and swapped in once built.

At one sequence a CPU decode step is a chain of matrix-vector products, bound by reading the
weights. Inductor with frozen weights lays them out for its own AVX-512/AVX2 GEMV micro-kernels and
fuses the norms and activations between them: 1.4x the eager step with oneDNN-packed weights on
this project's machines (`bench/decode_step.py`); at 8 sequences and more it gains nothing, so
only the one-sequence step is compiled.

Shapes are static: one token, a block table padded with -1 to the longest context. The attention
is two custom ops (`llm::store_kv`, `llm::decode_attention`) that the compiler keeps opaque: inside
them the torch reference runs on the table trimmed to the real context. Building takes ~50 s of
CPU on 2 cores and needs a C++ compiler; it runs on its own thread while the eager step serves,
and if it fails the eager step simply goes on (one log line says why).
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import NamedTuple

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kernels import cpu_ops, reference
from engine.layers.attention import AttentionMetadata
from engine.layers.rotary import RotaryEmbedding
from engine.models import ForwardContext

logger = logging.getLogger(__name__)


# Inside the ops: the C++ kernels once loaded (cpu_ops.load(), started by the engine when the
# "cpu" backend is chosen), the references until then.
@torch.library.custom_op("llm::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if cpu_ops.is_loaded():
        torch.ops.llm_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv_reference(key, value, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("llm::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    if cpu_ops.is_loaded():  # reads only the context's blocks: the padding is never touched
        return torch.ops.llm_cpu.paged_decode_attention(
            query, k_cache, v_cache, block_tables, context_lens, scale)
    # The table is padded to the longest context (static shapes); attend over the real one.
    num_blocks = -(-int(context_lens.max()) // k_cache.shape[1])
    return reference.paged_decode_attention_reference(
        query, k_cache, v_cache, block_tables[:, :num_blocks], context_lens, scale)


@decode_attention.register_fake
def _(query, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(query)


class OpaqueDecodeBackend:
    """The attention backend seen by the compiler: decode only, through the custom ops."""

    name = "compiled"

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        store_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, context_lens, scale):
        return decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)

    def prefill(self, *args, **kwargs):
        raise NotImplementedError("the compiled step decodes only")


class DecodeInputs(NamedTuple):
    input_ids: torch.Tensor  # [1]
    positions: torch.Tensor  # [1]
    slot_mapping: torch.Tensor  # [1]
    block_table: torch.Tensor  # [1, max_blocks], padded with -1
    context_lens: torch.Tensor  # [1]


class CompiledDecodeStep:
    def __init__(self, model: nn.Module, model_config: ModelConfig, rotary: RotaryEmbedding,
                 kv_cache: torch.Tensor, max_blocks: int):
        # The compiler freezes plain nn.Linear weights into its own layout: it gets a copy made
        # before the eager model's linears are packed for oneDNN.
        self.model = copy.deepcopy(model)
        self.model_config, self.rotary = model_config, rotary
        self.kv_cache, self.max_blocks = kv_cache, max_blocks
        self.backend = OpaqueDecodeBackend()
        self.compiled = None
        self.is_ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._build, name="compile-decode", daemon=True).start()

    def _build(self) -> None:
        try:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            compiled = torch.compile(self._step, mode="max-autotune", fullgraph=True,
                                     dynamic=False)
            with torch.inference_mode():
                compiled(self.kv_cache, *self._warmup_inputs())
            self.compiled = compiled
            self.is_ready.set()
            logger.info("compiled one-sequence decode step ready")
        except Exception as e:  # noqa: BLE001 - the eager step goes on serving
            logger.warning("no compiled decode step (%s: %s); decoding eagerly",
                           type(e).__name__, e)

    def _warmup_inputs(self) -> DecodeInputs:
        """Writes nothing to the cache (slot -1) and attends to one position of block 0: a real
        block, as the C++ kernel refuses a context that reads padding."""
        def ints(*values: int, dtype=torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype)

        block_table = torch.full((1, self.max_blocks), -1, dtype=torch.int32)
        block_table[0, 0] = 0
        return DecodeInputs(ints(0), ints(0), ints(-1), block_table, ints(1, dtype=torch.int32))

    def _step(self, kv_cache: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
              slot_mapping: torch.Tensor, block_table: torch.Tensor,
              context_lens: torch.Tensor) -> torch.Tensor:
        # The KV cache comes in as an argument: a tensor the graph closed over would be frozen
        # into it as a constant, like the weights.
        cos, sin = self.rotary.lookup(positions)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, num_decode_tokens=1, decode_block_tables=block_table,
            decode_context_lens=context_lens, prefill_cu_seqlens_q=context_lens[:0],
            prefill_context_lens=context_lens[:0], prefill_block_tables=block_table[:0],
        )
        kv_caches = [(layer[0], layer[1]) for layer in kv_cache]
        ctx = ForwardContext(cos, sin, meta, kv_caches, self.backend)
        return self.model.compute_logits(self.model(input_ids, ctx))

    @torch.inference_mode()
    def __call__(self, inputs: DecodeInputs) -> torch.Tensor:
        """fp32 logits [1, vocab]."""
        return self.compiled(self.kv_cache, *inputs).float()
