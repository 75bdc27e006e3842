"""Up to how many rows the small-batch kernels beat oneDNN, timed on this machine's own weights.

`SMALL_BATCH_ROWS` (engine/layers/linear.py) gives each instruction set a floor, but the crossing
point moves with the machine, not only with its instruction set. fp32, all of SmolLM2's linears
at 8 rows, the kernel against oneDNN: 52 / 38 ms on a Zen 4 (2026-12-01), 25.3 / 34.9 ms on a
Sapphire Rapids (2026-12-03, after the GEMV's prefetches), where the decode step at 8 sequences
took 26-27 ms with the kernels (and the C++ decoder stack they open) against 41-43 ms without.
So once the weights are packed and moved, the engine times both paths at a few larger row counts
over all the model's linears (a step's worth of weights streamed from memory, as a step reads
them) and raises the limit to the largest count up to which the kernels won at every count tried.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import nn

from engine.kernels import cpu_ops
from engine.layers.linear import PackedLinear

logger = logging.getLogger(__name__)

CANDIDATE_ROWS = (8, 16, 32)
NUM_REPEATS = 3  # alternating kernel / oneDNN passes per row count; the median of each


def choose_max_rows(floor: int, timings: dict[int, tuple[float, float]]) -> int:
    """The largest row count up to which the kernels won at every count timed, `floor` if they
    lost at the first; `timings[rows]`: (the kernels' seconds, oneDNN's)."""
    best = floor
    for rows in sorted(timings):
        kernel_s, onednn_s = timings[rows]
        if kernel_s >= onednn_s:
            break
        best = rows
    return best


class SmallBatchCalibration:
    """Times both paths one row count per `step` (~0.1-0.4 s each for SmolLM2: a request that
    comes meanwhile waits at most that long), then raises every packed linear's
    `max_small_batch_rows` to the count chosen (never below its own)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        # Packed for oneDNN: w8a8 and w4a8 never are (no oneDNN path), nothing to choose there
        self.linears = [m for m in model.modules()
                        if isinstance(m, PackedLinear) and m.packed_weight is not None]
        self.floor = min((m.max_small_batch_rows for m in self.linears), default=0)
        has_choice = bool(self.linears) and cpu_ops.is_loaded()
        self.pending = [rows for rows in CANDIDATE_ROWS if rows > self.floor] if has_choice else []
        self.timings: dict[int, tuple[float, float]] = {}
        self.max_rows: int | None = None  # once chosen

    @property
    def is_done(self) -> bool:
        return not self.pending

    def step(self) -> int | None:
        """Time the next row count; once the last is timed (or the kernels lost), set the limit
        chosen and return it. None before that, and where there is nothing to choose. A failure
        while timing is logged and ends it with every limit as it was: a choice of speed is
        never worth the engine's step loop, which calls this when idle."""
        if not self.pending:
            return None
        rows = self.pending.pop(0)
        try:
            self.timings[rows] = kernel_s, onednn_s = _time_paths(self.linears, rows, self.dtype)
        except Exception:  # noqa: BLE001 - see above
            logger.exception("timing the small-batch kernels failed; their limits stay")
            self.pending = []
            return None
        if kernel_s >= onednn_s:
            self.pending = []  # lost here: larger counts are not tried
        if self.pending:
            return None
        self.max_rows = choose_max_rows(self.floor, self.timings)
        for m in self.linears:
            m.max_small_batch_rows = max(m.max_small_batch_rows, self.max_rows)
        return self.max_rows


@torch.inference_mode()
def _time_paths(linears: list[PackedLinear], rows: int,
                dtype: torch.dtype) -> tuple[float, float]:
    """Median seconds of one pass over `linears` at `rows` rows: (kernels, oneDNN)."""
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {m.in_features for m in linears}}
    saved = [m.max_small_batch_rows for m in linears]
    seconds: tuple[list[float], list[float]] = ([], [])
    try:
        for _ in range(NUM_REPEATS):
            for path, limit in enumerate((rows, rows - 1)):  # the kernels take it, then oneDNN
                for m in linears:
                    m.max_small_batch_rows = limit
                start = time.perf_counter()
                for m in linears:
                    m(inputs[m.in_features])
                seconds[path].append(time.perf_counter() - start)
    finally:
        for m, limit in zip(linears, saved, strict=True):
            m.max_small_batch_rows = limit
    return statistics.median(seconds[0]), statistics.median(seconds[1])
