"""tensorizer's index of a weights file, kept in the artifact's manifest (`weights_index`).

A CPU load from S3 makes each weight a view of its bytes where the read landed them; all it needs
of the file is where each tensor's bytes are. tensorizer knows, but `import tensorizer` costs
~0.3 s of a cold start (it imports boto3, redis and psutil, with the GIL held, after torch). So
`tensorize` asks tensorizer's own deserializer for its index once, and writes it into the
manifest: name -> [dtype, shape, data offset, data length]. A load with the index imports no
tensorizer; one without (an artifact tensorized before) reads the index from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

INDEX_KEY = "weights_index"


def build_index(path: Path, model: torch.nn.Module) -> dict[str, list[Any]] | None:
    """`path`'s index as tensorizer reads it, with each tensor's dtype as `model` holds it; None
    if a tensor is not stored whole (encrypted, or a meta tensor without data)."""
    from tensorizer import TensorDeserializer

    dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in model.state_dict().items()}
    with TensorDeserializer(str(path), device="cpu", lazy_load=True) as deserializer:
        index = {}
        for tensor_path, entry in deserializer._metadata.items():
            name = tensor_path.normalize_()
            if deserializer._encrypted or entry.data_length != entry.deserialized_length:
                return None
            index[name] = [dtypes[name], list(entry.shape), entry.data_offset, entry.data_length]
    return index


def index_end(index: dict[str, list[Any]]) -> int:
    """The byte after the last tensor's."""
    return max((offset + length for _, _, offset, length in index.values()), default=0)


def view(memory: memoryview, entry: list[Any]) -> torch.Tensor:
    """The tensor `entry` places in `memory` (the whole object's bytes), without a copy."""
    dtype_name, shape, offset, length = entry
    dtype = getattr(torch, dtype_name)
    if length == 0:
        return torch.empty(shape, dtype=dtype)
    if length != dtype.itemsize * torch.Size(shape).numel():
        raise ValueError(f"{length} bytes do not hold a {dtype_name} tensor of shape {shape}")
    return torch.frombuffer(memory, dtype=dtype, count=length // dtype.itemsize,
                            offset=offset).view(shape)
