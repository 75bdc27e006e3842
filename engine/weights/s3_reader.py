"""A read-only file over one S3 object: GETs signed by boto3, read in order by one consumer
(tensorizer's deserializer) while the bytes arrive.

boto3 signs every request with the whole credential chain (a session token included: SageMaker
execution roles and `sts assume-role` give temporary credentials).

The read starts as one stream over the whole object. If that stream is slower than the wire (its
rest would take more than `SPLIT_IF_REMAINING_S` at the rate seen so far), the rest is split into
ranges fetched in parallel, several GETs in flight; a store that is fast per stream but pays a lot
per request (moto re-reads the whole object for each) keeps its single stream. At most
`MAX_AHEAD_BYTES` per range wait in memory ahead of the reader (the fetch pauses, TCP holds the
rest). A connection lost in the middle of a range is resumed from the byte where it broke, a few
times; past that the error says which byte of which object was lost.

Read `in_memory`, the object's bytes land straight from the socket in one mapping the size of the
object, and the reader hands out views of it (`arrived`): a CPU load makes its tensors over those
bytes, with no copy and no second set of fresh pages (each ~0.3 s of CPU for 538 MB). Otherwise
(a GPU load, which copies each tensor to the device) they come in pieces, at most
`MAX_AHEAD_BYTES` per range ahead of the reader.
"""

from __future__ import annotations

import bisect
import collections
import io
import logging
import mmap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.weights.digest import ReadDigest
from engine.weights.errors import WeightsError
from engine.weights.s3 import S3Location, translate_error

logger = logging.getLogger(__name__)

NUM_IN_FLIGHT = 4
MIN_RANGE_BYTES = 8 << 20
MAX_AHEAD_BYTES = 64 << 20
SPLIT_AFTER_S = 0.2  # how long to watch the single stream before deciding
SPLIT_IF_REMAINING_S = 1.0
RANGE_BYTES: int | None = None  # fixed ranges from the start (tests); None: adaptive
MAX_RESUMES = 4
PIECE_BYTES = 4 << 20


class S3ReadError(WeightsError):
    """The connection to S3 broke in the middle of an object, and resuming did not help."""


class _Range:
    """Bytes [start, end) of the object, streamed in by a fetching thread while the reader
    consumes them."""

    def __init__(self, start: int, end: int, max_ahead: int, memory: memoryview | None = None):
        self.start, self.end, self.max_ahead = start, end, max_ahead
        self.memory = memory  # the whole object's, where this range's bytes land; or None
        self.pieces: collections.deque[memoryview] = collections.deque()
        self.num_buffered = 0
        self.num_received = 0
        self.num_consumed = 0
        self.first_byte_time: float | None = None
        self.error: BaseException | None = None
        self.is_abandoned = False
        self.cond = threading.Condition()
        # Called with (position, piece) as each piece arrives, in order (the object's hash).
        self.on_receive: Callable[[int, memoryview], None] | None = None

    @property
    def num_missing(self) -> int:
        return self.end - self.start - self.num_received

    def put(self, piece: bytes) -> None:
        with self.cond:
            while self.num_buffered >= self.max_ahead and not self.is_abandoned:
                self.cond.wait()
            piece = memoryview(piece)[: max(0, self.num_missing)]  # the end may have moved
            if self.first_byte_time is None:
                self.first_byte_time = time.monotonic()
            if self.on_receive is not None:
                self.on_receive(self.start + self.num_received, piece)
            self.pieces.append(piece)
            self.num_buffered += len(piece)
            self.num_received += len(piece)
            self.cond.notify_all()

    def landed(self, num_bytes: int) -> None:
        """`num_bytes` more of this range's bytes are in `memory`."""
        with self.cond:
            pos = self.start + self.num_received
            if self.first_byte_time is None:
                self.first_byte_time = time.monotonic()
            if self.on_receive is not None:
                self.on_receive(pos, self.memory[pos : pos + num_bytes])
            self.num_received += num_bytes
            self.cond.notify_all()

    def wait_received(self, end: int) -> None:
        """Until this range's bytes before `end` are in `memory` (or its fetch failed)."""
        with self.cond:
            while self.start + self.num_received < min(end, self.end) and self.error is None:
                self.cond.wait()
            if self.start + self.num_received < min(end, self.end):
                raise self.error

    def take(self, max_bytes: int) -> memoryview:
        """Up to `max_bytes` of the next bytes, waiting for them (or the fetch's error)."""
        with self.cond:
            while not self.pieces and self.error is None:
                self.cond.wait()
            if not self.pieces:
                raise self.error
            piece = self.pieces[0]
            if len(piece) <= max_bytes:
                self.pieces.popleft()
            else:
                piece, self.pieces[0] = piece[:max_bytes], piece[max_bytes:]
            self.num_buffered -= len(piece)
            self.num_consumed += len(piece)
            self.cond.notify_all()
            return piece

    def shorten(self, end: int) -> None:
        with self.cond:
            self.end = max(end, self.start + self.num_received)

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    def abandon(self) -> None:
        with self.cond:
            self.is_abandoned = True
            self.cond.notify_all()


