"""The sha256 of a weights object, computed on a thread of its own as its bytes come.

tensorizer verifies each tensor (crc32 and sha256) on its reading thread, between one copy and
the next: 0.6 s of a 538 MB cold start on 2 cores, most of the time the weights take to place.
The manifest's sha256 of the whole object proves the same bytes, and hashing them as they
arrive, while the engine imports torch on the other core, takes them off that path.
"""

from __future__ import annotations

import hashlib
import queue
import threading

_END = None


class ReadDigest:
    """Feed it the object's pieces in order; `hexdigest` then says what they hash to, or None if
    they were not one run from byte 0 (a read out of order)."""

    def __init__(self):
        self._sha256 = hashlib.sha256()
        self._pieces: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._next_pos = 0
        self._is_sequential = True
        self._is_ended = False
        self._thread = threading.Thread(target=self._run, name="weights-sha256", daemon=True)
        self._thread.start()

    @property
    def num_bytes(self) -> int:
        return self._next_pos

    def feed(self, pos: int, piece: memoryview) -> None:
        """`piece`, read at byte `pos` of the object (kept alive until hashed)."""
        if pos != self._next_pos:
            self._is_sequential = False
        self._next_pos = pos + len(piece)
        if self._is_sequential and not self._is_ended:
            self._pieces.put(piece)

    def hexdigest(self) -> str | None:
        """Wait for the hash of everything fed; None if it was not fed in one run."""
        self.close()
        self._thread.join()
        return self._sha256.hexdigest() if self._is_sequential else None

    def close(self) -> None:
        """No more pieces: the thread ends once it has hashed those it has."""
        if not self._is_ended:
            self._is_ended = True
            self._pieces.put(_END)

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not _END:
            self._sha256.update(piece)  # without the GIL (hashlib's, for large pieces)
