"""`resolve_dtype`: what "auto" means on each device, per CPU and weights."""

from pathlib import Path

import pytest
import torch

from engine import llm_engine
from engine.llm_engine import resolve_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_auto_is_fp32_on_the_cpu_for_float_activations(monkeypatch, native_bf16, quantization):
    monkeypatch.setattr(llm_engine, "has_native_bf16", lambda: native_bf16)
    assert resolve_dtype("auto", "bfloat16", CPU, quantization) == torch.float32


@pytest.mark.parametrize("quantization", ["w8a8", "w4a8"])
@pytest.mark.parametrize(("native_bf16", "expected"),
                         [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_with_int8_activations_is_bf16_where_the_cpu_has_it(monkeypatch, quantization,
                                                                 native_bf16, expected):
    monkeypatch.setattr(llm_engine, "has_native_bf16", lambda: native_bf16)
    assert resolve_dtype("auto", "float32", CPU, quantization) == expected


@pytest.mark.parametrize("quantization", [None, "w4a8"])
def test_an_explicit_dtype_is_kept(monkeypatch, quantization):
    monkeypatch.setattr(llm_engine, "has_native_bf16", lambda: True)
    assert resolve_dtype("float32", "bfloat16", CPU, quantization) == torch.float32
    assert resolve_dtype("float16", "bfloat16", GPU) == torch.float16


def test_auto_on_a_gpu_is_the_models_dtype():
    assert resolve_dtype("auto", "torch.float16", GPU) == torch.float16
    assert resolve_dtype("auto", "bfloat16", GPU) == torch.bfloat16
    assert resolve_dtype("auto", "int8", GPU) == torch.bfloat16  # not a float dtype: bf16


def test_has_native_bf16_matches_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split()
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert llm_engine.has_native_bf16() == expected
