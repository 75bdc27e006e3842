"""The KV cache's memory: zeros that cost nothing until touched, alive as long as the tensor,
from a huge-page boundary."""

from __future__ import annotations

import gc

import pytest
import torch

from engine.kv_cache import zeros_on_first_touch
from tests.residency import resident_pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zeros_on_first_touch_are_zeros_and_stay_alive(dtype):
    cache = zeros_on_first_touch((4, 2, 64, 16, 2, 8), dtype, torch.device("cpu"))
    assert cache.shape == (4, 2, 64, 16, 2, 8) and cache.dtype == dtype
    assert not cache.any()
    gc.collect()  # the mapping must outlive the function that made it
    cache[3, 1, 63] = 2.5
    assert cache[3, 1, 63].eq(2.5).all() and cache.sum().item() == 2.5 * 16 * 2 * 8
    assert zeros_on_first_touch((0, 4), dtype, torch.device("cpu")).shape == (0, 4)


def test_the_cache_starts_on_a_huge_page():
    # One fault maps 2 MiB of the cache where the OS gives huge pages: the mapping must start on
    # a huge-page boundary for the first 2 MiB to be one.
    from engine.weights.huge_pages import HUGE_PAGE

    cache = zeros_on_first_touch((2, 3, 1000, 16, 2, 8), torch.float32, torch.device("cpu"))
    assert cache.data_ptr() % HUGE_PAGE == 0 and cache.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_blocks_of_every_region_are_faulted_in_and_stay_zeros(dtype):
    from engine.kv_cache import fault_in_first_blocks

    # 2 layers x k|v regions of 2,000 blocks of 8 KiB (fp32): 16 MiB each, so the blocks far
    # from a region's start lie past any huge page its first blocks fault in.
    cache = zeros_on_first_touch((2, 2, 2000, 16, 2, 64), dtype, torch.device("cpu"))
    thread = fault_in_first_blocks(cache, num_blocks=8)
    if thread is None:
        pytest.skip("no CPU cache")
    thread.join()
    for layer in range(2):
        for kv in range(2):
            first, far = cache[layer, kv, :8], cache[layer, kv, 1500:1508]
            if not all(resident_pages(first)):
                pytest.skip("this kernel cannot populate (MADV_POPULATE_WRITE: Linux 5.14+)")
            assert not any(resident_pages(far))
    assert not cache.any()
    assert fault_in_first_blocks(torch.zeros(0, 2, 0, 16, 2, 64)) is None
