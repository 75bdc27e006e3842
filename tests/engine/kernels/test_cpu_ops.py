"""The C++ CPU kernels (engine/kernels/cpu/) against the torch references, built on this machine.

Same inputs as the Triton tests: scattered blocks, contexts on and around block boundaries, a
1-token context, padded tables and padding slots; head sizes with a compiled-in loop (64, 128) and
the generic one (16, 80).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.kernels import cpu_ops, reference
from engine.layers.quantization import quantize_int4, quantize_int8
from tests.engine.kernels.test_kernels import (
    DTYPES,
    NUM_KV_HEADS,
    TOLERANCE,
    _paged_cache,
    _rel_error,
    decode_case,
    prefill_case,
)
from tests.polling import eventually


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    # CI machines have a compiler: no kernels there is a failure, not a skip.
    assert cpu_ops.load(), "the C++ CPU kernels did not build (see the log)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_attention_matches_reference(dtype, group, head_dim, block_size):
    query, k_cache, v_cache, tables, lens, scale, expected = decode_case(
        dtype, group, head_dim, block_size)
    actual = torch.ops.llm_cpu.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale)
    assert actual.dtype == dtype and actual.shape == query.shape
    assert _rel_error(actual, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
# 9: 18 query heads, more than the AVX-512 path takes in one task (the portable loop serves)
@pytest.mark.parametrize("group", [1, 3, 9])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_decode_attention_of_many_sequences_is_each_alone(dtype, group, head_dim):
    """Sequences enough for a task per sequence (every KV head in one walk; fewer take a task
    per KV head): the reference's output, and each sequence's own bit for bit."""
    torch.manual_seed(group)
    lens = [1, 15, 16, 17, 40, 100] * 3
    k_cache, v_cache, tables = _paged_cache(lens, 16, head_dim, dtype)
    query = torch.randn(len(lens), NUM_KV_HEADS * group, head_dim).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    attend = torch.ops.llm_cpu.paged_decode_attention
    together = attend(query, k_cache, v_cache, tables, context_lens, 0.125)
    expected = reference.paged_decode_attention_reference(
        query.float(), k_cache.float(), v_cache.float(), tables, context_lens, 0.125)
    assert _rel_error(together, expected) < TOLERANCE[dtype]
    for i in range(len(lens)):
        alone = attend(query[i:i + 1], k_cache, v_cache, tables[i:i + 1], context_lens[i:i + 1],
                       0.125)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("is_long", [False, True])
def test_cpu_backends_prefill_matches_reference(dtype, group, head_dim, block_size, is_long,
                                                 monkeypatch):
    """Prefill chunks through the decode kernel (a query per token, its context ending at
    itself), and past `MAX_KERNEL_CONTEXT` through the reference: the reference's output."""
    from engine.kernels import cpu_backend

    if is_long:
        monkeypatch.setattr(cpu_backend, "MAX_KERNEL_CONTEXT", 4)
    query, k_cache, v_cache, cu, lens, tables, scale, expected = prefill_case(
        dtype, group, head_dim, block_size)
    actual = cpu_backend.CpuBackend().prefill(query, k_cache, v_cache, cu, lens, tables, scale,
                                              int((cu[1:] - cu[:-1]).max()))
    assert actual.dtype == dtype and actual.shape == query.shape
    assert _rel_error(actual, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_store_kv_matches_reference(dtype, head_dim):
    k_cache, v_cache, _ = _paged_cache([48], 16, head_dim, dtype)
    num_tokens = 9
    key = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, head_dim).to(dtype)
    slots = torch.randperm(k_cache.shape[0] * 16)[:num_tokens]
    slots[[2, 5]] = -1  # padding
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv_reference(key, value, expected_k, expected_v, slots)
    torch.ops.llm_cpu.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_read_slices_of_the_fused_projection(dtype):
    """q, k and v as the model makes them, slices of one qkv row each (rows apart by the fused
    width), read in place: what dense copies of them give, bit for bit. Heads that are not dense
    within a row (a transpose) are copied first, and give the same too."""
    group, head_dim = 3, 64
    lens = [1, 17, 40, 100]
    k_cache, v_cache, tables = _paged_cache(lens, 16, head_dim, dtype)
    num_heads, kv_size = NUM_KV_HEADS * group, NUM_KV_HEADS * head_dim
    qkv = torch.randn(len(lens), num_heads * head_dim + 2 * kv_size).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, kv_size, kv_size], dim=1)
    q, k, v = (t.view(len(lens), -1, head_dim) for t in (q, k, v))
    slots = torch.tensor([0, 40, 90, -1])
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(3)]
    torch.ops.llm_cpu.store_kv(k, v, *caches[0], slots)
    torch.ops.llm_cpu.store_kv(k.contiguous(), v.contiguous(), *caches[1], slots)
    k_t = k.transpose(0, 1).contiguous().transpose(0, 1)  # heads not dense within a row
    torch.ops.llm_cpu.store_kv(k_t, v, *caches[2], slots)
    assert all(torch.equal(a, b) for c in caches[1:] for a, b in zip(caches[0], c, strict=True))
    context_lens = torch.tensor(lens, dtype=torch.int32)
    attend = torch.ops.llm_cpu.paged_decode_attention
    in_place = attend(q, k_cache, v_cache, tables, context_lens, 0.125)
    assert torch.equal(in_place, attend(q.contiguous(), k_cache, v_cache, tables, context_lens,
                                        0.125))
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(in_place, attend(q_t, k_cache, v_cache, tables, context_lens, 0.125))


