"""Linear layers prepared once for the CPU: weights reordered into oneDNN's blocked layout.

Eager `F.linear` walks a plain [out, in] matrix through a generic GEMM on every call. At the row
counts of decoding (1-64 rows) oneDNN with its weights reordered ahead of time runs 1.5-2x faster
on this project's machines (`bench/linear.py`), in fp32 and bf16 alike; it is the rewrite
Inductor makes when it freezes a graph for the CPU, done here without compiling anything.

Below that, at 1-4 rows (one to four users decoding), the step is bound by reading the weights and
oneDNN reads them at ~16-23 GB/s: there the C++ kernel `llm_cpu::small_batch_linear`
(engine/kernels/cpu/gemv.cpp) streams each plain weight row once, llama.cpp's way, 1.2x faster
in fp32 and 1.2-1.4x in bf16 over the whole step (`bench/decode_step.py`). That keeps the plain
weights beside the packed ones: twice the weights' memory, the price of both paths. Once the
model serves, the plain weights move into huge pages (engine/weights/huge_pages.py), where they
are read faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_ops
from engine.kernels.reference import w4a8_linear_reference, w8a8_linear_reference
from engine.layers.lossless import LOSSLESS_MAX_ROWS, lossless_int4
from engine.layers.quantization import (
    GROUP_SIZE,
    can_pack_w8a8,
    dequantize_int4,
    dequantize_int8,
    pack_w4a8,
    pack_w8a8,
    quantize_int4,
    quantize_int8,
    unpack_w4a8,
    unpack_w8a8,
)
from engine.malloc import release_free_memory
from engine.weights.huge_pages import move_to_huge_pages

# The row count oneDNN lays the weights out for. It is a hint, not a limit: any row count runs.
# 32 measured as good as the exact count at 1 and 8 rows, and better at 32 and in prefill.
PACK_ROWS_HINT = 32
# Rows up to which the small-batch kernels beat oneDNN, per instruction set and weight type
# (`bench/linear_rows.py`). AVX-512 (Zen 4), fp32: 35 / 36 ms at 4 rows, 52 / 38 at 8. int8
# and int4 there, 2026-12-02: int8 31 / 40 at 8 rows, 48 / 45 at 16; int4 25 / 40 at 8, 46 / 47
# at 16; and the decode step (`bench/decode_step.py`) at 6-12 rows ran 1.3-2x faster with 16
# than with 4 (4 was int8's guess from 1-4 rows, when oneDNN had not been timed past 4).
# AVX2 (Zen 3), 2026-12-01, SmolLM2's linears, kernel / oneDNN ms: fp32 40 / 55 at 8 rows,
# 62 / 72 at 16, 124 / 123 at 32; int8 19 / 55 at 8, 90 / 123 at 32, 139 / 163 at 64:
# oneDNN's fp32 GEMM reads the weights at 8-10 GB/s there, where the kernels stream them at
# ~17. int4 (AVX2, same day): 126.7 / 125.6 at 32 rows, 233 / 217 at 64.
# w8a8's and w4a8's kernels serve every row count (no oneDNN path): their limit is the decoder
# stack's.
SMALL_BATCH_ROWS = {
    "AVX512": {"plain": 4, "int8": 16, "int4": 16, "w8a8": 1 << 20, "w4a8": 1 << 20},
    "AVX2": {"plain": 16, "int8": 64, "int4": 32, "w8a8": 1 << 20, "w4a8": 1 << 20},
}
# int8 and activations at every row count, no oneDNN: `llm_cpu::w8a8_linear`, `w4a8_linear`
INT8_ACTIVATIONS = ("w8a8", "w4a8")


def max_small_batch_rows(quantization: str | None) -> int:
    """The most rows of x that the small-batch kernels take on this CPU for weights quantized
    so ("int8", "int4", "w8a8", "w4a8", None: plain); oneDNN above."""
    rows = SMALL_BATCH_ROWS.get(cpu_ops.capability(), SMALL_BATCH_ROWS["AVX512"])
    return rows[quantization or "plain"]


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 itself (AVX512-BF16 or AMX), not through fp32."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` for 2-D `x`: oneDNN's packed weight, or the plain one through
    the small-batch kernel at a few rows. `quantization` "int8" or "int4": the small-batch kernel
    reads quantized weights (engine/layers/quantization.py) and oneDNN their dequantized values
    (int4 falls back to int8 for rows not in whole groups of 32). "w8a8": int8 weights and
    activations through `llm_cpu::w8a8_linear` at every row count, no oneDNN (int8 for shapes
    not in whole tiles of 16 rows); "w4a8" the same with int4's weights (`w4a8_linear`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 quantization: str | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        # int8: fp32 [out, groups]; int4: fp16 [2, out, groups], the steps then the minimums
        self.weight_scale = None
        if quantization == "int4" and self.in_features % GROUP_SIZE != 0:
            quantization = "int8"  # int4 takes whole groups of 32 only
        if quantization in INT8_ACTIVATIONS and not can_pack_w8a8(self.out_features,
                                                                  self.in_features):
            quantization = "int8"
        self.quantization = quantization
        self.max_small_batch_rows = max_small_batch_rows(quantization)
        if quantization == "w8a8":  # [tiles, in / 4, 16, 4] uint8 and [tiles, in / 32, 16] fp32
            self.weight, self.weight_scale = pack_w8a8(*quantize_int8(weight))
            weight = None  # nothing for oneDNN
        elif quantization == "w4a8":  # [tiles, in / 32, 4, 16, 4] uint8, [tiles, in / 32, 2, 16]
            self.weight, self.weight_scale = pack_w4a8(*quantize_int4(weight))
            weight = None
        elif quantization == "int4":
            packed, self.weight_scale = quantize_int4(weight)
            weight, self.weight = dequantize_int4(packed, self.weight_scale, weight.dtype), packed
        elif quantization is not None:
            qweight, self.weight_scale = quantize_int8(weight)
            weight, self.weight = dequantize_int8(qweight, self.weight_scale, weight.dtype), qweight
        else:
            self.weight = weight  # plain [out, in], for the small-batch kernel
        # What oneDNN's packed weight is made from, kept until `pack` has made it: the reorder
        # (~0.3 s for SmolLM2's 121 linears) runs in the background, off the path to the first
        # token, and `F.linear` on this serves meanwhile.
        self.unpacked_weight: torch.Tensor | None = weight
        # An opaque oneDNN tensor: a plain attribute, outside the module's state dict.
        self.packed_weight: torch.Tensor | None = None
        self.bias = None if bias is None else bias.detach()
        # fp32 weights that are exactly 4-bit values, as such (engine/layers/lossless.py): found
        # in the background (`find_lossless`), for the small-batch kernel at up to 8 rows.
        self.lossless: tuple[torch.Tensor, torch.Tensor] | None = None

    def pack(self) -> None:
        """Make oneDNN's packed weight. Safe while the layer serves: `forward` reads the unpacked
        weight before the packed one, and this sets the packed one before dropping the other."""
        if self.unpacked_weight is not None:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                self.unpacked_weight, PACK_ROWS_HINT)
            self.unpacked_weight = None

    def find_lossless(self) -> None:
        """Keep the plain fp32 weights also as 4-bit values where they are exactly that."""
        if self.quantization is None:
            self.lossless = lossless_int4(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantization in INT8_ACTIVATIONS:
            return self._int8_activations(x)
        if x.shape[0] <= self.max_small_batch_rows and cpu_ops.is_loaded():
            lossless = self.lossless
            if lossless is not None and x.shape[0] <= LOSSLESS_MAX_ROWS:
                return torch.ops.llm_cpu.int4_fp32_linear(x, *lossless, self.bias)
            if self.quantization == "int4":
                return torch.ops.llm_cpu.int4_small_batch_linear(
                    x, self.weight, self.weight_scale, self.bias)
            if self.quantization == "int8":
                return torch.ops.llm_cpu.int8_small_batch_linear(
                    x, self.weight, self.weight_scale, self.bias)
            return torch.ops.llm_cpu.small_batch_linear(x, self.weight, self.bias)
        unpacked, packed = self.unpacked_weight, self.packed_weight  # in this order (`pack`)
        if packed is None:
            return F.linear(x, unpacked, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _int8_activations(self, x: torch.Tensor) -> torch.Tensor:
        is_w4 = self.quantization == "w4a8"
        if cpu_ops.is_loaded():
            kernel = torch.ops.llm_cpu.w4a8_linear if is_w4 else torch.ops.llm_cpu.w8a8_linear
            return kernel(x, self.weight, self.weight_scale, self.bias)
        # Until the kernels are built (a first start): the same rounding through fp32 matmuls.
        unpack, reference = ((unpack_w4a8, w4a8_linear_reference) if is_w4
                             else (unpack_w8a8, w8a8_linear_reference))
        return reference(x, *unpack(self.weight, self.weight_scale), self.bias, torch.float32)

    def extra_repr(self) -> str:
        quantized = f", {self.quantization}" if self.quantization else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, packed{quantized}"


def pack_linears(model: nn.Module, quantization: str | None = None) -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear` (quantized for the small-batch
    kernel when `quantization` says so), to be packed by `pack_and_move`; return how many. A tied
    output head gets its own packed copy of the embedding. With int4 the output head is int8 (and
    w8a8 with w4a8), as llama.cpp's 4-bit files keep it (the embedded SmolLM2's is Q8_0): the
    logits are where 4 bits cost the most."""
    head_quantization = {"int4": "int8", "w4a8": "w8a8"}.get(quantization, quantization)
    num_packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                layer_quantization = head_quantization if name == "lm_head" else quantization
                setattr(module, name, PackedLinear(child.weight, child.bias, layer_quantization))
                num_packed += 1
    if getattr(model, "lm_head", False) is None:  # tied to the embedding
        model.lm_head = PackedLinear(model.embed_tokens.weight, None, head_quantization)
        num_packed += 1
    return num_packed


