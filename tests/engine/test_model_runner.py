"""The KV cache's memory: zeros that cost nothing until touched, alive as long as the tensor."""

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
