"""A CPU load's early read from S3, in a process of its own (started by
`engine/weights/prefetch.py`).

    python -m engine.weights.fetch s3://bucket/prefix FILES_DIR --fd N [--endpoint URL] [--hash]

The engine's process imports torch (~1-1.5 s, one core, the GIL held) while the weights arrive.
Read there, the read took the GIL too: boto3's import and its client ~0.2 s ahead of torch's
import, then a GIL hand-over for every socket read, which stretched a 0.3 s read of 538 MB to
1.1 s. Here the read has the other core and a GIL of its own: boto3 signs (the whole credential
chain, SageMaker's container credentials included), `S3ObjectReader` reads (ranges, resumes) and
hashes, and the bytes land in the memory file N that the engine's process maps too. The side
files come into FILES_DIR meanwhile. With the engine's process gone (its end of stdout closed),
it stops at its next line.

Its stdout, one JSON object a line: `{"size": S}` once the object is found and the file sized to
it; `{"arrived": END}` as bytes [0, END) are in; `{"files": true}` once the side files are in
FILES_DIR (false, with the error, if they cannot be); `{"digest": HEX}` at the end (with
`--hash`: the object's XXH3-128); `{"error": ...}` if the read fails, which the engine's load
then meets itself and reports.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any

from engine.weights.prefetch import SIDE_FILES, WEIGHTS_FILE
from engine.weights.s3 import S3Location, download_files, object_size, s3_client
from engine.weights.s3_reader import S3ObjectReader

ARRIVED_STEP = 8 << 20  # bytes between two `arrived` lines

_say_lock = threading.Lock()


def _say(**message: object) -> None:
    with _say_lock:
        print(json.dumps(message), flush=True)


def _download_files(client: Any, location: S3Location, files_dir: Path) -> None:
    try:
        download_files(client, location, list(SIDE_FILES), files_dir, required=("config.json",))
        _say(files=True)
    except Exception as e:  # noqa: BLE001 - the load fetches them again and says why
        _say(files=False, error=f"{type(e).__name__}: {e}")


def fetch(model: str, files_dir: Path, fd: int, endpoint: str | None, is_hashed: bool) -> None:
    location = S3Location.parse(model.rstrip("/"))
    client = s3_client(endpoint)
    size = object_size(client, location, WEIGHTS_FILE)
    os.ftruncate(fd, max(size, 1))
    memory = memoryview(mmap.mmap(fd, max(size, 1)))  # shared: the engine's process maps it too
    reader = S3ObjectReader(client, location, WEIGHTS_FILE, size, in_memory=True, memory=memory)
    digest = reader.hash_object() if is_hashed else None
    reader.start()
    _say(size=size)
    files = threading.Thread(target=_download_files, args=(client, location, files_dir),
                             daemon=True)
    files.start()
    for end in range(ARRIVED_STEP, size + ARRIVED_STEP, ARRIVED_STEP):
        reader.arrived(min(end, size))
        _say(arrived=min(end, size))
    files.join()
    if digest is not None:
        _say(digest=digest.hexdigest())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="s3://bucket/prefix of a tensorized model")
    parser.add_argument("files_dir", type=Path, help="where the side files go")
    parser.add_argument("--fd", type=int, required=True, help="the memory file the bytes go to")
    parser.add_argument("--endpoint", default=None, help="an S3-compatible endpoint URL")
    parser.add_argument("--hash", action="store_true", help="say the object's XXH3-128")
    args = parser.parse_args(argv)
    try:
        fetch(args.model, args.files_dir, args.fd, args.endpoint, args.hash)
    except BrokenPipeError:  # the engine's process is gone: stop reading for nobody
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet at exit
        return 1
    except Exception as e:  # noqa: BLE001 - said to the engine, whose load says it again
        _say(error=f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