def test_kernels_refuse_bad_arguments():
    k_cache, v_cache, tables = _paged_cache([20], 16, 64, torch.float32)
    query = torch.randn(1, 2, 64)
    lens = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.llm_cpu.paged_decode_attention(query.half(), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.llm_cpu.paged_decode_attention(query[..., :32], k_cache, v_cache, tables, lens,
                                                 0.1)
    with pytest.raises(RuntimeError, match="one slot per new token"):
        torch.ops.llm_cpu.store_kv(torch.randn(3, 2, 64), torch.randn(3, 2, 64), k_cache, v_cache,
                                   torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llm_cpu.store_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), k_cache, v_cache,
                                   torch.tensor([10**6]))


def test_library_name_changes_with_the_capability():
    names = {cpu_ops.library_name(cap) for cap in cpu_ops.CAPABILITY_FLAGS}
    assert len(names) == len(cpu_ops.CAPABILITY_FLAGS)
    assert cpu_ops.capability().lower() in cpu_ops.library_name(cpu_ops.capability())


@pytest.mark.parametrize("extensions_dir", [None, "/tmp/some/extensions"])
def test_the_library_is_where_torchs_builder_puts_it(extensions_dir, monkeypatch):
    # cpu_ops finds the folder without importing cpp_extension (setuptools: 0.2 s on a cold
    # start's first request); the builder it calls must agree.
    from torch.utils import cpp_extension

    if extensions_dir is None:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", extensions_dir)
    monkeypatch.setattr(os, "makedirs", lambda *args, **kwargs: None)  # it creates the folder
    name = cpu_ops.library_name(cpu_ops.capability())
    expected = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    assert cpu_ops.library_path(cpu_ops.capability()) == expected


