"""Continuous batching against a token budget, with chunked prefill and preemption by recompute.

Pure Python. Each step: running sequences first (a decode token each, or the next prefill chunk),
preempting the newest running sequence when blocks run out; then, if nothing was preempted,
waiting sequences in arrival order while the budget, `max_num_seqs` and the free blocks allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each seq computes this step

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is last
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        is_preempted = self._schedule_running(batch, budget)
        if not is_preempted:
            self._schedule_waiting(batch, budget - batch.num_tokens)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        is_preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                is_preempted = True
                if victim is seq:
                    return is_preempted
            self.block_manager.allocate(seq, num_new)
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        return is_preempted

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            shared_block_ids = self._shared_blocks(seq)
            if shared_block_ids is None:
                break  # its fork parent's prompt is still being computed
            num_shared_tokens = len(shared_block_ids) * self.block_manager.block_size
            num_new = min(seq.num_uncomputed_tokens - num_shared_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new, shared_block_ids):
                break
            self.block_manager.allocate(seq, num_new, shared_block_ids)
            if seq.num_preemptions == 0 and seq.first_scheduled_time is None:
                seq.num_cached_tokens = num_shared_tokens
            seq.fork_parent = None
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def _shared_blocks(self, seq: Sequence) -> list[int] | None:
        """Blocks `seq` can reuse: its fork parent's full prompt blocks, else a prefix-cache hit."""
        parent = seq.fork_parent
        if parent is not None and not parent.is_finished:
            if not parent.is_prompt_computed:
                return None
            num_full = (seq.num_prompt_tokens - 1) // self.block_manager.block_size
            return list(parent.block_table[:num_full])
        return self.block_manager.lookup_prefix(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update_after_step(self, batch: ScheduledBatch) -> None:
        """Count the step's tokens as computed and offer the now-full blocks to the prefix cache."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` now, wherever it is, and free its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