def pack_and_move(model: nn.Module) -> None:
    """What the model runner runs in the background once the model serves: oneDNN's packed
    weights made, the plain ones kept also as 4-bit values where they are exactly that, then
    moved into huge pages."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.pack()
            module.find_lossless()
    move_plain_weights_to_huge_pages(model)
    release_free_memory()  # what the packing and the move replaced


def move_plain_weights_to_huge_pages(model: nn.Module) -> None:
    """The small-batch kernel's weights into huge pages (engine/weights/huge_pages.py); a
    parameter sharing one (a tied embedding) follows, so nothing is held twice. Safe while the
    model serves: each weight is swapped by one attribute assignment, never changed in place
    (the copy costs ~0.4-0.7 s for 540 MB, so the model runner does it in the background)."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    moved = move_to_huge_pages([m.weight for m in packed])
    by_old_ptr = {m.weight.data_ptr(): new for m, new in zip(packed, moved, strict=True)}
    for name, param in list(model.named_parameters()):
        new = by_old_ptr.get(param.data_ptr())
        if new is not None and new.shape == param.shape:
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, attribute, nn.Parameter(new, requires_grad=param.requires_grad))
    for m, new in zip(packed, moved, strict=True):
        m.weight = new
    lossless = [m for m in packed if m.lossless is not None]
    moved = move_to_huge_pages([t for m in lossless for t in m.lossless])
    for i, m in enumerate(lossless):
        m.lossless = (moved[2 * i], moved[2 * i + 1])
