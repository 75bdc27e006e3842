"""Runs one scheduled step on the device: flat token batch in, logits of the sampling rows out.

It owns the model, the paged KV cache (one preallocated tensor), the rotary table and the
attention backend. Tokens are laid out decodes first, then prefill chunks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.block_manager import cdiv
from engine.compiled_decode import CompiledDecodeStep, DecodeInputs
from engine.config import CacheConfig, ModelConfig
from engine.distributed.tensor_parallel import SINGLE, TensorParallel
from engine.kv_cache import allocate_kv_cache
from engine.layers.attention import AttentionBackend, AttentionMetadata
from engine.layers.calibration import SmallBatchCalibration
from engine.layers.greedy_head import GreedyHead, build_greedy_head
from engine.layers.linear import (
    can_pack,
    max_small_batch_rows,
    pack_and_move,
    pack_linears,
)
from engine.layers.lossless import LOSSLESS_MAX_ROWS
from engine.layers.rotary import RotaryEmbedding
from engine.models import ForwardContext
from engine.models.decoder_stack import build_decoder_stack
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.weights.huge_pages import populate

logger = logging.getLogger(__name__)

KV_PREFAULT_BYTES = 16 << 20  # faulted in per idle call: a request that comes waits at most this


@dataclass
class StepOutput:
    # fp32 [num_sampling, vocab]: one row per sampling sequence. In a step whose rows all need
    # only their argmax, -inf but where a token may be the argmax (engine/layers/greedy_head.py).
    logits: torch.Tensor
    sample_seqs: list[Sequence]
    # New prompt logprobs of the sequences that asked (entries as the sampler's logprobs).
    prompt_logprobs: list[tuple[Sequence, list[dict]]]
    # Seq id -> the model's greedy token at each of its draft's positions (engine/speculative.py)
    draft_choices: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class StepInputs:
    """What every rank needs to run a step's forward: the driver prepares it, and with tensor
    parallelism broadcasts it (the workers never see sequences)."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    # [num_sampling + num_draft] rows whose logits are taken: one per sampling sequence, then
    # the rows that score draft tokens
    sample_indices: torch.Tensor
    prompt_row_ranges: list[tuple[int, int]]  # (first row, rows) scored for prompt logprobs
    # Every sampling row needs only its argmax (SamplingParams.needs_only_argmax), no row a draft
    is_argmax_only: bool = False


@dataclass
class _PromptRows:
    """Rows of the flat batch whose next token is a prompt token a sequence wants scored."""

    seq: Sequence
    first_row: int
    first_position: int
    num_rows: int


