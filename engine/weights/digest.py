"""The checksum of a weights object, computed as its bytes come: XXH3-128 of the whole object.

tensorizer verifies each tensor (crc32 and sha256) on its reading thread, between one copy and
the next: 0.6 s of a 538 MB cold start on 2 cores. A sha256 of the whole object, hashed as the
bytes arrive, still took 0.35-0.45 s of CPU (1.3-1.6 GB/s) from a load that is bound by the CPU
of both cores. XXH3 runs at ~47 GB/s (~15 ms for those bytes), so it is hashed in line on the
thread that receives them. It guards against corruption and truncation, which is what the
check is for: it is not a signature, and needs none, as whoever can rewrite the object in its
bucket can rewrite the manifest beside it.
"""

from __future__ import annotations

import xxhash

ALGORITHM = "xxh3_128"  # the manifest's key: `weights_xxh3_128` (`rank_weights_xxh3_128`)


def new_hash() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


class ReadDigest:
    """Feed it the object's pieces in order; `hexdigest` then says what they hash to, or None if
    they were not one run from byte 0 (a read out of order)."""

    def __init__(self):
        self._hash = new_hash()
        self._next_pos = 0
        self._is_sequential = True

    @property
    def num_bytes(self) -> int:
        return self._next_pos

    def feed(self, pos: int, piece: memoryview) -> None:
        """`piece`, read at byte `pos` of the object."""
        if pos != self._next_pos:
            self._is_sequential = False
        self._next_pos = pos + len(piece)
        if self._is_sequential:
            self._hash.update(piece)

    def hexdigest(self) -> str | None:
        """The hash of everything fed; None if it was not fed in one run."""
        return self._hash.hexdigest() if self._is_sequential else None
