"""The paged KV cache's bookkeeping: ref-counted blocks, prefix caching, LRU eviction.

Pure Python. A block holds `block_size` tokens' KV; a token at position p of a sequence lives at
slot `block_table[p // block_size] * block_size + p % block_size`. Block tables only grow.

Prefix caching: a full block is keyed by a hash of its tokens chained with the previous block's
hash, so equal keys mean equal prefixes (the token ids are compared too, against collisions). A
freed block keeps its key and stays findable until it is reused; free blocks are reused least
recently freed first, blocks without a key before any cached one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in reuse order: the front is reused first.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefix cache ---------------------------------------------------------------------------

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`, leaving at least its last token to compute."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []  # a prompt's logprobs need every prompt token computed
        block_ids: list[int] = []
        prev_hash = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            token_ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_hash = chain_hash(prev_hash, token_ids)
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != token_ids:
                break
            block_ids.append(block_id)
            prev_hash = block_hash
        return block_ids

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key every block of `seq` that is full of computed tokens, so later requests find it."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            token_ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            prev_hash = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = chain_hash(prev_hash, token_ids)
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and block_hash not in self.cached_block_ids:
                block.block_hash, block.token_ids = block_hash, token_ids
                self.cached_block_ids[block_hash] = block.block_id

    # -- allocation -----------------------------------------------------------------------------

    def num_blocks_to_allocate(
        self, seq: Sequence, num_new_tokens: int, shared_block_ids: list[int] = ()
    ) -> int:
        """Free blocks that `allocate` would take: new blocks plus shared ones now free."""
        num_tokens = seq.num_computed_tokens + len(shared_block_ids) * self.block_size
        num_needed = cdiv(num_tokens + num_new_tokens, self.block_size)
        num_new = max(0, num_needed - len(seq.block_table) - len(shared_block_ids))
        num_revived = sum(1 for b in shared_block_ids if self.blocks[b].ref_count == 0)
        return num_new + num_revived

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, shared_block_ids: list[int] = ()
    ) -> bool:
        return (
            self.num_blocks_to_allocate(seq, num_new_tokens, shared_block_ids)
            <= self.num_free_blocks
        )

    def allocate(
        self, seq: Sequence, num_new_tokens: int, shared_block_ids: list[int] = ()
    ) -> None:
        """Grow `seq`'s table to hold its computed tokens, the shared blocks and the new tokens.

        `shared_block_ids` (a prefix-cache hit or a sibling's prompt) extend the table and count
        as computed. The caller checks `can_allocate` first.
        """
        if not self.can_allocate(seq, num_new_tokens, shared_block_ids):
            raise RuntimeError("allocate() called without enough free blocks")
        if not seq.block_table and self.enable_prefix_caching:
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += len(shared_block_ids) * self.block_size
        for block_id in shared_block_ids:
            self._take(block_id)
        seq.block_table.extend(shared_block_ids)
        seq.num_computed_tokens += len(shared_block_ids) * self.block_size
        num_needed = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < num_needed:
            block_id = next(iter(self.free_block_ids))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks (tail first, so its head stays cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.block_hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached_block_ids.get(block.block_hash) == block_id:
                del self.cached_block_ids[block.block_hash]
            block.block_hash, block.token_ids = None, ()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no sequence holds (their ids stay free)."""
        for block_id in list(self.cached_block_ids.values()):
            if self.blocks[block_id].ref_count == 0:
                self._evict(block_id)

    # -- checks ---------------------------------------------------------------------------------

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """Raise AssertionError if the bookkeeping disagrees with the live sequences' tables."""
        counts = [0] * self.num_blocks
        for seq in live_seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), "block twice in a table"
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} != {counts[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self.free_block_ids)
        for block_hash, block_id in self.cached_block_ids.items():
            assert self.blocks[block_id].block_hash == block_hash
