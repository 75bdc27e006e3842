"""The read of a tensorized model's weights from S3, started at once: while torch, transformers
and tensorizer import (1.5-4 s), the object (0.7 s at wire speed here) is already arriving.

Torch-free, so the loader can call it first. Nothing here fails a load: if the object cannot be
opened early, the normal path opens it later and reports why it cannot.
"""

from __future__ import annotations

import logging

from engine.weights.s3 import S3Location, object_size, s3_client
from engine.weights.s3_reader import S3ObjectReader

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.tensors"  # the weights of a tensorized artifact, beside its side files
PREFETCH_BYTES = 1 << 30  # held in memory at most, ahead of the deserializer


def prefetch_weights(model: str, s3_endpoint: str | None, hash_weights: bool = True,
                     in_memory: bool = False) -> S3ObjectReader | None:
    """For an s3:// model: its weights object, already being read (and hashed, for the
    manifest's digest, if `hash_weights`; into one mapping the tensors will view, if
    `in_memory`: a CPU load); else None."""
    if not model.startswith("s3://"):
        return None
    try:
        location = S3Location.parse(model.rstrip("/"))
        client = s3_client(s3_endpoint)
        size = object_size(client, location, WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 - a profile missing, say: the load says it again
        logger.info("%s: not read early (%s)", model, e)
        return None
    reader = S3ObjectReader(client, location, WEIGHTS_FILE, size, in_memory=in_memory)
    if hash_weights:
        reader.hash_object()
    reader.start(PREFETCH_BYTES)
    return reader
