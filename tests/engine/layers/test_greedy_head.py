"""The greedy head's argmax is the fp32 head's, even where only the weights' lower halves decide
it, on the C++ kernel and on the torch reference; the engine's greedy tokens and everything else
it returns are those of the full head."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels import cpu_ops
from engine.layers.greedy_head import GreedyHead, high_halves


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


# 1-4: x in fp32 under the truncated weights; 5+: x rounded to bf16 too (from 8 on the kernel's
# tiles, where the hidden size is a multiple of 32; 13 and 33 rows leave a shorter last chunk).
@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 13, 33])
@pytest.mark.parametrize("hidden_size", [64, 40, 576])
def test_argmax_is_the_fp32_heads(use_kernels, rows, hidden_size, monkeypatch):
    if use_kernels and not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    monkeypatch.setattr(cpu_ops, "is_loaded", lambda: use_kernels)
    num_misranked = 0  # rows whose first pass alone would choose another token
    for seed in range(10):
        # 97 x 7 = 679 tokens: the last weight rows past the kernel's tiles of 4.
        weight = _rivals(num_distinct=97, copies=7, hidden_size=hidden_size, seed=seed)
        hidden = torch.randn(rows, hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
        exact = hidden.double() @ weight.double().T  # [rows, vocab]
        logits = GreedyHead(weight).logits(hidden, weight)
        expected = exact.argmax(dim=1)
        assert torch.equal(logits.argmax(dim=1), expected)
        num_misranked += int((high_halves(weight).double() @ hidden.double().T).argmax(dim=0)
                             .ne(expected).sum())
        chosen = logits.gather(1, expected[:, None]).double()
        assert torch.allclose(chosen, exact.gather(1, expected[:, None]), rtol=1e-5, atol=1e-5)
        # The candidates: far from the whole vocabulary.
        num_candidates = (logits > float("-inf")).sum(dim=1)
        assert (num_candidates < weight.shape[0] // 4).all()
    assert num_misranked >= rows  # the copies do test the second pass


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_kernel_finishes_as_the_torch_reference(rows, monkeypatch):
    # The second pass in C++ keeps the reference's candidates and gives their exact logits.
    if not cpu_ops.load():
        pytest.skip("no C++ kernels here")
    weight = _rivals(num_distinct=97, copies=7, hidden_size=576, seed=rows)
    hidden = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * 3
    head = GreedyHead(weight)
    actual = head.logits(hidden, weight)
    monkeypatch.setattr(cpu_ops, "is_loaded", lambda: False)
    expected = head.logits(hidden, weight)
    is_candidate = expected > float("-inf")
    # The first passes differ only in the order of their fp32 sums: the same candidates bar
    # ties at the boundary, which both keep within the margin.
    assert torch.equal(actual > float("-inf"), is_candidate)
    assert torch.allclose(actual[is_candidate], expected[is_candidate], rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_tokens_are_the_full_heads(tiny_model_dirs, kind, monkeypatch):
    llm = LLM(tiny_model_dirs[kind], dtype="float32")
    llm.engine.runner.wait_for_weight_mover()
    expected = _generate(llm, use_head=False, monkeypatch=monkeypatch)
    assert _generate(llm, use_head=True, monkeypatch=monkeypatch) == expected
    assert llm.engine.runner.greedy_head is not None  # it served
    logprobs = [entry["logprob"] for _, lp in expected if lp for entry in lp]
    assert logprobs and all(v > float("-inf") for v in logprobs)


def test_no_greedy_head_for_a_quantized_head(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", quantization="int8")
    llm.engine.runner.wait_for_weight_mover()
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))
    assert llm.engine.runner.greedy_head is None
