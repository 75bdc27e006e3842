"""The weights object as the fetch process (`engine/weights/fetch.py`) lands it in a memory file
this process maps: what the loader takes from an in-memory `S3ObjectReader` (`memory`,
`arrived`, `digest`, `read_to_end`, file reads), told by the fetch's lines how far it is."""

from __future__ import annotations

import mmap
import threading

from engine.weights.s3_reader import ArrivingObject, S3ReadError


class FetchedDigest:
    """The object's digest, as the fetch process hashed it while the bytes came."""

    def __init__(self, fetched: FetchedObject):
        self._fetched = fetched

    @property
    def num_bytes(self) -> int:
        return self._fetched.num_arrived

    def hexdigest(self) -> str | None:
        self._fetched.wait_for_end()
        return self._fetched.digest_hex


class FetchedObject(ArrivingObject):
    def __init__(self, uri: str, name: str, size: int, fd: int, is_hashed: bool):
        super().__init__()
        self.uri, self.name, self.size = uri, name, size
        self.memory = memoryview(mmap.mmap(fd, max(size, 1)))
        self.digest = FetchedDigest(self) if is_hashed else None
        self.digest_hex: str | None = None
        self.num_arrived = 0
        self._error: str | None = None
        self._has_ended = False
        self._changed = threading.Condition()

    # -- told by the fetch's lines ---------------------------------------------------------------

    def landed(self, end: int) -> None:
        with self._changed:
            self.num_arrived = max(self.num_arrived, end)
            self._changed.notify_all()

    def ended(self, digest_hex: str | None = None, error: str | None = None) -> None:
        """The fetch is over: its digest, or why it stopped (a short object is an error)."""
        with self._changed:
            self.digest_hex = digest_hex
            if self.num_arrived < self.size:
                error = (f"the fetch stopped at byte {self.num_arrived} of {self.size}"
                         + (f" ({error})" if error else ""))
            self._error = error
            self._has_ended = True
            self._changed.notify_all()

    # -- what the loader takes -------------------------------------------------------------------

    def arrived(self, end: int) -> memoryview:
        """The object's bytes [0, end), once they have all arrived."""
        with self._changed:
            self._changed.wait_for(lambda: self.num_arrived >= end or self._has_ended)
            if self.num_arrived < end:
                raise S3ReadError(f"{self.uri}: {self._error}")
        return self.memory[:end]

    def wait_for_end(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._has_ended)

    def read_to_end(self) -> None:
        """Every byte arrived, and the digest (if hashed) said."""
        self.arrived(self.size)
        self.wait_for_end()
        self._pos = self.size

    def hash_object(self) -> FetchedDigest | None:
        return self.digest
