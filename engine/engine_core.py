"""The engine core, as vLLM v1 splits it: schedule, run the model, sample, check stops.

Token ids in, token ids out: no text. Each step returns one `SeqOutput` per token of each sequence
that sampled (several where it kept a draft: engine/speculative.py), or one per sequence that
failed. A fault while processing one sequence (the forward of a batch that holds it, its sampling,
its stop checks) ends that request with an error and frees its blocks; the others go on with
unchanged tokens. Only a step in which every sequence fails, several times in a row, is
taken for a broken engine and raised (the caller then reports the engine dead).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.config import SpeculativeConfig
from engine.input_processor import EngineRequest
from engine.model_runner import ModelRunner, StepOutput
from engine.sampler import Sampler, SampleResult
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence
from engine.speculative import Speculator, Verdict

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILED_STEPS = 3


class EngineFaultError(RuntimeError):
    """Every sequence of several steps in a row failed: the engine itself is broken."""


@dataclass
class SeqOutput:
    """What one sequence did in one step."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int | None  # None when the sequence failed before sampling
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it
    error: str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    prompt_logprobs: list[dict | None] | None = None  # with the first token, when asked


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, sampler: Sampler,
                 eos_token_ids: tuple[int, ...], max_model_len: int,
                 speculative: SpeculativeConfig | None = None):
        self.scheduler, self.runner, self.sampler = scheduler, runner, sampler
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.speculator = Speculator(speculative, max_model_len) if speculative else None
        self._verdicts: dict[int, Verdict] = {}  # this step's scored drafts, by seq id
        self.seqs: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self.num_prompt_tokens_computed = 0
        self.num_generation_tokens = 0
        self.num_failed_steps_in_a_row = 0

    # -- requests -------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self.seqs:
            raise ValueError(f"request id {request.request_id!r} is already running")
        seqs: list[Sequence] = []
        for index in range(request.params.n):
            parent = seqs[0] if seqs else None
            seqs.append(Sequence(
                request.request_id, request.prompt_token_ids, request.params.for_sibling(index),
                index, request.arrival_time, parent,
            ))
        self.seqs[request.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def finish_request(self, request_id: str, reason: FinishReason) -> None:
        """End the request now (abort, a stop string, an error); its blocks are free at once."""
        for seq in self.seqs.pop(request_id, ()):
            self.scheduler.finish(seq, reason)
            self.sampler.release(seq.seq_id)

    def finish_seq(self, request_id: str, index: int, reason: FinishReason) -> None:
        """End one of the request's sequences (a stop string found in its text)."""
        seqs = self.seqs.get(request_id)
        if seqs is None:
            return
        self._finish(seqs[index], reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.release(seq.seq_id)
        seqs = self.seqs.get(seq.request_id, ())
        if seqs and all(s.is_finished for s in seqs):
            del self.seqs[seq.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.seqs)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[SeqOutput]:
        self._verdicts = {}
        if self.speculator is not None and self._has_room_for_drafts():
            self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        step_kind = None  # for the speculator's policy: drafted or plain (engine/speculative.py)
        if self.speculator is not None:
            self.speculator.drop_unscheduled(batch)
            step_kind = self.speculator.step_kind(batch)
        if batch.is_empty:
            return []
        started = time.perf_counter()
        self._count_prompt_tokens(batch)
        logits, sample_seqs, failed = self._execute(batch)
        results, failed_sampling = self._sample(logits, sample_seqs)
        failed.update(failed_sampling)
        outputs = self._failed_outputs(failed)
        for seq, result in zip(sample_seqs, results, strict=True):
            if seq.request_id in failed or result is None:
                continue
            try:
                outputs.extend(self._emit(seq, result))
            except Exception as e:  # noqa: BLE001 - one sequence's fault ends its request only
                outputs.extend(self._failed_outputs({seq.request_id: _describe(e)}))
                failed[seq.request_id] = _describe(e)
        self._count_failed_step(batch, failed)
        if step_kind is not None:
            num_tokens = sum(1 for o in outputs if o.token_id is not None)
            self.speculator.policy.record(step_kind, num_tokens, time.perf_counter() - started)
        return outputs

    def _has_room_for_drafts(self) -> bool:
        """Drafts take cache blocks for a step: never at the price of a preemption."""
        block_size = self.scheduler.block_manager.block_size
        num_tokens = self.speculator.config.num_speculative_tokens + 1
        num_needed = len(self.scheduler.running) * (num_tokens // block_size + 1)
        return self.scheduler.block_manager.num_free_blocks > num_needed

    def _emit(self, seq: Sequence, result: SampleResult) -> list[SeqOutput]:
        """The step's tokens for `seq`: its kept draft tokens if it had a draft (each counted
        as computed once emitted), then its next token."""
        verdict = self._verdicts.pop(seq.seq_id, None)
        if verdict is None:
            return [self._append_token(seq, result)]
        outputs = []
        for token_id in verdict.kept:
            outputs.append(self._append_token(seq, SampleResult(token_id)))
            if seq.is_finished:
                return outputs
            seq.num_computed_tokens += 1  # its KV is the one this step wrote
            self.scheduler.block_manager.cache_full_blocks(seq)
        if verdict.next_token is not None:  # the model parted from the draft there
            result = SampleResult(verdict.next_token)
        outputs.append(self._append_token(seq, result))
        return outputs

    def _count_prompt_tokens(self, batch: ScheduledBatch) -> None:
        now = time.monotonic()
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            self.num_prompt_tokens_computed += max(
                0, min(start + num_new, seq.num_prompt_tokens) - start
            )
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now

    def _execute(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor | None, list[Sequence], dict[str, str]]:
        """Run the batch; if it fails, run each sequence alone to find the ones at fault.

        A failed run leaves nothing behind: tokens count as computed only after a success, and
        rewriting the same cache slots is harmless.
        """
        try:
            step = self.runner.execute(batch)
        except Exception as e:  # noqa: BLE001 - isolated below
            logger.warning("a step of %d sequences failed (%s); retrying each alone",
                           len(batch.seqs), _describe(e))
            return self._execute_one_by_one(batch)
        self._after_step(batch, step)
        return step.logits, step.sample_seqs, {}

    def _after_step(self, batch: ScheduledBatch, step: StepOutput) -> None:
        if self.speculator is not None:
            self._verdicts.update(self.speculator.verify(batch, step.draft_choices))
        self.scheduler.update_after_step(batch)
        for seq, entries in step.prompt_logprobs:
            seq.prompt_logprobs.extend(entries)

    def _execute_one_by_one(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor | None, list[Sequence], dict[str, str]]:
        rows: list[torch.Tensor] = []
        sample_seqs: list[Sequence] = []
        failed: dict[str, str] = {}
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.request_id in failed:
                continue
            single = ScheduledBatch([seq], [num_new])
            try:
                step = self.runner.execute(single)
            except Exception as e:  # noqa: BLE001 - this sequence's fault
                failed[seq.request_id] = _describe(e)
                continue
            self._after_step(single, step)
            rows.extend(step.logits)
            sample_seqs.extend(step.sample_seqs)
        kept = [(r, s) for r, s in zip(rows, sample_seqs, strict=True)
                if s.request_id not in failed]
        logits = torch.stack([r for r, _ in kept]) if kept else None
        return logits, [s for _, s in kept], failed

    def _sample(
        self, logits: torch.Tensor | None, seqs: list[Sequence]
    ) -> tuple[list[SampleResult | None], dict[str, str]]:
        if not seqs:
            return [], {}
        try:
            return list(self.sampler(logits, seqs)), {}
        except Exception:  # noqa: BLE001 - isolated below, a row at a time
            results: list[SampleResult | None] = []
            failed: dict[str, str] = {}
            for row, seq in enumerate(seqs):
                try:
                    results.append(self.sampler(logits[row : row + 1], [seq])[0])
                except Exception as e:  # noqa: BLE001 - this sequence's fault
                    results.append(None)
                    failed[seq.request_id] = _describe(e)
            return results, failed

    def _append_token(self, seq: Sequence, result: SampleResult) -> SeqOutput:
        seq.append_token(result.token_id)
        self.num_generation_tokens += 1
        reason = self.check_stop(seq, result.token_id)
        output = SeqOutput(
            seq.request_id, seq.index, result.token_id, result.logprob, result.top_logprobs,
            reason, seq.stop_reason, num_cached_tokens=seq.num_cached_tokens,
            first_scheduled_time=seq.first_scheduled_time,
            prompt_logprobs=seq.prompt_logprobs if seq.num_output_tokens == 1 else None,
        )
        if reason is not None:
            self._finish(seq, reason)
        return output

    def check_stop(self, seq: Sequence, token_id: int) -> FinishReason | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
            if token_id in p.stop_token_ids:
                seq.stop_reason = token_id
                return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _failed_outputs(self, failed: dict[str, str]) -> list[SeqOutput]:
        outputs = []
        for request_id, error in failed.items():
            seqs = self.seqs.get(request_id, ())
            logger.error("request %s failed in the engine: %s", request_id, error)
            outputs.extend(SeqOutput(request_id, s.index, None, finish_reason=FinishReason.ERROR,
                                     error=error) for s in seqs)
            self.finish_request(request_id, FinishReason.ERROR)
        return outputs

    def _count_failed_step(self, batch: ScheduledBatch, failed: dict[str, str]) -> None:
        request_ids = {seq.request_id for seq in batch.seqs}
        if failed and request_ids <= failed.keys():
            self.num_failed_steps_in_a_row += 1
            if self.num_failed_steps_in_a_row >= MAX_CONSECUTIVE_FAILED_STEPS:
                raise EngineFaultError(
                    f"{self.num_failed_steps_in_a_row} steps in a row failed for every "
                    f"request; last error: {next(iter(failed.values()))}"
                )
        else:
            self.num_failed_steps_in_a_row = 0


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
