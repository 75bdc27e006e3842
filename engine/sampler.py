"""Per-request sampling over a batch of logits: logit bias, penalties, temperature, top-k/p,
min-p, seeds.

A seeded request draws from its own generator, so its tokens do not depend on the rest of the
batch. Log-probabilities are those of the model's raw distribution, as vLLM returns by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import cpu_ops
from engine.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = eos_token_ids
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        if not seqs:
            return []
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            self._apply_logit_bias(logits[row], seq)
            self._apply_penalties(logits[row], seq)
            self._apply_min_tokens(logits[row], seq)
        token_ids = self._choose(logits, seqs)
        return [
            self._result(token_ids[row], raw_logprobs, row, seq) for row, seq in enumerate(seqs)
        ]

    def _apply_logit_bias(self, logits: torch.Tensor, seq: Sequence) -> None:
        bias = seq.params.logit_bias  # ids checked against the vocabulary at the edge
        if bias:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype,
                                        device=logits.device)

    def _apply_penalties(self, logits: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            output_ids = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(output_ids, minlength=logits.shape[0]).to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _apply_min_tokens(self, logits: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
            if banned:
                logits[banned] = float("-inf")

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        token_ids = cpu_ops.argmax_rows(logits).tolist()
        for row, seq in enumerate(seqs):
            if not seq.params.is_greedy:
                probs = self._probs(logits[row], seq)
                # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one draw per row.
                generator = self._generator(seq, probs.device)
                noise = torch.empty_like(probs).exponential_(generator=generator)
                token_ids[row] = int((probs / noise).argmax())
        return token_ids

    def _probs(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        p = seq.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            is_outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(is_outside, 0.0))
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        generator = self.generators.get(seq.seq_id)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(seq.params.seed)
            self.generators[seq.seq_id] = generator
        return generator

    def _result(
        self, token_id: int, raw_logprobs: torch.Tensor | None, row: int, seq: Sequence
    ) -> SampleResult:
        num_top = seq.params.logprobs
        if raw_logprobs is None or num_top is None:
            return SampleResult(token_id)
        row_logprobs = raw_logprobs[row]
        top = {}
        if num_top:
            values, ids = row_logprobs.topk(num_top)
            top = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return SampleResult(token_id, float(row_logprobs[token_id]), top)