class ArrivingObject(io.RawIOBase):
    """A read-only file over an object whose bytes arrive while it is read: what the loader
    takes from `S3ObjectReader` and `FetchedObject` (engine/weights/fetched_object.py). Each
    has `size`, `uri`, `digest`, `memory` (the whole object's bytes, or None) and `arrived(end)`
    (the bytes [0, end) in `memory`, once they have come); the reads below go through it."""

    size: int
    memory: memoryview | None

    def __init__(self):
        super().__init__()
        self._pos = 0

    def arrived(self, end: int) -> memoryview:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        num_done = max(0, min(len(view), self.size - self._pos))
        view[:num_done] = self.arrived(self._pos + num_done)[self._pos :]
        self._pos += num_done
        return num_done


class S3ObjectReader(ArrivingObject):
    def __init__(self, client: Any, location: S3Location, name: str, size: int,
                 num_in_flight: int = NUM_IN_FLIGHT, in_memory: bool = False,
                 memory: memoryview | None = None):
        """`memory`: where the bytes land `in_memory`, `size` bytes (a mapping shared with
        another process, engine/weights/fetch.py); by default a mapping of the reader's own."""
        super().__init__()
        self.client, self.location, self.name, self.size = client, location, name, size
        self.uri = location.uri(name)
        self.num_in_flight = num_in_flight
        self.num_resumes = 0
        self._ranges: list[_Range] = []  # by start, covering the object
        self._pool = ThreadPoolExecutor(num_in_flight, thread_name_prefix="s3-read")
        # Anonymous memory, its pages made as the bytes land; it lives as long as a view of it.
        if in_memory and memory is None:
            memory = memoryview(mmap.mmap(-1, max(size, 1)))
        self.memory = memory if in_memory else None
        step = RANGE_BYTES or size
        self._is_split = RANGE_BYTES is not None
        for start in range(0, max(size, 1), step):
            self._ranges.append(self._new_range(start, min(start + step, size)))
        self._num_started = 0
        self.digest: ReadDigest | None = None

    def hash_object(self) -> ReadDigest:
        """Hash the object in order as its bytes come: the first range as it arrives (an early
        read's arrives while the engine imports), the others (if the read was split) as they
        are read (or, `in_memory`, once they have arrived). Called before `start` and the first
        read."""
        self.digest = ReadDigest()
        self._ranges[0].on_receive = self.digest.feed
        return self.digest

    def start(self, max_ahead_bytes: int = MAX_AHEAD_BYTES) -> None:
        """Begin fetching now, before the first read, keeping up to `max_ahead_bytes` of the
        object in memory until the reader comes (the read then overlaps what precedes it)."""
        self._ranges[0].max_ahead = max(max_ahead_bytes, MAX_AHEAD_BYTES)
        self._range_at(0)

    # -- io.RawIOBase -----------------------------------------------------------------------------

    def readinto(self, buffer: Any) -> int:
        if self.memory is not None:
            return super().readinto(buffer)
        view = memoryview(buffer).cast("B")
        num_done = 0
        while num_done < len(view) and self._pos < self.size:
            part = self._range_at(self._pos)
            piece = part.take(min(len(view) - num_done, part.end - self._pos))
            if self.digest is not None and part.on_receive is None:
                self.digest.feed(self._pos, piece)
            view[num_done : num_done + len(piece)] = piece
            num_done += len(piece)
            self._pos += len(piece)
        return num_done

    def arrived(self, end: int) -> memoryview:
        """The object's bytes [0, end) in memory, once they have all arrived (`in_memory`)."""
        self._maybe_split()
        index = bisect.bisect_right([r.start for r in self._ranges], max(end - 1, 0))
        self._start_fetches(index - 1)
        for part in self._ranges[:index]:
            part.wait_received(end)
        if self.digest is not None and self.digest.num_bytes < end:
            # The ranges after the first are hashed here, in order (the first as it arrives).
            self.digest.feed(self.digest.num_bytes, self.memory[self.digest.num_bytes : end])
        return self.memory[:end]

    def read_to_end(self) -> None:
        """Every byte from here to the object's end arrived (and hashed), none kept."""
        if self.memory is not None:
            self.arrived(self.size)
            self._pos = self.size
        while self.read(PIECE_BYTES):
            pass

    def close(self) -> None:
        if not self.closed:
            for part in self._ranges:
                part.abandon()
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    # -- the ranges -------------------------------------------------------------------------------

    def _range_at(self, pos: int) -> _Range:
        """The range holding byte `pos`, started (with the next ones) and ready to read there."""
        self._maybe_split()
        index = bisect.bisect_right([r.start for r in self._ranges], pos) - 1
        for stale in self._ranges[:index]:
            stale.abandon()
        self._start_fetches(index)
        part = self._ranges[index]
        if pos != part.start + part.num_consumed:  # a seek: fetch this range again from there
            part.abandon()
            part = _Range(pos, part.end, MAX_AHEAD_BYTES)
            self._ranges[index] = part
            self._pool.submit(self._fetch, part)
        return part

    def _start_fetches(self, index: int) -> None:
        """The fetches of the range at `index` and of the ones after it, up to those in flight."""
        while self._num_started < min(index + self.num_in_flight, len(self._ranges)):
            self._pool.submit(self._fetch, self._ranges[self._num_started])
            self._num_started += 1

    def _new_range(self, start: int, end: int) -> _Range:
        return _Range(start, end, MAX_AHEAD_BYTES, self.memory)

    def _maybe_split(self) -> None:
        """Once: if the single stream is slower than the wire, fetch its rest in ranges."""
        first = self._ranges[0]
        if self._is_split or first.first_byte_time is None:
            return
        elapsed = time.monotonic() - first.first_byte_time
        if elapsed < SPLIT_AFTER_S:
            return
        self._is_split = True
        rate = first.num_received / elapsed
        missing = first.num_missing
        if missing < 2 * MIN_RANGE_BYTES or missing < rate * SPLIT_IF_REMAINING_S:
            return
        step = max(MIN_RANGE_BYTES, -(-missing // self.num_in_flight))
        boundary = first.start + first.num_received + step
        first.shorten(boundary)
        for start in range(first.end, self.size, step):
            self._ranges.append(self._new_range(start, min(start + step, self.size)))
        logger.info("%s: one stream gives %.0f MB/s; the other %d MB in %d ranges", self.uri,
                    rate / 1e6, (self.size - first.end) >> 20, len(self._ranges) - 1)

    def _fetch(self, part: _Range) -> None:
        attempt = 0
        while not part.is_abandoned:
            try:
                self._read_range(part)
                if part.num_missing <= 0 or part.is_abandoned:
                    return
                raise ConnectionError("the response ended early")
            except WeightsError as e:
                part.fail(e)
                return
            except Exception as e:  # noqa: BLE001 - a broken connection: resume where it broke
                attempt += 1
                broken_at = part.start + part.num_received
                if attempt > MAX_RESUMES:
                    part.fail(S3ReadError(
                        f"{self.uri}: connection lost at byte {broken_at} of {self.size} "
                        f"({type(e).__name__}: {e}); resumed {MAX_RESUMES} times"))
                    return
                self.num_resumes += 1
                logger.warning("%s: connection lost at byte %d (%s); resuming", self.uri,
                               broken_at, type(e).__name__)

    def _read_range(self, part: _Range) -> None:
        from botocore.exceptions import ClientError, EndpointConnectionError

        start = part.start + part.num_received
        # Open-ended while the range may still be shortened by a split; the stream is then
        # closed at the new end.
        last = "" if part is self._ranges[0] and not self._is_split else part.end - 1
        try:
            response = self.client.get_object(
                Bucket=self.location.bucket, Key=self.location.key(self.name),
                Range=f"bytes={start}-{last}",
            )
        except (ClientError, EndpointConnectionError) as e:
            raise translate_error(e, self.uri) from e
        body = response["Body"]
        if part.memory is not None:
            self._receive_into_memory(part, body)
            return
        # urllib3's read1: what the socket has (up to a piece), without waiting for a whole
        # piece, so that the reader and the split decision see bytes as they come.
        read = body._raw_stream.read1
        try:
            while part.num_missing > 0 and not part.is_abandoned:
                piece = read(min(PIECE_BYTES, part.num_missing))
                if not piece:
                    break
                part.put(piece)
        finally:
            body.close()

    @staticmethod
    def _receive_into_memory(part: _Range, body: Any) -> None:
        """The response's bytes straight from the socket into `part.memory`, as they come.
        urllib3's own reads copy; under it, http.client's buffered socket reads into the memory
        given, what the socket has (`readinto1`), so that the reader and the split decision see
        bytes as they come. Its own count of the body is bypassed: the range's is kept here, and
        the connection is closed after (as urllib3 closes it anyway). A chunked body (never from
        S3) is read through http.client, which takes its framing off."""
        response = body._raw_stream._fp
        readinto = response.readinto if response.chunked else response.fp.readinto1
        try:
            while part.num_missing > 0 and not part.is_abandoned:
                pos = part.start + part.num_received
                num_read = readinto(part.memory[pos : pos + min(PIECE_BYTES, part.num_missing)])
                if not num_read:
                    break
                part.landed(num_read)
        finally:
            body.close()
