"""Time of one decode step at a fixed batch, offline (run by hand; profile with --profile).

The embedded SmolLM2 (tensorized copy if `make serve` made one), N sequences with 128-token
prompts, steps timed once every sequence decodes; median of 20 steps.

    .venv/bin/python bench/decode_step.py [--dtype float32] [--batch 1 8 32] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import cpu_name  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / ".cache/models/smollm2"


def step_ms(llm: LLM, batch: int, profile: bool) -> float:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{batch}-{i}", list(range(100 + i, 228 + i)), params)
    while engine.stats()["num_waiting"] or any(
        s.num_computed_tokens < 128 for s in engine.scheduler.running
    ):
        engine.step()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished_requests():
        engine.step()
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--attention-backend", default=None, choices=["torch", "cpu"])
    parser.add_argument("--quantization", default=None, choices=["int8", "int4", "w8a8", "w4a8"])
    parser.add_argument("--compile-decode", action="store_true",
                        help="time the compiled one-sequence step (waits for it to be built)")
    args = parser.parse_args()
    if args.attention_backend != "torch":
        from engine.kernels import cpu_ops

        cpu_ops.load()  # built or loaded before the engine starts: every step timed uses it
    llm = LLM(str(MODEL) if MODEL.exists() else "", dtype=args.dtype, max_model_len=1024,
              max_num_seqs=64, compile_decode=args.compile_decode,
              attention_backend=args.attention_backend, quantization=args.quantization)
    llm.engine.runner.wait_for_weight_mover()  # the move into huge pages, in the background
    while not llm.engine.runner.calibrate_small_batch_rows():  # as a server does when idle
        pass
    if args.compile_decode:
        start = time.perf_counter()
        if not llm.engine.runner.compiled_decode.is_ready.wait(900):
            raise SystemExit("the compiled step was not built")
        print(f"# compiled decode step built in {time.perf_counter() - start:.0f} s")
    compiled = ", compiled decode" if args.compile_decode else ""
    compiled += f", {args.quantization} weights" if args.quantization else ""
    print(f"# {cpu_name()}, {args.dtype}, attention {llm.engine.runner.backend.name}{compiled}")
    for batch in args.batch:
        ms = step_ms(llm, batch, args.profile)
        print(f"batch {batch}: {ms:.1f} ms per step, {batch / ms * 1e3:.1f} tok/s")


if __name__ == "__main__":
    main()
