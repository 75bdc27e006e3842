"""The paged KV cache's memory: one tensor [layers, k|v, blocks, block_size, kv_heads, head_dim].

On the CPU it is anonymous memory, zeroed by the OS on first touch, in huge pages where the OS
gives them: nothing is paid for it at start. The first request after a cold start would pay
instead: its first block is a first write in each of the 60 (layer, k|v) regions of SmolLM2, and
each such write maps a fresh 2 MiB page. On these VMs fresh memory costs ~2 ms a MiB (the host
backs it on first touch): that first step took 0.30-0.33 s where a warm one takes 0.03-0.04 s,
in about half of the cold starts measured (the others got memory the host had already backed).
So the first blocks of every region are faulted in on a thread of their own as soon as the
cache exists, while the weights load.
"""

from __future__ import annotations

import math
import threading

import torch

from engine.config import ModelConfig
from engine.weights.huge_pages import huge_page_zeros, populate

NUM_FIRST_BLOCKS = 64  # per (layer, k|v): a first request of up to 1,024 tokens (16-token blocks)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * dtype.itemsize


def zeros_on_first_touch(shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """Zeros that cost nothing up front. On the CPU, anonymous memory: the OS maps in a zeroed
    page the first time one is written (`torch.zeros` would write all of it at start: ~1 s per
    GiB on these machines, on the cold-start path), in huge pages where it can. In 4 KiB pages a
    decode step's cache writes were mostly those first-touch faults: 32 sequences, 30 layers,
    fresh blocks 2.4-3.2 ms a step against 0.3-0.5 ms once written (Zen 4)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * dtype.itemsize
    if num_bytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return huge_page_zeros(num_bytes).view(dtype).view(shape)


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Zeros: padded positions are masked out of attention, but NaN garbage there would still
    poison the weighted sum (0 x NaN = NaN)."""
    shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return zeros_on_first_touch(shape, dtype, device)


def fault_in_first_blocks(kv_cache: torch.Tensor,
                          num_blocks: int = NUM_FIRST_BLOCKS) -> threading.Thread | None:
    """Start mapping in the first `num_blocks` blocks of every (layer, k|v) region, the blocks
    the block manager hands out first, on a thread (the OS call lets go of the GIL). Their
    contents stay zeros. None on a device other than the CPU."""
    if kv_cache.device.type != "cpu" or kv_cache.numel() == 0:
        return None
    regions = kv_cache[:, :, :num_blocks].flatten(0, 1)  # [layers * 2, blocks, ...]
    thread = threading.Thread(target=_fault_in, args=(kv_cache, regions), name="kv-first-blocks",
                              daemon=True)
    thread.start()
    return thread


def _fault_in(kv_cache: torch.Tensor, regions: torch.Tensor) -> None:
    base = kv_cache.data_ptr()
    region_bytes = regions[0].numel() * regions.element_size()
    for region in regions:
        if not populate(kv_cache, region.data_ptr() - base, region_bytes):
            return  # the OS cannot: the pages fault in as they are written
