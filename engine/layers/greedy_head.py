"""The fp32 output head for a step that needs only each row's argmax, from a fraction of its bytes.

At one to a few rows the head is a read of its weights: SmolLM2's tied [49,152, 576] fp32 head is
113 MB of the step's 540. A greedy row without logprobs, bias or penalties needs only the largest
logit, so a first pass computes approximate logits from a smaller copy of the weights (made once)
and bounds each one's distance from its fp32 value: token v's margin in row r is a sum of a row's
scale times a token's norm (Cauchy-Schwarz: |x . (w - w')| <= ||x|| * ||w - w'||). Every token
whose interval reaches the best lower bound is a candidate, and the candidates (a handful) get
their exact fp32 logits from the full weights: the argmax is the fp32 head's (up to the order of
fp32 sums, as between any two fp32 GEMMs). The logits returned are -inf outside the candidates,
so only an argmax may read them (`SamplingParams.needs_only_argmax`).

Two first passes:
- `Int8FirstPass`, where the CPU has VNNI byte dot products: the weights rounded to int8 per group
  of 32 and x too, through the w8a8 kernel. A quarter of the bytes, and 4x an FMA's multiply-adds.
- `Bf16FirstPass` elsewhere: each weight's upper 16 bits (bf16 truncation), half the bytes; from
  a few rows on, where the CPU has bf16 dot products, x rounded to bf16 too.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import cpu_ops
from engine.kernels.reference import w8a8_linear_reference
from engine.layers.linear import PackedLinear
from engine.layers.quantization import (
    GROUP_SIZE,
    can_pack_w8a8,
    dequantize_int8,
    pack_w8a8,
    quantize_int8,
    quantize_rows_int8,
    unpack_w8a8,
)
from engine.weights.huge_pages import move_to_huge_pages

# bf16 keeps 8 of fp32's 24 significant bits: what truncation drops is under 2^-7 of |w|, and
# rounding to nearest moves x by at most 2^-8 of |x|.
TRUNCATION_ERROR = 2.0**-7
ROUNDING_X_ERROR = 2.0**-8
# Both dot products' fp32 rounding: under K * 2^-24 of |x| . |w| each (K = hidden size), well
# under this for K up to ~2,000; past that it grows with K. (bf16 dot products treat subnormal
# inputs as 0: under 2^-126 each, far below this for any hidden state a model makes.)
ROUNDING_ERROR = 2.0**-12
# The norms and scales of the int8 bound are themselves fp32 sums: each widened by this.
NORM_SLACK = 1.0 + 2.0**-10
# Rows up to which the head's read bounds it, so half the bytes win. SmolLM2's head, Zen 4, 2
# threads, fp32 / greedy ms: 1 row 3.93 / 2.33, 2 rows 3.28 / 2.16, 4 rows 4.26 / 2.34, 8 rows
# 3.97 / 4.33 (there the fp32 head is in register tiles, and the first pass is not).
GREEDY_HEAD_MAX_ROWS = 4
# With bf16 dot products, rows up to which x rounded to bf16 wins: SmolLM2's head, Zen 4, ms,
# fp32 tiles / bf16 tiles (`bf16_dot_linear`): 8 rows 4.70 / 2.04, 16 rows 6.81 / 3.29, 32 rows
# 13.16 / 6.51, 64 rows 22.61 / 13.57.
BF16_DOTS_MAX_ROWS = 64
# The int8 first pass's, still twice as fast as the fp32 head there (`Int8FirstPass`).
INT8_MAX_ROWS = 256


def _rounding_error(in_features: int) -> float:
    """Both passes' fp32 rounding, relative to ||x|| ||w_v||: ROUNDING_ERROR up to K = 2,048."""
    return ROUNDING_ERROR * max(1.0, in_features / 2048)


class Bf16FirstPass:
    """x . high(w): |w - high(w)| < 2^-7 |w|, so a logit moves by under 2^-7 ||x|| ||w_v||; x
    rounded to bf16 (past GREEDY_HEAD_MAX_ROWS rows) adds 2^-8 ||x|| ||w_v||. The copy costs half
    the head again in memory (57 MB for SmolLM2)."""

    def __init__(self, weight: torch.Tensor, high: torch.Tensor | None, has_bf16_dots: bool):
        self.high = high_halves(weight) if high is None else high
        self.norms = weight.norm(dim=1)[None]  # fp32 [1, vocab]: ||w_v||
        self.rounding_error = _rounding_error(weight.shape[1])
        self.max_rows = BF16_DOTS_MAX_ROWS if has_bf16_dots else GREEDY_HEAD_MAX_ROWS

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximate logits fp32 [rows, vocab], the rows' margin scales [rows, 1])."""
        rounds_x = hidden.shape[0] > GREEDY_HEAD_MAX_ROWS
        if rounds_x:
            hidden_bf16 = hidden.bfloat16()
            if cpu_ops.is_loaded():
                approx = torch.ops.llm_cpu.bf16_dot_linear(hidden_bf16, self.high)
            else:
                approx = hidden_bf16.float() @ self.high.float().T
        elif cpu_ops.is_loaded():
            approx = torch.ops.llm_cpu.small_batch_linear(hidden, self.high, None)
        else:
            approx = hidden @ self.high.float().T
        error = TRUNCATION_ERROR + self.rounding_error + (ROUNDING_X_ERROR if rounds_x else 0.0)
        return approx, error * hidden.norm(dim=1, keepdim=True)


