"""The weights' checksum hashed as the reads come: xxhash's XXH3-128 of what was read in one
run, and no digest at all for reads out of order."""

from __future__ import annotations

import os

import xxhash

from engine.weights.digest import ReadDigest


def test_pieces_in_order_hash_as_the_whole():
    data = os.urandom(3 << 20)
    digest = ReadDigest()
    pos = 0
    for size in (1, 4095, 1 << 20, 7, (3 << 20) - (1 << 20) - 4103):
        digest.feed(pos, memoryview(data)[pos : pos + size])
        pos += size
    assert pos == len(data) == digest.num_bytes
    assert digest.hexdigest() == xxhash.xxh3_128(data).hexdigest()


def test_a_seek_gives_no_digest():
    data = os.urandom(1 << 16)
    digest = ReadDigest()
    digest.feed(0, memoryview(data)[:100])
    digest.feed(200, memoryview(data)[200:300])
    assert digest.hexdigest() is None
