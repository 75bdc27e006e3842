"""The KV cache's memory: zeros that cost nothing until touched, alive as long as the tensor,
from a huge-page boundary."""

from __future__ import annotations

import gc

import pytest
import torch

from engine.model_runner import zeros_on_first_touch


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