def _processes_working_in(folder: Path) -> list[str]:
    """The command names of the processes whose working directory is under `folder` (ninja
    and the compilers it runs work in the library's build folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append((proc / "comm").read_text().strip())
        except (OSError, ValueError):
            continue  # not a process, or gone already
    return found


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux's /proc")
def test_a_killed_servers_build_takes_its_compilers_with_it(tmp_path):
    # A server stopped while it builds the kernels must leave no compiler behind: each ran on to
    # the end of its file (10-20 s), beside the next start's build of the same library. Killed
    # with the server, they are gone at once; 10 s is the bound (shorter than one file's build).
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "from engine.kernels import cpu_ops; cpu_ops.build(cpu_ops.capability())"
    server = subprocess.Popen([sys.executable, "-c", code], env=env,
                              cwd=Path(__file__).resolve().parents[3])
    try:
        assert eventually(lambda: "cc1plus" in _processes_working_in(tmp_path), 120), \
            "no compiler started"
    finally:
        server.kill()
        server.wait(30)
    assert eventually(lambda: not _processes_working_in(tmp_path), 10), \
        _processes_working_in(tmp_path)


def test_engine_serves_on_the_references_until_the_kernels_load(tiny_llama_dir, monkeypatch):
    from engine import LLM, SamplingParams

    monkeypatch.setattr(cpu_ops, "_is_loaded", False)  # as on a start with nothing loaded yet
    llm = LLM(tiny_llama_dir, max_num_seqs=2)
    runner = llm.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(30, 70))]
    before = [o.token_ids for o in llm.generate(prompts, params)]  # on either backend
    for _ in range(600):  # a liveness bound (the library is cached): not a timing assert
        if runner.backend.name == "cpu":
            break
        threading.Event().wait(0.1)
    assert runner.backend.name == "cpu"
    assert [o.token_ids for o in llm.generate(prompts, params)] == before


# 1-7: one pass of the kernel; fp16 8+: chunks of 8 rows (9, 19: the last one shorter); fp32 8+
# with in_features a multiple of 16, and bf16 8+ with a multiple of 32 where the CPU has bf16 dot
# products: tiles of 4 weight rows x chunks of up to 6 rows (12: two whole chunks; 8, 9, 19, 32:
# a shorter last one), the 37th weight row past the last tile.
ROWS = [0, 1, 2, 3, 4, 7, 8, 9, 12, 19, 32]


@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features", [64, 40, 576])  # 40: a tail shorter than one vector
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_batch_linear_matches_f_linear(weight_dtype, rows, in_features, with_bias):
    weight = (torch.randn(37, in_features) / in_features**0.5).to(weight_dtype)
    bias = torch.randn(37).to(weight_dtype) if with_bias else None
    x = torch.randn(rows, in_features).to(weight_dtype)
    expected = torch.nn.functional.linear(
        x.float(), weight.float(), None if bias is None else bias.float())
    actual = torch.ops.llm_cpu.small_batch_linear(x, weight, bias)
    assert actual.dtype == weight_dtype and actual.shape == (rows, 37)
    if rows:
        assert _rel_error(actual, expected) < TOLERANCE[weight_dtype]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features", [64, 40, 576])
def test_bf16_weights_under_fp32_rows_give_fp32(rows, in_features):
    # The greedy head's first pass: each bf16 weight widened exactly, x and the sums in fp32.
    weight = (torch.randn(37, in_features) / in_features**0.5).bfloat16()
    x = torch.randn(rows, in_features)
    actual = torch.ops.llm_cpu.small_batch_linear(x, weight, None)
    assert actual.dtype == torch.float32 and actual.shape == (rows, 37)
    if rows:
        assert _rel_error(actual, x.double() @ weight.double().T) < 1e-6


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features", [64, 40, 576])
def test_bf16_dots_give_fp32(rows, in_features):
    # The greedy head's first pass from 8 rows on: bf16 x and weights, each product exact in fp32.
    weight = (torch.randn(37, in_features) / in_features**0.5).bfloat16()
    x = torch.randn(rows, in_features).bfloat16()
    actual = torch.ops.llm_cpu.bf16_dot_linear(x, weight)
    assert actual.dtype == torch.float32 and actual.shape == (rows, 37)
    if rows:
        assert _rel_error(actual, x.double() @ weight.double().T) < 1e-6


@pytest.mark.parametrize("bad_block", [-1, 10_000])
def test_decode_attention_refuses_a_context_outside_the_cache(bad_block):
    # A padding or stale id inside a context is an error, not a read outside the cache.
    k_cache = torch.zeros(4, 16, NUM_KV_HEADS, 64)
    query = torch.randn(1, 2 * NUM_KV_HEADS, 64)
    table = torch.tensor([[0, bad_block]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llm_cpu.paged_decode_attention(query, k_cache, k_cache, table,
                                                 torch.tensor([20], dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.llm_cpu.paged_decode_attention(query, k_cache, k_cache, table,
                                                 torch.tensor([33], dtype=torch.int32), 0.125)
    # the context's own blocks are all that is checked: padding after it is fine
    out = torch.ops.llm_cpu.paged_decode_attention(query, k_cache, k_cache, table,
                                                   torch.tensor([16], dtype=torch.int32), 0.125)
    assert out.shape == query.shape


def _rounds_activations_to_int16(in_features: int) -> bool:
    """The AVX2 build's int8 kernel, for rows in groups of 32 (gemv.cpp)."""
    return cpu_ops.capability() == "AVX2" and in_features % 32 == 0


def _quantized_linear_inputs(rows: int, in_features: int, dtype: torch.dtype, with_bias: bool
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [rows, in_features] and a bias [37] or None, for a layer of 37 outputs."""
    bias = torch.randn(37).to(dtype) if with_bias else None
    x = torch.randn(rows, in_features).to(dtype)
    if rows:
        x[0, 3] = 40.0  # an outlier: its group's other values get fewer int16 steps
    return x, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
# groups of 32 (64, 576), and one group of 40: not a multiple of the vector, the scalar loop
@pytest.mark.parametrize("in_features", [64, 40, 576])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_small_batch_linear_matches_reference(dtype, rows, in_features, with_bias):
    torch.manual_seed(rows * 1000 + in_features)
    qweight, scale = quantize_int8(torch.randn(37, in_features) / in_features**0.5)
    x, bias = _quantized_linear_inputs(rows, in_features, dtype, with_bias)
    actual = torch.ops.llm_cpu.int8_small_batch_linear(x, qweight, scale, bias)
    assert actual.dtype == dtype and actual.shape == (rows, 37)
    if not rows:
        return
    exact_x = reference.int8_linear_reference(x, qweight, scale, bias)
    if _rounds_activations_to_int16(in_features):
        rounded_x = reference.int8_int16_linear_reference(x, qweight, scale, bias)
        assert _rel_error(actual, rounded_x) < TOLERANCE[dtype]
        # What rounding x to int16 costs: far below the int8 weights' own rounding (~4e-3).
        assert _rel_error(actual, exact_x) < max(1e-4, TOLERANCE[dtype])
    else:
        assert _rel_error(actual, exact_x) < TOLERANCE[dtype]


def test_int16_rounding_of_the_activations_is_what_the_reference_says():
    """The reference's rounding itself, on values whose int16 steps are known."""
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2] = 2.0, -1.0, 2.0 / 32767 * 0.5  # a tie: rounds to even (0)
    q, scale = reference.quantize_rows_int16(x)
    assert q[0, :3].tolist() == [32767, -16384, 0] and scale[0, 1] == 0  # an all-zero group
    torch.testing.assert_close(scale[0, 0], torch.tensor(2.0 / 32767))


