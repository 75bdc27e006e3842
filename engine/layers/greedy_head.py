"""The fp32 output head for a step that needs only each row's argmax, from half its bytes.

At one to a few rows the head is a read of its weights: SmolLM2's tied [49,152, 576] fp32 head is
113 MB of the step's 540. A greedy row without logprobs, bias or penalties needs only the largest
logit, so it reads each weight's upper 16 bits (its bf16 truncation, a copy made once) and bounds
what the lower 16 could change: |w - high(w)| < 2^-7 |w|, so a row's approximate logit is within
2^-7 * |x| . |w_v| <= 2^-7 * ||x|| * ||w_v|| (Cauchy-Schwarz; the row norms computed once) of its
fp32 value, plus both dot products' fp32 rounding. Every token whose interval reaches the best
lower bound is a candidate, and the candidates (a handful) get their exact fp32 logits from the
full weights: the argmax is the fp32 head's (up to the order of fp32 sums, as between any two
fp32 GEMMs). The logits returned are -inf outside the candidates, so only an argmax may read
them (`SamplingParams.needs_only_argmax`). The copy costs half the head again in memory (57 MB
for SmolLM2).

From a few rows on the head is no longer a read but multiply-adds (fp32 FMAs at the cores'
peak). Where the CPU has bf16 dot products (AVX512-BF16: twice the multiply-adds an
instruction), the first pass rounds x to bf16 too, which moves each logit by at most another
2^-8 * |x| . |high(w)| <= 2^-8 * ||x|| * ||w_v||: the same pass, the bound a half wider.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import cpu_ops
from engine.layers.linear import PackedLinear
from engine.weights.huge_pages import move_to_huge_pages

# bf16 keeps 8 of fp32's 24 significant bits: what truncation drops is under 2^-7 of |w|, and
# rounding to nearest moves x by at most 2^-8 of |x|.
TRUNCATION_ERROR = 2.0**-7
ROUNDING_X_ERROR = 2.0**-8
# Both dot products' fp32 rounding: under K * 2^-24 of |x| . |w| each (K = hidden size), well
# under this for K up to ~2,000; past that it grows with K. (bf16 dot products treat subnormal
# inputs as 0: under 2^-126 each, far below this for any hidden state a model makes.)
ROUNDING_ERROR = 2.0**-12
# Rows up to which the head's read bounds it, so half the bytes win. SmolLM2's head, Zen 4, 2
# threads, fp32 / greedy ms: 1 row 3.93 / 2.33, 2 rows 3.28 / 2.16, 4 rows 4.26 / 2.34, 8 rows
# 3.97 / 4.33 (there the fp32 head is in register tiles, and the first pass is not).
GREEDY_HEAD_MAX_ROWS = 4
# With bf16 dot products, rows up to which x rounded to bf16 wins: SmolLM2's head, Zen 4, ms,
# fp32 tiles / bf16 tiles (`bf16_dot_linear`): 8 rows 4.70 / 2.04, 16 rows 6.81 / 3.29, 32 rows
# 13.16 / 6.51, 64 rows 22.61 / 13.57.
BF16_DOTS_MAX_ROWS = 64


def high_halves(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [out, in]: each fp32 weight's upper 16 bits (sign, exponent, 7 mantissa bits)."""
    return (weight.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


class GreedyHead:
    """Argmax-only logits of an fp32 head. The head's fp32 weights come with each call: they
    move into huge pages while the model serves, and this keeps no reference to the old ones."""

    def __init__(self, weight: torch.Tensor, high: torch.Tensor | None = None,
                 has_bf16_dots: bool = False):
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError("an fp32 [vocab, hidden] head expected")
        self.high = high_halves(weight) if high is None else high
        self.weight_norms = weight.norm(dim=1)  # fp32 [vocab]
        self.rounding_error = ROUNDING_ERROR * max(1.0, weight.shape[1] / 2048)
        self.max_rows = BF16_DOTS_MAX_ROWS if has_bf16_dots else GREEDY_HEAD_MAX_ROWS

    def serves(self, num_rows: int) -> bool:
        return num_rows <= self.max_rows

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 [rows, vocab] from hidden [rows, in]: each row's candidates hold their exact
        logits (`weight` [vocab, in] fp32, the head's), every other token -inf."""
        hidden = hidden.float().contiguous()
        rounds_x = hidden.shape[0] > GREEDY_HEAD_MAX_ROWS
        approx = _approximate_logits(hidden, self.high, rounds_x)  # [rows, vocab]
        error = TRUNCATION_ERROR + self.rounding_error + (ROUNDING_X_ERROR if rounds_x else 0.0)
        if cpu_ops.is_loaded():  # the same, in one pass over the rows
            return torch.ops.llm_cpu.greedy_head_finish(approx, hidden, weight.contiguous(),
                                                        self.weight_norms, error)
        margins = (error * hidden.norm(dim=1, keepdim=True)) * self.weight_norms  # [rows, vocab]
        best_floor = (approx - margins).amax(dim=1, keepdim=True)
        rows, token_ids = (approx + margins >= best_floor).nonzero(as_tuple=True)
        exact = (hidden[rows] * weight[token_ids]).sum(dim=1)  # [candidates]
        out = torch.full_like(approx, float("-inf"))
        out[rows, token_ids] = exact
        return out


def _approximate_logits(hidden: torch.Tensor, high: torch.Tensor, rounds_x: bool) -> torch.Tensor:
    """hidden fp32 [rows, in] . high [vocab, in] in fp32; hidden rounded to bf16 if `rounds_x`."""
    if rounds_x:
        hidden_bf16 = hidden.bfloat16()
        if cpu_ops.is_loaded():
            return torch.ops.llm_cpu.bf16_dot_linear(hidden_bf16, high)
        return hidden_bf16.float() @ high.float().T
    if cpu_ops.is_loaded():
        return torch.ops.llm_cpu.small_batch_linear(hidden, high, None)
    return hidden @ high.float().T


def build_greedy_head(model: nn.Module, world_size: int) -> GreedyHead | None:
    """The greedy head of `model`'s fp32 output head (plain weights, one rank), its first pass's
    weights in huge pages as the head's are; None for any other head."""
    head = getattr(model, "lm_head", None)
    if (world_size != 1 or not isinstance(head, PackedLinear) or head.quantization is not None
            or head.weight.dtype != torch.float32):
        return None
    high = move_to_huge_pages([high_halves(head.weight)])[0]
    has_bf16_dots = cpu_ops.capability() == "AVX512" and torch.cpu._is_avx512_bf16_supported()
    return GreedyHead(head.weight, high, has_bf16_dots=has_bf16_dots)
