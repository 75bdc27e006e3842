"""Offline throughput on a server-like workload (run by hand; results go in the README).

SmolLM2-135M fp32, 32 requests submitted at once, prompt and output lengths uniform in 16-256
(ignore_eos). Prints useful output tokens/s for this engine, transformers' static batches of 8
(left padding, each batch runs to its longest request) and transformers' continuous batching, plus
the machine's fp32 matmul GFLOP/s and the share of that roofline the engine reaches.

    .venv/bin/python bench/throughput.py [--num-requests 32] [--skip-hf]
"""

from __future__ import annotations

import argparse
import time

import torch

from engine import LLM, SamplingParams
from engine.weights import default_model_path


def workload(num_requests: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(16, 257, (num_requests,), generator=g).tolist()
    output_lens = torch.randint(16, 257, (num_requests,), generator=g).tolist()
    prompts = [torch.randint(100, 49000, (n,), generator=g).tolist() for n in prompt_lens]
    return prompts, output_lens


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def bench_engine(prompts, output_lens) -> tuple[float, int, LLM]:
    llm = LLM("", dtype="float32", max_model_len=2048, max_num_seqs=64,
              max_num_batched_tokens=512)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.token_ids) for o in outputs), llm


def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def bench_hf_static(model, prompts, output_lens, batch_size: int = 8) -> tuple[float, int]:
    useful = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, lens = prompts[i : i + batch_size], output_lens[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(lens),
                           min_new_tokens=max(lens), do_sample=False, pad_token_id=0)
        useful += sum(lens)
    return time.perf_counter() - start, useful


def bench_hf_continuous(model, prompts, output_lens) -> tuple[float, int]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(output_lens), eos_token_id=-1)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=2048, max_batch_tokens=512,
                                  max_requests_per_batch=64)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, output_lens, strict=True)):
        manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
    useful, done = 0, 0
    while done < len(prompts):
        result = manager.get_result(timeout=1.0)
        if result is not None and result.is_finished():
            useful += len(result.generated_tokens)
            done += 1
    elapsed = time.perf_counter() - start
    manager.stop(block=True)
    return elapsed, useful


def report(name: str, tokens: int, elapsed: float) -> None:
    print(f"{name:28s} {tokens:6d} tokens in {elapsed:6.1f} s = {tokens / elapsed:7.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts, output_lens = workload(args.num_requests)
    gflops = matmul_gflops()
    print(f"machine: {torch.get_num_threads()} threads, fp32 matmul {gflops:.1f} GFLOP/s")
    elapsed, tokens, llm = bench_engine(prompts, output_lens)
    engine_tps = tokens / elapsed
    flops_per_token = 2 * llm.engine.model_config.num_params
    roofline = engine_tps * flops_per_token / 1e9 / gflops
    report("engine", tokens, elapsed)
    print(f"  the engine reaches {roofline:.1%} of the fp32 matmul roofline")
    if args.skip_hf:
        return
    del llm
    model = hf_model()
    elapsed, tokens = bench_hf_static(model, prompts, output_lens)
    static_tps = tokens / elapsed
    report("transformers static (bs 8)", tokens, elapsed)
    elapsed, tokens = bench_hf_continuous(model, prompts, output_lens)
    cb_tps = tokens / elapsed
    report("transformers continuous", tokens, elapsed)
    print(f"engine / static = {engine_tps / static_tps:.2f}x, "
          f"engine / continuous = {engine_tps / cb_tps:.2f}x")


if __name__ == "__main__":
    main()