def test_int8_small_batch_linear_refuses_bad_arguments():
    qweight, scale = quantize_int8(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match=r"input \[rows, in\]"):
        torch.ops.llm_cpu.int8_small_batch_linear(torch.randn(1, 9), qweight, scale, None)
    with pytest.raises(RuntimeError, match="contiguous int8"):
        torch.ops.llm_cpu.int8_small_batch_linear(torch.randn(1, 8), qweight.float(), scale, None)
    with pytest.raises(RuntimeError, match="groups dividing the row"):
        torch.ops.llm_cpu.int8_small_batch_linear(torch.randn(1, 8), qweight, scale[:2], None)
    with pytest.raises(RuntimeError, match="groups dividing the row"):
        torch.ops.llm_cpu.int8_small_batch_linear(torch.randn(1, 8), qweight,
                                                  torch.ones(3, 3), None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
# 32: one group; 96: a pair of groups and one more; 576 (SmolLM2's hidden size): 18 groups, the
# minimums' loop over 8 groups at a time and a tail
@pytest.mark.parametrize("in_features", [32, 96, 576])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_small_batch_linear_matches_reference(dtype, rows, in_features, with_bias):
    torch.manual_seed(rows * 1000 + in_features)
    packed, step_min = quantize_int4(torch.randn(37, in_features) / in_features**0.5 + 0.01)
    x, bias = _quantized_linear_inputs(rows, in_features, dtype, with_bias)
    actual = torch.ops.llm_cpu.int4_small_batch_linear(x, packed, step_min, bias)
    assert actual.dtype == dtype and actual.shape == (rows, 37)
    if rows:
        expected = reference.int4_linear_reference(x, packed, step_min, bias)
        assert _rel_error(actual, expected) < TOLERANCE[dtype]


def test_int4_small_batch_linear_refuses_bad_arguments():
    packed, step_min = quantize_int4(torch.randn(3, 64))
    with pytest.raises(RuntimeError, match="a multiple of 32"):
        torch.ops.llm_cpu.int4_small_batch_linear(torch.randn(1, 32), packed, step_min, None)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        torch.ops.llm_cpu.int4_small_batch_linear(torch.randn(1, 64), packed.to(torch.int8),
                                                  step_min, None)
    with pytest.raises(RuntimeError, match="step_min"):
        torch.ops.llm_cpu.int4_small_batch_linear(torch.randn(1, 64), packed, step_min.float(),
                                                  None)
    with pytest.raises(RuntimeError, match="step_min"):
        torch.ops.llm_cpu.int4_small_batch_linear(torch.randn(1, 64), packed, step_min[:, :2],
                                                  None)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernels_match_on_the_other_instruction_sets(capability):
    # The image carries a library per instruction set; this machine runs the lower ones when
    # torch is told to (ATEN_CPU_CAPABILITY), so each is checked against the references here.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    probe = "from engine.kernels import cpu_ops; print(cpu_ops.capability())"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip()
    assert found == capability.upper()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         str(Path(__file__).with_name("test_cpu_fused_ops.py")),
         str(Path(__file__).with_name("test_cpu_w8a8.py")),
         str(Path(__file__).with_name("test_cpu_w4a8.py")),
         str(Path(__file__).parents[1] / "layers" / "test_greedy_head.py"),
         str(Path(__file__).parents[1] / "layers" / "test_lossless.py"),
         "-k", "matches_reference or matches_f_linear or matches_apply_rotary or paths_agree"
         " or give_fp32 or argmax_is_the_fp32_heads or finishes_as_the_torch_reference"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
