"""The greedy head's argmax is the fp32 head's, even where only the weights' lower halves decide
it, on the C++ kernel and on the torch reference; the engine's greedy tokens and everything else
it returns are those of the full head."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels import cpu_ops
from engine.layers import greedy_head
from engine.layers.greedy_head import Bf16FirstPass, GreedyHead, Int8FirstPass, high_halves
from engine.layers.quantization import dequantize_int8, quantize_int8


def _rivals(num_distinct: int, copies: int, hidden_size: int, seed: int) -> torch.Tensor:
    """fp32 [num_distinct * copies, hidden]: each distinct row `copies` times, each copy's upper
    halves a bf16 step apart here and there and its lower 16 bits random, so that the first pass
    often ranks the copies otherwise than the exact logits do."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_distinct, hidden_size, generator=g) / hidden_size**0.5
    high = base.repeat_interleave(copies, dim=0).view(torch.int32) >> 16
    high += torch.randint(-1, 2, high.shape, generator=g, dtype=torch.int32)
    low = torch.randint(0, 1 << 16, high.shape, generator=g, dtype=torch.int32)
    return ((high << 16) | low).view(torch.float32)


def _int8_rivals(num_distinct: int, copies: int, hidden_size: int, seed: int) -> torch.Tensor:
    """The same for the int8 first pass: each copy of a distinct row up to an int8 step from it,
    each weight anywhere in that range, so that the copies' rounded weights often rank them
    otherwise than their exact ones (each group's largest weight, its scale, left alone)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_distinct, hidden_size, generator=g) / hidden_size**0.5
    qweight, scale = quantize_int8(base)
    grid = dequantize_int8(qweight, scale, torch.float32).repeat_interleave(copies, dim=0)
    steps = scale.repeat_interleave(copies, dim=0).repeat_interleave(32, dim=1)  # [vocab, in]
    nudge = (torch.rand(grid.shape, generator=g) * 2 - 1) * steps
    is_largest = grid.abs() == grid.abs().view(grid.shape[0], -1, 32).amax(2).repeat_interleave(
        32, dim=1)
    return torch.where(is_largest, grid, grid + nudge)  # each group's largest keeps its scale


FIRST_PASSES = {
    "bf16": lambda weight: Bf16FirstPass(weight, None, has_bf16_dots=False),
    "int8": Int8FirstPass,
}
RIVALS = {"bf16": _rivals, "int8": _int8_rivals}


# bf16: 1-4 rows x in fp32 under the truncated weights; 5+ x rounded to bf16 too (from 8 on the
# kernel's tiles, where the hidden size is a multiple of 32; 13 and 33 rows leave a shorter last
# chunk). int8: 7 and 33 rows leave a shorter last block of 4 rows.
@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 13, 33])
@pytest.mark.parametrize(("kind", "hidden_size"),
                         [("bf16", 64), ("bf16", 40), ("bf16", 576), ("int8", 64), ("int8", 576)])
def test_argmax_is_the_fp32_heads(use_kernels, rows, kind, hidden_size, monkeypatch):
    if use_kernels and not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    monkeypatch.setattr(cpu_ops, "is_loaded", lambda: use_kernels)
    num_misranked = 0  # rows whose first pass alone would choose another token
    for seed in range(10):
        # bf16: 97 x 7 = 679 tokens, the last weight rows past the kernel's tiles of 4; int8:
        # 98 x 8 = 784, whole tiles of 16 as its packing needs.
        shape = (97, 7) if kind == "bf16" else (98, 8)
        weight = RIVALS[kind](*shape, hidden_size=hidden_size, seed=seed)
        hidden = torch.randn(rows, hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
        exact = hidden.double() @ weight.double().T  # [rows, vocab]
        head = GreedyHead(weight, FIRST_PASSES[kind](weight))
        logits = head.logits(hidden, weight)
        expected = exact.argmax(dim=1)
        assert torch.equal(logits.argmax(dim=1), expected)
        approx, _ = head.first_pass(hidden)
        num_misranked += int(approx.argmax(dim=1).ne(expected).sum())
        chosen = logits.gather(1, expected[:, None]).double()
        assert torch.allclose(chosen, exact.gather(1, expected[:, None]), rtol=1e-5, atol=1e-5)
        # The candidates: far from the whole vocabulary.
        num_candidates = (logits > float("-inf")).sum(dim=1)
        assert (num_candidates < weight.shape[0] // 4).all()
    assert num_misranked >= rows  # the copies do test the second pass


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_kernel_finishes_as_the_torch_reference(kind, rows, monkeypatch):
    # The second pass in C++ keeps the reference's candidates and gives their exact logits.
    if not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    weight = RIVALS[kind](98, 8, hidden_size=576, seed=rows)
    hidden = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * 3
    head = GreedyHead(weight, FIRST_PASSES[kind](weight))
    actual = head.logits(hidden, weight)
    monkeypatch.setattr(cpu_ops, "is_loaded", lambda: False)
    expected = head.logits(hidden, weight)
    is_candidate = expected > float("-inf")
    # The first passes differ only in the order of their fp32 sums: the same candidates bar
    # ties at the boundary, which both keep within the margin.
    assert torch.equal(actual > float("-inf"), is_candidate)
    assert torch.allclose(actual[is_candidate], expected[is_candidate], rtol=1e-6, atol=1e-6)


def test_int8_rounding_norms_are_the_references(monkeypatch):
    # ||x|| and what rounding x to int8 per group drops, as the w8a8 kernel rounds x.
    if not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    hidden = torch.randn(9, 576, generator=torch.Generator().manual_seed(0)) * 3
    hidden[2, :32] = 0.0  # a group of zeros: nothing dropped
    actual = torch.ops.llm_cpu.int8_rounding_norms(hidden)
    monkeypatch.setattr(cpu_ops, "is_loaded", lambda: False)
    expected = greedy_head._int8_rounding_norms(hidden)
    assert torch.allclose(actual, expected, rtol=1e-6, atol=0)
    assert torch.allclose(actual[:, 0], hidden.norm(dim=1), rtol=1e-5)
    assert (actual[:, 1] > 0).all() and (actual[:, 1] < actual[:, 0] * 0.02).all()


@pytest.mark.parametrize("use_kernels", [True, False])
def test_int8_bound_holds_where_the_weights_rounding_decides(use_kernels, monkeypatch):
    # Token a rounds to int8 weights one notch below b's, but what rounding dropped from a's
    # weights (0.4 of a step each) lies along x, which sits on the int8 grid (so that only the
    # weights' term of the bound covers the gap): exact a > b by ~23 steps, first pass b > a by 2.
    if use_kernels and not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    monkeypatch.setattr(cpu_ops, "is_loaded", lambda: use_kernels)
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (64,), generator=g) * 2.0 - 1.0
    step = 0.5 / 127
    grid = 20 * step * signs  # a's rounded weights: each group's first at 127 steps, the rest 20
    grid[::32] = 127 * step
    drop = 0.4 * step * signs
    drop[::32] = 0.0
    x = signs.clone()
    x[::32] = 1.0  # |x| = 1 everywhere: x is its own rounding to int8
    token_a = grid + drop
    token_b = grid.clone()
    token_b[1] += 2 * step * signs[1]
    weight = torch.stack([token_a, token_b] + [-grid] * 14)  # 16 tokens: one packed tile
    exact = x @ weight.T
    assert exact[0] > exact[1] + 20 * step
    head = GreedyHead(weight, Int8FirstPass(weight))
    approx, _ = head.first_pass(x[None])
    assert approx[0, 1] > approx[0, 0] + step
    assert head.logits(x[None], weight).argmax().item() == 0


def test_high_halves_are_the_truncation_to_bf16():
    weight = torch.randn(64, 32) * 10
    high = high_halves(weight)
    assert high.dtype == torch.bfloat16
    # Truncation, not rounding: toward zero, under 2^-7 of each weight away.
    error = weight - high.float()
    assert (error * weight >= 0).all() and (error.abs() < weight.abs() * 2**-7).all()
    low = weight.view(torch.int32) & 0xFFFF
    rebuilt = (high.view(torch.int16).to(torch.int32) << 16) | low
    assert torch.equal(rebuilt.view(torch.float32), weight)


def test_rejects_other_heads():
    with pytest.raises(ValueError, match="fp32"):
        GreedyHead(torch.randn(8, 4).bfloat16())


def _generate(llm: LLM, use_head: bool, monkeypatch) -> list[tuple]:
    monkeypatch.setattr(GreedyHead, "serves", lambda self, num_rows: use_head)
    # 3 rows: x in fp32; 9: x rounded to bf16 (in the kernel's tiles where the CPU has bf16 dots).
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    prompts += [[17 + i, 40 + i, 90 + i] for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(prompts, greedy)
    # A row asking for logprobs takes the whole step to the full head.
    mixed = [greedy, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True)]
    outputs += llm.generate(prompts[:3], mixed)
    return [(o.token_ids, o.outputs[0].logprobs) for o in outputs]


@pytest.mark.parametrize("first_pass", ["bf16", "int8"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_tokens_are_the_full_heads(tiny_model_dirs, kind, first_pass, monkeypatch):
    monkeypatch.setattr(greedy_head, "has_int8_dots", lambda: first_pass == "int8")
    llm = LLM(tiny_model_dirs[kind], dtype="float32")
    llm.engine.runner.wait_for_weight_mover()
    expected = _generate(llm, use_head=False, monkeypatch=monkeypatch)
    assert _generate(llm, use_head=True, monkeypatch=monkeypatch) == expected
    head = llm.engine.runner.greedy_head
    assert head is not None  # it served
    expected_pass = Int8FirstPass if first_pass == "int8" else Bf16FirstPass
    assert isinstance(head.first_pass, expected_pass)
    logprobs = [entry["logprob"] for _, lp in expected if lp for entry in lp]
    assert logprobs and all(v > float("-inf") for v in logprobs)


def test_no_greedy_head_for_a_quantized_head(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", quantization="int8")
    llm.engine.runner.wait_for_weight_mover()
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))
    assert llm.engine.runner.greedy_head is None