class ModelRunner:
    def __init__(
        self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
        max_model_len: int, device: torch.device, dtype: torch.dtype, backend: AttentionBackend,
        compile_decode: bool = False, tp: TensorParallel = SINGLE, quantization: str | None = None,
        kv_cache: torch.Tensor | None = None,
    ):
        """`model_config`: this rank's share of the model (its heads) when sharded. `kv_cache`:
        the cache, if allocated already (`allocate_kv_cache`; a CPU load makes it early)."""
        self.model, self.config, self.device, self.backend = model, model_config, device, backend
        self.dtype = dtype
        self.tp = tp
        self.block_size = cache_config.block_size
        self.max_blocks = cdiv(max_model_len, self.block_size)
        if kv_cache is None:
            kv_cache = allocate_kv_cache(model_config, cache_config.num_blocks, self.block_size,
                                         dtype, device)
        self.kv_cache = kv_cache  # [layers, k|v, blocks, block_size, kv_heads, head_dim]
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.rotary = RotaryEmbedding(model_config, max_model_len, device)
        self.compiled_decode: CompiledDecodeStep | None = None
        if compile_decode and device.type == "cpu":
            # Copies the plain weights: before the packing below.
            self.compiled_decode = CompiledDecodeStep(model, model_config, self.rotary,
                                                      self.kv_cache, self.max_blocks)
            self.compiled_decode.start()
        # oneDNN's packing and the move into huge pages, if any
        self.weight_mover: threading.Thread | None = None
        self.is_mover_started = False
        self.has_executed = False  # the mover starts with the second step
        self.decoder_stack: Any = None  # built once the move is done (_decoder_stack)
        self.lossless_stack: Any = None  # the same on 4-bit copies of fp32 weights, if any
        self.max_stack_rows = max_small_batch_rows(quantization)
        self.may_build_stack = True
        self.greedy_head: GreedyHead | None = None  # built once the move is done (_greedy_head)
        self.may_build_greedy_head = True
        self.calibration: SmallBatchCalibration | None = None
        # How much of the KV cache idle time has faulted in (prefault_kv_cache); None: not to.
        self.kv_prefaulted: int | None = 0 if device.type == "cpu" else None
        if can_pack(device, dtype):
            logger.info("CPU linears for oneDNN%s: %d",
                        f", {quantization} weights" if quantization else "",
                        pack_linears(model, quantization))
            # Off the path to the first token: the plain weights serve meanwhile, and it starts
            # only at the second step or when the engine is idle (start_weight_mover). Not a
            # daemon: the interpreter waits for it at exit, as a daemon thread still inside a
            # tensor copy when it finalizes aborts the process ("terminate called without an
            # active exception"; an offline script that exits without `shutdown()`).
            self.weight_mover = threading.Thread(target=self._move_weights, name="pack-weights")
        elif quantization:
            raise ValueError(f"{quantization} weights are for the CPU's packed linears: fp32, or "
                             "bf16 on a CPU with native bf16")
        logger.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB",
            cache_config.num_blocks, self.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 2**20,
        )

    def _move_weights(self) -> None:
        """The weight mover's work: oneDNN's packing and the move into huge pages, then the
        greedy head over the moved head (quantizing a 49,152-row head took ~0.5 s, which the
        first greedy step after the move had paid)."""
        pack_and_move(self.model)
        self.greedy_head = build_greedy_head(self.model, self.tp.world_size)
        self.may_build_greedy_head = False

    def start_weight_mover(self) -> None:
        """Begin oneDNN's packing and the move into huge pages (once). Not at load: they take
        ~2 s of both cores, and a cold start's first request, arriving as the engine turns
        ready, shared the cores with them (its first token 0.4-0.5 s later)."""
        if self.weight_mover is not None and not self.is_mover_started:
            self.is_mover_started = True
            self.weight_mover.start()

    def calibrate_small_batch_rows(self) -> bool:
        """Once the weights are packed and moved (never while they are), one step of timing the
        small-batch kernels against oneDNN at more rows (engine/layers/calibration.py); when the
        last is done, the kernels and the C++ decoder stack take steps of as many rows as they
        won at. True once there is nothing left to time. Not across tensor-parallel ranks, which
        would each choose."""
        if self.weight_mover is None or self.tp.world_size > 1:
            return True
        if not self._are_weights_in_place():
            return False
        if self.calibration is None:
            self.calibration = SmallBatchCalibration(self.model, self.dtype)
        rows = self.calibration.step()  # a failure there is logged, never raised
        if rows is not None and rows > self.max_stack_rows:
            logger.info("the small-batch kernels take up to %d rows on this machine", rows)
            self.max_stack_rows = rows
        return self.calibration.is_done

    def prefault_kv_cache(self) -> bool:
        """When idle, once the weights are in place: the next KV_PREFAULT_BYTES of the cache
        faulted in (~35 ms here). The cache is mapped but untouched at start (a cold start
        pays nothing for it), and the block manager hands out never-used blocks before cached
        ones, so for the first few loads after a start every new block was a first write:
        ~1.7 ms a block of SmolLM2 (30 layers' keys and values), 0.4 s of a 32-prompt prefill.
        True while some of the cache remains."""
        if self.kv_prefaulted is None or not self._are_weights_in_place():
            return False
        total = self.kv_cache.numel() * self.kv_cache.element_size()
        num_bytes = min(KV_PREFAULT_BYTES, total - self.kv_prefaulted)
        if num_bytes <= 0 or not populate(self.kv_cache, self.kv_prefaulted, num_bytes):
            self.kv_prefaulted = None  # done, or the OS cannot
            return False
        self.kv_prefaulted += num_bytes
        return True

    def _are_weights_in_place(self) -> bool:
        """Whether oneDNN's packing and the move into huge pages are done (never started: no)."""
        return self.is_mover_started and not self.weight_mover.is_alive()

    def wait_for_weight_mover(self, start: bool = True) -> None:
        """Packing and moving take about a second; `start=False`: only one already started."""
        if start:
            self.start_weight_mover()
        if self.weight_mover is not None and self.is_mover_started:
            self.weight_mover.join()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run the step: the logits of the sequences that sample (those whose last token this
        step computes) and the prompt logprobs asked for."""
        if self.has_executed:  # the first step's tokens are out: the cores are shared now
            self.start_weight_mover()
        self.has_executed = True
        compiled = self._compiled_decode(batch)
        if compiled is not None:
            return compiled
        inputs, sample_seqs, prompt_rows, draft_seqs = self._prepare(batch)
        self.tp.broadcast(inputs)  # to the other ranks' worker loops (no-op on one rank)
        logits, prompt_logits = self.forward(inputs)
        prompt_logprobs = [(r.seq, self._prompt_logprobs(rows_logits, r))
                           for r, rows_logits in zip(prompt_rows, prompt_logits, strict=True)]
        num_sampling = len(sample_seqs)
        return StepOutput(logits[:num_sampling].float(), sample_seqs, prompt_logprobs,
                          self._draft_choices(logits[num_sampling:], draft_seqs))

    @staticmethod
    def _draft_choices(logits: torch.Tensor, draft_seqs: list[Sequence]) -> dict[int, list[int]]:
        """Each drafting sequence's greedy token at its draft's positions (rows in order)."""
        if not draft_seqs:
            return {}
        choices = logits.argmax(dim=-1).tolist()
        result, row = {}, 0
        for seq in draft_seqs:
            result[seq.seq_id] = choices[row : row + seq.num_draft_tokens]
            row += seq.num_draft_tokens
        return result

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits of the sampling rows [num_sampling, vocab] and of each prompt-logprob
        range. Every rank runs it on the same inputs: the collectives inside pair up."""
        cos, sin = self.rotary.lookup(inputs.positions)
        ctx = ForwardContext(cos, sin, inputs.meta, self.kv_caches, self.backend,
                             self._decoder_stack(inputs))
        hidden = self.model(inputs.input_ids, ctx)
        prompt_logits = [self.model.compute_logits(hidden[first : first + num_rows])
                         for first, num_rows in inputs.prompt_row_ranges]
        if inputs.sample_indices.numel() == 0:
            empty = hidden.new_empty(0, self.config.vocab_size, dtype=torch.float32)
            return empty, prompt_logits
        hidden = hidden[inputs.sample_indices]
        head = self._greedy_head() if inputs.is_argmax_only else None
        if head is not None and head.serves(hidden.shape[0]):
            return head.logits(hidden, self.model.lm_head.weight), prompt_logits
        return self.model.compute_logits(hidden), prompt_logits

    def _greedy_head(self) -> GreedyHead | None:
        """The argmax-only head (fp32 heads on the CPU), built by the weight mover once the
        weights are in their final place (here only if the mover failed); None where it cannot
        serve."""
        if self.may_build_greedy_head and self._are_weights_in_place():
            self.may_build_greedy_head = False
            self.greedy_head = build_greedy_head(self.model, self.tp.world_size)
        return self.greedy_head

    def _decoder_stack(self, inputs: StepInputs) -> Any | None:
        """The C++ decoder stack, for a step of sequences decoding, few enough for the C++
        small-batch kernels (`max_small_batch_rows`). Built at the first such step once the
        weights are in their final place (the move into huge pages swaps them) and the kernels
        are loaded (both happen in the background)."""
        num_tokens = inputs.input_ids.shape[0]
        if (num_tokens > self.max_stack_rows or inputs.meta.num_decode_tokens != num_tokens
                or self.backend.name != "cpu" or self.weight_mover is None):
            return None
        if self.may_build_stack and self._are_weights_in_place():
            self.may_build_stack = False  # once: None means it cannot serve this model
            self.decoder_stack = build_decoder_stack(self.model, self.kv_caches, self.dtype)
            self.lossless_stack = build_decoder_stack(self.model, self.kv_caches, self.dtype,
                                                      lossless=True)
        if num_tokens <= LOSSLESS_MAX_ROWS and self.lossless_stack is not None:
            return self.lossless_stack
        return self.decoder_stack

    def _compiled_decode(self, batch: ScheduledBatch) -> StepOutput | None:
        """The step through the compiled graph, when it is built and the step is one sequence
        decoding one token; None otherwise."""
        step = self.compiled_decode
        if step is None or not step.is_ready.is_set() or len(batch.seqs) != 1:
            return None
        seq, num_new = batch.seqs[0], batch.num_new_tokens[0]
        position = seq.num_computed_tokens
        if num_new != 1 or position + 1 != seq.num_tokens or seq.prompt_logprobs is not None:
            return None
        bs = self.block_size
        table = seq.block_table[: cdiv(position + 1, bs)]
        inputs = DecodeInputs(
            self._tensor([seq.token_ids[position]], torch.int64),
            self._tensor([position], torch.int64),
            self._tensor([table[position // bs] * bs + position % bs], torch.int64),
            self._tensor([table + [-1] * (self.max_blocks - len(table))], torch.int32),
            self._tensor([position + 1], torch.int32),
        )
        return StepOutput(step(inputs), [seq], [])

    def _prompt_logprobs(self, logits: torch.Tensor, rows: _PromptRows) -> list[dict]:
        """Each row's logprob of the prompt token after it, and the top ones when asked."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        start = rows.first_position + 1
        target_ids = rows.seq.token_ids[start : start + rows.num_rows]
        chosen = logprobs.gather(1, self._tensor(target_ids, torch.int64)[:, None])[:, 0].tolist()
        num_top = rows.seq.params.prompt_logprobs
        tops: list[dict[int, float]] = [{} for _ in target_ids]
        if num_top:
            values, ids = logprobs.topk(num_top, dim=-1)
            tops = [dict(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(),
                                                                   strict=True)]
        return [{"token_id": t, "logprob": lp, "top_logprobs": top}
                for t, lp, top in zip(target_ids, chosen, tops, strict=True)]

    def _prepare(self, batch: ScheduledBatch):
        pairs = list(zip(batch.seqs, batch.num_new_tokens, strict=True))
        # A drafted sequence's 1 + k tokens run as k + 1 decode rows over its own blocks, each
        # attending up to its position (the step stores every row's KV before any attends): the
        # decode kernels and the C++ decoder stack serve them, as they serve one-token steps.
        decodes = [(s, n) for s, n in pairs if n == 1 + s.num_draft_tokens]
        prefills = [(s, n) for s, n in pairs if n != 1 + s.num_draft_tokens]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[_PromptRows] = []
        draft_indices: list[int] = []
        draft_seqs: list[Sequence] = []
        for seq, num_new in decodes + prefills:
            start = seq.num_computed_tokens
            end = start + num_new
            if seq.prompt_logprobs is not None:
                # Positions already scored (a recompute after preemption) are skipped.
                first = max(start, len(seq.prompt_logprobs) - 1)
                num_rows = min(end, seq.num_prompt_tokens - 1) - first
                if num_rows > 0:
                    prompt_rows.append(
                        _PromptRows(seq, len(input_ids) + first - start, first, num_rows))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table, bs = seq.block_table, self.block_size
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if end == seq.num_tokens:
                sample_indices.append(len(input_ids) - 1)
                sample_seqs.append(seq)
                if seq.num_draft_tokens:  # the rows before the last score the draft's tokens
                    last = len(input_ids) - 1
                    draft_indices.extend(range(last - seq.num_draft_tokens, last))
                    draft_seqs.append(seq)
        q_lens = [n for _, n in prefills]
        context_lens = [s.num_computed_tokens + n for s, n in prefills]
        decode_context_lens = [s.num_computed_tokens + 1 + i for s, n in decodes for i in range(n)]
        decode_row_seqs = [s for s, n in decodes for _ in range(n)]
        cu_seqlens = [0]
        for n in q_lens:
            cu_seqlens.append(cu_seqlens[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            num_decode_tokens=len(decode_row_seqs),
            decode_block_tables=self._block_tables(decode_row_seqs, decode_context_lens),
            decode_context_lens=self._tensor(decode_context_lens, torch.int32),
            prefill_cu_seqlens_q=self._tensor(cu_seqlens, torch.int32),
            prefill_context_lens=self._tensor(context_lens, torch.int32),
            prefill_block_tables=self._block_tables([s for s, _ in prefills], context_lens),
            max_prefill_q_len=max(q_lens, default=0),
        )
        inputs = StepInputs(
            self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
            self._tensor(sample_indices + draft_indices, torch.int64),
            [(r.first_row, r.num_rows) for r in prompt_rows],
            not draft_seqs and all(s.params.needs_only_argmax for s in sample_seqs),
        )
        return inputs, sample_seqs, prompt_rows, draft_seqs

    def _block_tables(self, seqs: list[Sequence], context_lens: list[int]) -> torch.Tensor:
        """[num_seqs, max_blocks] of the blocks covering each context, padded with -1."""
        num_blocks = [cdiv(n, self.block_size) for n in context_lens]
        width = max(num_blocks, default=0)
        rows = [
            s.block_table[:n] + [-1] * (width - n)
            for s, n in zip(seqs, num_blocks, strict=True)
        ]
        if not rows:
            return torch.empty(0, 0, dtype=torch.int32, device=self.device)
        return self._tensor(rows, torch.int32)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
