"""The C++ small-batch kernels against oneDNN's packed GEMM, per number of rows (run by hand).

SmolLM2-135M's linear layers (30 x qkv / o / gate-up / down + the LM head), random weights, the
step's 2 threads: milliseconds for all of them at each row count, fp32 weights, int8 ones
(oneDNN gets their dequantized values, as `PackedLinear` gives it; in bf16 too where the CPU
has native bf16), int4 ones (the head int8), w8a8 (int8 activations too, every row count) and
w4a8 (the head w8a8), median of 7 alternating runs.
`engine/layers/linear.py`'s `SMALL_BATCH_ROWS` takes the crossing points from here.

    .venv/bin/python bench/linear_rows.py [--rows 1 4 8 16 32 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import cpu_name  # noqa: E402
from engine.kernels import cpu_ops  # noqa: E402
from engine.layers.linear import (
    PACK_ROWS_HINT,  # noqa: E402
    can_pack,  # noqa: E402
)
from engine.layers.quantization import (  # noqa: E402
    dequantize_int8,
    pack_w4a8,
    pack_w8a8,
    quantize_int4,
    quantize_int8,
)

HIDDEN, INTERMEDIATE, NUM_LAYERS, VOCAB = 576, 1536, 30, 49152
SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
SHAPES = SHAPES * NUM_LAYERS + [(VOCAB, HIDDEN)]


def median_ms(runs: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():  # alternating: the VM's bandwidth drifts
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    args = parser.parse_args()
    if not cpu_ops.load():
        raise SystemExit("the C++ kernels could not be built")
    torch.manual_seed(0)
    weights = [torch.randn(shape) * 0.02 for shape in SHAPES]
    quantized = [quantize_int8(w) for w in weights]
    int4 = [quantize_int4(w) for w in weights[:-1]]  # the head stays int8, as the engine keeps it
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights]
    packed_int8 = {dtype: [torch.ops.mkldnn._reorder_linear_weight(dequantize_int8(q, s, dtype),
                                                                   PACK_ROWS_HINT)
                           for q, s in quantized]
                   for dtype in (torch.float32, torch.bfloat16)
                   if can_pack(torch.device("cpu"), dtype)}
    w8a8 = [pack_w8a8(q, s) for q, s in quantized]
    w4a8 = [pack_w4a8(p, s) for p, s in int4] + w8a8[-1:]
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads; ms for SmolLM2's linears; "
          f"w8a8 path: {torch.ops.llm_cpu.int8_activation_path()}")
    names = None
    for num_rows in args.rows:
        ms = median_ms(runs(num_rows, weights, quantized, packed, packed_int8, int4, w8a8,
                             w4a8))
        if names is None:
            names = list(ms)
            print("| rows | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        print(f"| {num_rows} | " + " | ".join(f"{v:.1f}" for v in ms.values()) + " |", flush=True)


def runs(num_rows: int, weights: list, quantized: list, packed: list, packed_int8: dict,
         int4: list, w8a8: list, w4a8: list) -> dict[str, Callable[[], object]]:
    x = {k: torch.randn(num_rows, k) for k in (HIDDEN, INTERMEDIATE)}
    x_bf16 = {k: v.bfloat16() for k, v in x.items()}

    def onednn(packed_weights: list[torch.Tensor], inputs: dict) -> Callable[[], object]:
        return lambda: [torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none",
                                                           [], "")
                        for w, p in zip(weights, packed_weights, strict=True)]

    bf16 = ({"int8 (dequantized) bf16 oneDNN": onednn(packed_int8[torch.bfloat16], x_bf16)}
            if torch.bfloat16 in packed_int8 else {})
    return {
        "fp32 kernel": lambda: [torch.ops.llm_cpu.small_batch_linear(x[w.shape[1]], w, None)
                                for w in weights],
        "fp32 oneDNN": onednn(packed, x),
        "int8 kernel": lambda: [torch.ops.llm_cpu.int8_small_batch_linear(x[q.shape[1]], q, s, None)
                                for q, s in quantized],
        "int8 (dequantized) oneDNN": onednn(packed_int8[torch.float32], x),
        **bf16,
        "int4 kernel": lambda: [torch.ops.llm_cpu.int4_small_batch_linear(x[2 * p.shape[1]], p, s,
                                                                          None)
                                for p, s in int4] + [quantized_head(num_rows, x, quantized)],
        "w8a8 kernel": lambda: [torch.ops.llm_cpu.w8a8_linear(x[4 * p.shape[1]], p, s, None)
                                for p, s in w8a8],
        "w4a8 kernel": lambda: [(torch.ops.llm_cpu.w4a8_linear if p.dim() == 5
                                 else torch.ops.llm_cpu.w8a8_linear)(x[w.shape[1]], p, s, None)
                                for w, (p, s) in zip(weights, w4a8, strict=True)],
    }


def quantized_head(num_rows: int, x: dict, quantized: list) -> torch.Tensor:
    q, s = quantized[-1]
    return torch.ops.llm_cpu.int8_small_batch_linear(x[q.shape[1]], q, s, None)


if __name__ == "__main__":
    main()