class Int8FirstPass:
    """x' . w' for w' = w rounded to int8 per group of 32 (`quantize_int8`) and x' = x rounded
    likewise (`quantize_rows_int8`, as the w8a8 kernel rounds it):
        x . w - x' . w' = x . (w - w') + (x - x') . w',
    so a logit moves by at most ||x|| ||w - w'|| + ||x - x'|| ||w'||, plus the fp32 rounding of
    both passes, with ||w - w'|| computed once per token and ||x - x'|| once per row. A quarter of
    the head's bytes in memory (31 MB for SmolLM2, with the scales).

    SmolLM2's head on its own hidden states (32 prompts, 128 greedy tokens each), Zen 4, 2
    threads, both passes, ms, bf16 first pass / this: 1 row 2.02 / 1.22, 8 rows 2.35 / 2.20, 32
    rows 7.64 / 5.67, 64 rows 14.43 / 9.64; against the full fp32 head (oneDNN) / this: 64 rows
    18.24 / 8.58, 128 rows 34.63 / 16.18, 256 rows 82.08 / 46.52. Candidates a row: median 1,
    p99 91 (bf16's: 1 and 80)."""

    max_rows = INT8_MAX_ROWS

    def __init__(self, weight: torch.Tensor):
        qweight, scale = quantize_int8(weight)
        residual = (weight - dequantize_int8(qweight, scale, torch.float32)).norm(dim=1)
        # [2, vocab]: ||w_v - w_v'||, then ||w_v|| + ||w_v - w_v'||, over both ||w_v|| and ||w_v'||
        self.norms = torch.stack([residual, weight.norm(dim=1) + residual]) * NORM_SLACK
        self.packed, self.packed_scale = pack_w8a8(qweight, scale)
        self.mix = torch.tensor([[1.0, _rounding_error(weight.shape[1])], [0.0, 1.0]]) * NORM_SLACK

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximate logits fp32 [rows, vocab], the rows' margin scales [rows, 2])."""
        if cpu_ops.is_loaded():
            approx = torch.ops.llm_cpu.w8a8_linear(hidden, self.packed, self.packed_scale, None)
        else:
            approx = w8a8_linear_reference(hidden, *unpack_w8a8(self.packed, self.packed_scale),
                                           None, torch.float32)
        # [rows, 2]: ||x||, ||x - x'|| -> the scales of ||w - w'|| and of ||w|| + ||w - w'||
        return approx, _int8_rounding_norms(hidden) @ self.mix


def _int8_rounding_norms(hidden: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, 2]: ||x|| and ||x - x'|| for x' = x rounded to int8 per group of 32."""
    if cpu_ops.is_loaded():
        return torch.ops.llm_cpu.int8_rounding_norms(hidden)
    q, scale = quantize_rows_int8(hidden)
    rounded = q.double().view(*scale.shape, GROUP_SIZE) * scale[:, :, None]  # [rows, groups, 32]
    error = hidden.double() - rounded.view_as(hidden)
    return torch.stack([hidden.double().norm(dim=1), error.norm(dim=1)], dim=1).float()


FirstPass = Bf16FirstPass | Int8FirstPass


class GreedyHead:
    """Argmax-only logits of an fp32 head. The head's fp32 weights come with each call: they
    move into huge pages while the model serves, and this keeps no reference to the old ones."""

    def __init__(self, weight: torch.Tensor, first_pass: FirstPass | None = None):
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError("an fp32 [vocab, hidden] head expected")
        self.first_pass = first_pass or Bf16FirstPass(weight, None, has_bf16_dots=False)
        self.max_rows = self.first_pass.max_rows

    def serves(self, num_rows: int) -> bool:
        return num_rows <= self.max_rows

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """fp32 [rows, vocab] from hidden [rows, in]: each row's candidates hold their exact
        logits (`weight` [vocab, in] fp32, the head's), every other token -inf."""
        hidden = hidden.float().contiguous()
        approx, scales = self.first_pass(hidden)  # [rows, vocab], [rows, terms]
        norms = self.first_pass.norms  # [terms, vocab]
        if cpu_ops.is_loaded():  # the same, in one pass over the rows
            return torch.ops.llm_cpu.greedy_head_finish(approx, hidden, weight.contiguous(),
                                                        norms, scales.contiguous())
        margins = scales @ norms  # [rows, vocab]
        best_floor = (approx - margins).amax(dim=1, keepdim=True)
        rows, token_ids = (approx + margins >= best_floor).nonzero(as_tuple=True)
        exact = (hidden[rows] * weight[token_ids]).sum(dim=1)  # [candidates]
        out = torch.full_like(approx, float("-inf"))
        out[rows, token_ids] = exact
        return out


def high_halves(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [out, in]: each fp32 weight's upper 16 bits (sign, exponent, 7 mantissa bits)."""
    return (weight.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def has_int8_dots() -> bool:
    return cpu_ops.is_loaded() and torch.ops.llm_cpu.int8_activation_path() == "vnni"


def build_greedy_head(model: nn.Module, world_size: int) -> GreedyHead | None:
    """The greedy head of `model`'s fp32 output head (plain weights, one rank), its first pass's
    weights in huge pages as the head's are; None for any other head."""
    head = getattr(model, "lm_head", None)
    if (world_size != 1 or not isinstance(head, PackedLinear) or head.quantization is not None
            or head.weight.dtype != torch.float32):
        return None
    weight = head.weight
    if has_int8_dots() and can_pack_w8a8(*weight.shape):
        first_pass = Int8FirstPass(weight)
        first_pass.packed, first_pass.packed_scale = move_to_huge_pages(
            [first_pass.packed, first_pass.packed_scale])
        return GreedyHead(weight, first_pass)
    high = move_to_huge_pages([high_halves(weight)])[0]
    has_bf16_dots = cpu_ops.capability() == "AVX512" and torch.cpu._is_avx512_bf16_supported()
    return GreedyHead(weight, Bf16FirstPass(weight, high, has_bf16_dots))
