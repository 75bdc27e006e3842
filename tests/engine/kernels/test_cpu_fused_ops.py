"""The C++ fused elementwise ops (engine/kernels/cpu/fused_ops.cpp) against the torch code the
model runs without them: the same values, reduced-precision rounding included (within one unit
in the last place: the kernels and torch may sum a row in a different order)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_ops, reference
from engine.layers.rotary import apply_rotary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol): two units in the last place of the reduced precisions (a sum or exp in another
# order may land across a rounding boundary, and the residual's sum is rounded before the norm
# reads it: one unit each), fp32's summation-order noise.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-6, 1e-2),
             torch.float16: (2**-9, 1e-3)}


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    assert cpu_ops.load(), "the C++ CPU kernels did not build (see the log)"


@pytest.fixture(autouse=True)
def seeded():
    """The same inputs whichever tests ran before (this file also runs in a child process per
    instruction set, tests/engine/kernels/test_cpu_ops.py)."""
    torch.manual_seed(0)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    if expected.dtype != torch.float32:
        # Rounded at the same points as torch: nearly every element is bit-identical.
        assert (actual == expected).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
@pytest.mark.parametrize("hidden", [576, 40])  # 40: shorter than one vector of the kernel
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, num_tokens, hidden, with_residual):
    x = torch.randn(num_tokens, hidden).to(dtype)
    residual = torch.randn(num_tokens, hidden).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    expected_residual = None if residual is None else residual.clone()
    expected = reference.add_rms_norm_reference(x, expected_residual, weight, 1e-5)
    actual = torch.ops.llm_cpu.rms_norm(x, residual, weight, 1e-5)
    _assert_close(actual, expected)
    if with_residual:  # updated in place to x + residual, rounded to the dtype
        assert torch.equal(residual, expected_residual)


def test_rms_norm_reads_strided_rows():
    wide = torch.randn(5, 96)
    x = wide[:, :64]  # rows 96 apart, as a slice of a larger output
    weight = torch.rand(64)
    _assert_close(torch.ops.llm_cpu.rms_norm(x, None, weight, 1e-6),
                  reference.add_rms_norm_reference(x, None, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 16)])
def test_rotary_embedding_matches_apply_rotary(dtype, num_tokens, num_heads, num_kv_heads,
                                               head_dim):
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # q and k as the model has them: views into one fused qkv output, in place
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size).to(dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
    angles = torch.rand(num_tokens, 1, head_dim // 2) * 100  # positions up to ~100
    cos, sin = angles.cos(), angles.sin()
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    before_v = qkv[:, q_size + kv_size:].clone()
    torch.ops.llm_cpu.rotary_embedding(q, k, cos, sin)
    _assert_close(q, expected_q)
    _assert_close(k, expected_k)
    assert torch.equal(qkv[:, q_size + kv_size:], before_v)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("n", [1536, 24])  # 24: a vector tail
def test_silu_and_mul_matches_reference(dtype, num_tokens, n):
    x = (3 * torch.randn(num_tokens, 2 * n)).to(dtype)
    _assert_close(torch.ops.llm_cpu.silu_and_mul(x), reference.silu_and_mul_reference(x))


def test_fused_ops_refuse_bad_arguments():
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.llm_cpu.rms_norm(torch.randn(2, 8), None, torch.ones(8, dtype=torch.bfloat16),
                                   1e-6)
    with pytest.raises(RuntimeError, match="residual must match"):
        torch.ops.llm_cpu.rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="cos and sin"):
        torch.ops.llm_cpu.rotary_embedding(torch.randn(1, 2, 8), torch.randn(1, 1, 8),
                                           torch.randn(1, 1, 3), torch.randn(1, 1, 3))
    with pytest.raises(RuntimeError, match="2 \\* n"):
        torch.ops.llm_cpu.silu_and_mul(torch.randn(2, 7))


@pytest.mark.parametrize("num_rows", [1, 3, 32])
def test_argmax_rows_is_torchs_argmax(num_rows):
    """First index of the largest value, ties included; -inf rows (every token banned but one)."""
    torch.manual_seed(num_rows)
    x = torch.randn(num_rows, 1000)
    x[0, 10] = x[0, 500] = 50.0  # a tie: the first wins
    x[-1, :] = float("-inf")
    x[-1, 999] = 0.0
    assert torch.equal(cpu_ops.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(torch.ops.llm_cpu.argmax_rows(x), x.argmax(dim=-1))


def test_argmax_rows_of_nan_stays_in_range():
    x = torch.full((2, 64), float("nan"))
    assert all(0 <= i < 64 for i in torch.ops.llm_cpu.argmax_rows(x).tolist())
