"""Speculative decoding by prompt lookup (vLLM's "ngram" method), the bookkeeping around a step.

Pure Python. Before the step, a greedy sequence that decodes gets a draft: the tokens that
followed the latest earlier occurrence of its last few tokens (`propose_ngram`), appended to its
tokens so that the scheduler schedules them with its own (1 + k tokens, which the model runner
runs as 1 + k decode rows). The step returns the model's greedy choice at each draft position;
the longest agreeing prefix of the draft is kept, then the model's own next token: the tokens the
sequence would have chosen one step at a time. A step that streams every weight once (a few
sequences on the CPU) then yields several tokens wherever the text repeats itself.

A draft leaves no trace: the scheduler counts only the sequence's own token as computed, and the
engine counts each kept draft token as it emits it (its KV is the one this step wrote), so no
block holding a rejected draft is ever offered to the prefix cache; the cache slots of rejected
drafts are written again before anything reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import SpeculativeConfig
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


def propose_ngram(token_ids: list[int], max_draft: int, min_n: int, max_n: int) -> list[int]:
    """Up to `max_draft` tokens that followed the latest earlier occurrence of the longest
    suffix of `token_ids` of `max_n` down to `min_n` tokens; [] where none recurs."""
    if max_draft <= 0:
        return []
    num_tokens = len(token_ids)
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        suffix = token_ids[num_tokens - n :]
        first = suffix[0]
        # Latest match first: the text nearest the end is the likeliest to repeat next.
        for start in range(num_tokens - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start : start + n] == suffix:
                return token_ids[start + n : start + n + max_draft]
    return []


@dataclass
class Verdict:
    """A scored draft: the tokens to emit, the kept draft tokens then the model's next one
    (None: the next one is the sampler's, from the step's last row)."""

    kept: list[int]
    next_token: int | None


@dataclass
class DraftPolicy:
    """Whether drafting pays, here: a drafted step is dearer than a plain one (1 + k rows through
    the model instead of one), so it pays only where enough of its drafts are kept, which depends
    on the text, the weights' type and the machine (on Zen 3 at one sequence, when drafted steps
    still ran as chunked prefills: fp32 36 -> 55 tok/s, int4 95 -> 73). The engine reports
    the tokens each decode step yielded and its time; drafting goes on while drafted steps yield
    more tokens a second than plain ones, and every `explore_every` steps the other kind runs
    once, so that both figures stay current."""

    smoothing: float = 0.25  # weight of the newest step in each moving average
    explore_every: int = 16
    plain_tok_s: float | None = None
    drafted_tok_s: float | None = None
    num_decisions: int = 0

    def should_draft(self) -> bool:
        if self.plain_tok_s is None:
            return False  # a plain step measured first
        if self.drafted_tok_s is None:
            return True  # then a drafted one
        self.num_decisions += 1
        is_exploring = self.num_decisions % self.explore_every == 0
        return (self.drafted_tok_s > self.plain_tok_s) != is_exploring

    def record(self, is_drafted: bool, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        tok_s = num_tokens / seconds
        old = self.drafted_tok_s if is_drafted else self.plain_tok_s
        new = tok_s if old is None else old + self.smoothing * (tok_s - old)
        if is_drafted:
            self.drafted_tok_s = new
        else:
            self.plain_tok_s = new


@dataclass
class Speculator:
    config: SpeculativeConfig
    max_model_len: int
    num_draft_tokens: int = 0  # counters, for the engine's stats
    num_accepted_tokens: int = 0
    policy: DraftPolicy = field(default_factory=DraftPolicy)
    _drafted: list[Sequence] = field(default_factory=list)

    def propose(self, running: list[Sequence]) -> None:
        """Append a draft to each running sequence that can take one, if drafting pays."""
        if len(running) > self.config.max_num_seqs or not self.policy.should_draft():
            return
        c = self.config
        for seq in running:
            if not self._can_speculate(seq):
                continue
            p = seq.params
            # Room for the draft and the token after it, within max_tokens and the context.
            room = min(c.num_speculative_tokens, p.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - seq.num_tokens - 1)
            draft = propose_ngram(seq.token_ids, room, c.prompt_lookup_min, c.prompt_lookup_max)
            if draft:
                seq.token_ids.extend(draft)
                seq.num_draft_tokens = len(draft)
                self._drafted.append(seq)

    @staticmethod
    def _can_speculate(seq: Sequence) -> bool:
        """A greedy sequence decoding, whose next token is the plain argmax of the logits."""
        p = seq.params
        return (seq.num_uncomputed_tokens == 1 and seq.is_prompt_computed and p.is_greedy
                and p.logprobs is None and not p.logit_bias and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty
                and seq.num_output_tokens >= p.min_tokens)

    def drop_unscheduled(self, batch: ScheduledBatch) -> None:
        """Take back the drafts the step does not score whole (a budget cut, a preemption)."""
        if not self._drafted:  # the common step: nothing to look up
            return
        num_new = {seq.seq_id: (i, n) for i, (seq, n) in
                   enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True))}
        for seq in self._drafted:
            i, n = num_new.get(seq.seq_id, (None, 0))
            if n == seq.num_uncomputed_tokens and not seq.is_finished:
                continue
            self._take_back(seq)
            if i is not None:
                batch.num_new_tokens[i] = min(n, seq.num_uncomputed_tokens)
        self._drafted = [s for s in self._drafted if s.num_draft_tokens]

    def verify(self, batch: ScheduledBatch, choices: dict[int, list[int]]) -> dict[int, Verdict]:
        """Score the drafts against the model's choices (seq id -> its greedy token at each draft
        position) and take every draft back: the batch then counts one token computed for each
        sequence, the kept ones are emitted (and counted) by the engine. Seq id -> verdict."""
        verdicts = {}
        for i, seq in enumerate(batch.seqs):
            num_draft = seq.num_draft_tokens
            if not num_draft:
                continue
            draft = self._take_back(seq)
            chosen = choices.get(seq.seq_id)
            batch.num_new_tokens[i] = 1
            if chosen is None:  # not scored (the step ran without this sequence's rows)
                continue
            num_kept = 0
            while num_kept < num_draft and chosen[num_kept] == draft[num_kept]:
                num_kept += 1
            self.num_draft_tokens += num_draft
            self.num_accepted_tokens += num_kept
            next_token = chosen[num_kept] if num_kept < num_draft else None
            verdicts[seq.seq_id] = Verdict(draft[:num_kept], next_token)
        self._drafted = []
        return verdicts

    def step_kind(self, batch: ScheduledBatch) -> bool | None:
        """For the policy, before the step runs: True for a drafted step, False for a plain one;
        None for a step it does not learn from (a prefill in the batch, too many sequences)."""
        if not batch.seqs or len(batch.seqs) > self.config.max_num_seqs:
            return None
        if any(n != 1 + seq.num_draft_tokens for seq, n in
               zip(batch.seqs, batch.num_new_tokens, strict=True)):
            return None
        return any(seq.num_draft_tokens for seq in batch.seqs)

    def _take_back(self, seq: Sequence) -> list[int]:
        first = len(seq.token_ids) - seq.num_draft_tokens
        draft = seq.token_ids[first:]
        del seq.token_ids[first:]
        seq.num_draft_tokens = 0
        return draft
