"""The read of a tensorized model's weights from S3, started at once: while torch and tensorizer
import (1-4 s), the object (0.3-0.7 s at wire speed here) is already arriving.

A CPU load reads in a fetch process (`engine/weights/fetch.py`) into a memory file both
processes map, and gets its side files from it too: this process spends no GIL on the read
(`FetchedRead`). Elsewhere (a GPU load, which copies each tensor to the device as it comes, or
where the OS has no memory files) the read runs here, on threads (`LocalRead`).

Torch-free, so the loader can call it first. Nothing here fails a load: if the object cannot be
read early, the normal path opens it later and reports why it cannot.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

from engine.tokenizer import FACTS_FILE
from engine.weights.fetched_object import FetchedObject
from engine.weights.s3 import S3Location, object_size, s3_client
from engine.weights.s3_reader import S3ObjectReader

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.tensors"  # the weights of a tensorized artifact, beside its side files
MANIFEST_FILE = "manifest.json"
SIDE_FILES = (
    "config.json", "generation_config.json", MANIFEST_FILE, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", FACTS_FILE,
)
PREFETCH_BYTES = 1 << 30  # held in memory at most, ahead of the deserializer (`LocalRead`)


class LocalRead:
    """The weights object read on this process's threads (hashed for the manifest's digest, if
    `hash_weights`; into one mapping the tensors will view, if `in_memory`)."""

    def __init__(self, model: str, s3_endpoint: str | None, hash_weights: bool, in_memory: bool):
        self.client: Any = None
        self._reader: S3ObjectReader | None = None
        try:
            location = S3Location.parse(model.rstrip("/"))
            self.client = s3_client(s3_endpoint)
            size = object_size(self.client, location, WEIGHTS_FILE)
        except Exception as e:  # noqa: BLE001 - a profile missing, say: the load says it again
            logger.info("%s: not read early (%s)", model, e)
            return
        self._reader = S3ObjectReader(self.client, location, WEIGHTS_FILE, size,
                                      in_memory=in_memory)
        if hash_weights:
            self._reader.hash_object()
        self._reader.start(PREFETCH_BYTES)

    def reader(self) -> S3ObjectReader | None:
        return self._reader

    def take_files(self) -> tempfile.TemporaryDirectory | None:
        return None  # the load fetches them (with this read's client)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class FetchedRead:
    """The weights object and the side files, fetched by a process of their own (see the
    module's doc) from the moment this is made."""

    def __init__(self, model: str, s3_endpoint: str | None, hash_weights: bool, fd: int):
        self.model, self.hash_weights, self.client = model.rstrip("/"), hash_weights, None
        self._fd = fd
        self._files: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(
            prefix="model-")
        command = [sys.executable, "-m", "engine.weights.fetch", self.model, self._files.name,
                   "--fd", str(fd)] + (["--endpoint", s3_endpoint] if s3_endpoint else [])
        self._fetch = subprocess.Popen(
            command + (["--hash"] if hash_weights else []), pass_fds=(fd,),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self._object: FetchedObject | None = None
        self._has_files = False
        self._has_object = threading.Event()  # the object, or word that there is none
        self._has_files_word = threading.Event()  # the side files, or word that there are none
        self._has_ended = threading.Event()
        threading.Thread(target=self._follow, name="early-read", daemon=True).start()

    def reader(self) -> FetchedObject | None:
        """The weights, arriving; None if they cannot be fetched (waits for the fetch's word)."""
        self._has_object.wait()
        return self._object

    def take_files(self) -> tempfile.TemporaryDirectory | None:
        """The folder of side files, handed over (the caller keeps it alive), once the fetch
        has them (waits for its word); None if it could not."""
        self._has_files_word.wait()
        files, self._files = (self._files, None) if self._has_files else (None, self._files)
        return files

    def close(self) -> None:
        """Stop: the fetch, and the side files not handed over (the object's mapping lives as
        long as views of it)."""
        if self._fetch.poll() is None:
            self._fetch.kill()
        self._has_ended.wait()
        if self._files is not None:
            self._files.cleanup()
            self._files = None

    def _follow(self) -> None:
        """The fetch's lines, as they come."""
        digest, error = None, None
        try:
            for line in self._fetch.stdout:
                message = json.loads(line)
                if "size" in message:
                    self._object = FetchedObject(f"{self.model}/{WEIGHTS_FILE}", WEIGHTS_FILE,
                                                 message["size"], self._fd, self.hash_weights)
                    self._has_object.set()
                elif "arrived" in message and self._object is not None:
                    self._object.landed(message["arrived"])
                if "files" in message:
                    self._has_files = bool(message["files"])
                    self._has_files_word.set()
                digest = message.get("digest", digest)
                if "error" in message:
                    if "files" not in message:  # the weights' read failed
                        error = error or message["error"]
                    logger.info("%s: not read early (%s)", self.model, message["error"])
        except Exception as e:  # noqa: BLE001 - the load reads it again, and says what fails
            error = f"{type(e).__name__}: {e}"
            logger.info("%s: not read early (%s)", self.model, error)
        finally:
            self._fetch.stdout.close()
            code = self._fetch.wait()
            os.close(self._fd)  # the fetch's copy is gone; the mapping keeps the memory
            if self._object is not None:
                self._object.ended(digest, error or (f"the fetch exited with {code}" if code
                                                     else None))
            self._has_object.set()
            self._has_files_word.set()
            self._has_ended.set()


def prefetch_weights(model: str, s3_endpoint: str | None, hash_weights: bool = True,
                     in_memory: bool = False) -> LocalRead | FetchedRead | None:
    """For an s3:// model: its weights (and, fetched, its side files) already being read; else
    None. `in_memory`: a CPU load, whose tensors will view the bytes where they landed."""
    if not model.startswith("s3://"):
        return None
    if in_memory and hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("model-weights", os.MFD_CLOEXEC)
        except OSError as e:
            logger.info("%s: no memory file (%s); read here", model, e)
        else:
            return FetchedRead(model, s3_endpoint, hash_weights, fd)
    return LocalRead(model, s3_endpoint, hash_weights, in_memory)
