"""A rank's place in the tensor-parallel group and the three collectives a step needs.

gloo on the CPU, NCCL on CUDA: the same calls either way. With one rank every collective is the
identity, so the single-process engine pays one attribute check per call.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def split(self, size: int) -> tuple[int, int]:
        """This rank's [start, end) of `size` split evenly (the caller checks divisibility)."""
        share = size // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's `x` side by side along the last dimension (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """The driver's `obj` on every rank (pickled: the step inputs are small)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = TensorParallel()


def free_port() -> int:
    """A TCP port free on this host now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_tensor_parallel(rank: int, world_size: int, init_method: str,
                         device: torch.device, timeout_s: float = 600.0) -> TensorParallel:
    """Join the group (blocks until every rank has joined). `timeout_s` bounds every collective:
    a rank that dies leaves the others an error, not a hang."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, world_size)
