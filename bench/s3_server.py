"""moto's S3 server for the benchmarks, with ranged GETs that cost their range, as on S3.

moto answers a ranged GET by reading the whole object out of its spool file and slicing it: a
538 MB object fetched in 8 MiB parts (the Run:ai Model Streamer's AWS CRT client) reads ~36 GB
and takes ~30 s, or times out. Here each object's bytes are read from the spool once and kept
(until the object is written again), so a part costs its own size. A single GET costs what it
did. Same arguments as `moto_server`:

    .venv/bin/python bench/s3_server.py -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import sys

from moto.s3.models import FakeKey
from moto.server import main

_read_value, _write_value = FakeKey.value.fget, FakeKey.value.fset


def _cached_value(key: FakeKey) -> bytes:
    value = key.__dict__.get("_bench_value")
    if value is None:
        value = key.__dict__["_bench_value"] = _read_value(key)
    return value


def _set_value(key: FakeKey, new_value: bytes) -> None:
    key.__dict__["_bench_value"] = None
    _write_value(key, new_value)


FakeKey.value = property(_cached_value, _set_value)

if __name__ == "__main__":
    sys.exit(main())
