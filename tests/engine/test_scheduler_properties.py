"""Random add / step / abort sequences against the scheduler and block manager (no model): the
bookkeeping invariants hold after every step, and at the end every block is free."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence

BLOCK_SIZE = 4
VOCAB = 5  # a tiny vocabulary makes shared prefixes (cache hits) common

actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
            st.integers(1, 8),  # max_tokens
            st.integers(1, 3),  # n
        ),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    max_size=60,
)


def _simulate_step(scheduler: Scheduler, rng_token: int) -> None:
    """What the engine does after the model ran: sample for finished chunks, stop at max_tokens."""
    batch = scheduler.schedule()
    scheduler.update_after_step(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token((rng_token + seq.seq_id) % VOCAB)
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, FinishReason.LENGTH)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=actions,
    num_blocks=st.integers(8, 24),
    budget=st.integers(1, 16),
    max_num_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
)
def test_invariants_hold_under_random_traffic(
    actions, num_blocks, budget, max_num_seqs, prefix_caching
):
    bm = BlockManager(num_blocks, BLOCK_SIZE, prefix_caching)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, 64), bm)
    requests: list[list[Sequence]] = []
    for step_no, action in enumerate(actions):
        if action[0] == "add":
            _, prompt, max_tokens, n = action
            if -(-(len(prompt) + max_tokens) // BLOCK_SIZE) > num_blocks:
                continue  # the engine refuses these at admission
            params = SamplingParams(max_tokens=max_tokens, n=n)
            seqs: list[Sequence] = []
            for i in range(n):
                seqs.append(Sequence(f"r{len(requests)}", prompt, params, i,
                                     fork_parent=seqs[0] if seqs else None))
            requests.append(seqs)
            for seq in seqs:
                scheduler.add(seq)
        elif action[0] == "step":
            _simulate_step(scheduler, step_no)
        elif requests:
            for seq in requests[action[1] % len(requests)]:
                scheduler.finish(seq, FinishReason.ABORT)
        live = [s for seqs in requests for s in seqs if not s.is_finished]
        bm.check_invariants(live)
        assert len(scheduler.running) <= max_num_seqs
    # Drain: everything admitted must finish (nothing waits forever).
    for step_no in range(2000):
        if not scheduler.has_unfinished:
            break
        _simulate_step(scheduler, step_no)
        bm.check_invariants([s for seqs in requests for s in seqs if not s.is_finished])
    assert not scheduler.has_unfinished
    assert bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(8, BLOCK_SIZE, True)
    scheduler = Scheduler(SchedulerConfig(4, 64, 64), bm)
    prompt = list(range(8))  # exactly two blocks
    first = Sequence("a", prompt, SamplingParams(max_tokens=1))
    scheduler.add(first)
    batch = scheduler.schedule()
    scheduler.update_after_step(batch)
    scheduler.finish(first, FinishReason.LENGTH)
    second = Sequence("b", prompt, SamplingParams(max_tokens=1))
    scheduler.add(second)
    batch = scheduler.schedule()
    # One block is reused; the second block holds the last token, which must be computed.
    assert second.num_cached_tokens == BLOCK_SIZE
    assert batch.num_new_tokens == [BLOCK_SIZE]


def test_lru_evicts_least_recently_freed_cached_block():
    bm = BlockManager(3, BLOCK_SIZE, True)
    scheduler = Scheduler(SchedulerConfig(4, 64, 64), bm)
    seqs = []
    for name, token in (("a", 1), ("b", 2)):
        seq = Sequence(name, [token] * 5, SamplingParams(max_tokens=1))
        scheduler.add(seq)
        scheduler.update_after_step(scheduler.schedule())
        scheduler.finish(seq, FinishReason.LENGTH)
        seqs.append(seq)
    # "a"'s full block was freed first, so a new 2-block request evicts it and keeps "b"'s.
    scheduler.add(Sequence("c", [3] * 5, SamplingParams(max_tokens=1)))
    scheduler.update_after_step(scheduler.schedule())
    assert bm.lookup_prefix(Sequence("a2", [1] * 5, SamplingParams())) == []
    assert len(bm.lookup_prefix(Sequence("b2", [2] * 5, SamplingParams()))) == 1
