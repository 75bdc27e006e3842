"""Fixtures shared by the C++ kernel tests."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops

INT8_PATHS = ("scalar", "avx2", "vnni")


def available_int8_paths() -> list[str]:
    """The int8-activation kernels' paths this CPU and build have (the best last)."""
    assert cpu_ops.load(), "the C++ CPU kernels did not build (see the log)"
    best = torch.ops.llm_cpu.int8_activation_path()
    return list(INT8_PATHS[: INT8_PATHS.index(best) + 1])


def on_each_int8_path(run) -> dict:
    """run()'s result on each path this machine has, {path: result}; the best path back after."""
    paths = available_int8_paths()
    results = {}
    try:
        for path in paths:
            torch.ops.llm_cpu.int8_activation_path(path)
            results[path] = run()
    finally:
        torch.ops.llm_cpu.int8_activation_path(paths[-1])
    return results


@pytest.fixture(params=INT8_PATHS)
def int8_path(request):
    """Each path of the w8a8/w4a8 kernels in turn (skipped where the CPU lacks it), the best one
    back afterwards."""
    paths = available_int8_paths()
    if request.param not in paths:
        pytest.skip(f"no {request.param} path on this CPU")
    torch.ops.llm_cpu.int8_activation_path(request.param)
    yield request.param
    torch.ops.llm_cpu.int8_activation_path(paths[-1])
