"""What a low-precision dtype costs in quality: greedy agreement with fp32 (run by hand).

The embedded SmolLM2, 32 prompts of 128 tokens cut from a text the model was not tuned on (this
repository's README), 64 greedy tokens each, in fp32 and in the dtype under test. Prints the
share of completions identical to fp32's, the mean length of the identical prefix, and the mean
log-probability fp32 gives to the other dtype's tokens against its own (a perplexity ratio).

    .venv/bin/python bench/quality.py [--dtype bfloat16]    # or bfloat16+int8, float32+int8
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import cpu_name, prompts  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

NEW_TOKENS = 64
MODEL = Path(__file__).resolve().parents[1] / ".cache/models/smollm2"


def greedy(dtype: str, all_prompts: list[list[int]]) -> list:
    """`dtype` may name a quantization too: "bfloat16+int8", "float32+int8"."""
    dtype, _, quantization = dtype.partition("+")
    llm = LLM(str(MODEL) if MODEL.exists() else "", dtype=dtype, max_model_len=1024,
              quantization=quantization or None)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    return llm.generate(all_prompts, params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=32)
    args = parser.parse_args()
    all_prompts = prompts(args.num_prompts)
    reference = greedy("float32", all_prompts)
    candidate = greedy(args.dtype, all_prompts)
    prefixes, gaps = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        pairs = zip(ref.token_ids, cand.token_ids, strict=True)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        prefixes.append(NEW_TOKENS if first is None else first)
        if first is not None:
            # Same context up to here: how far below fp32's choice fp32 ranks the other token.
            step = ref.outputs[0].logprobs[first]
            other = step["top_logprobs"].get(cand.token_ids[first])
            gaps.append(math.inf if other is None else step["logprob"] - other)
    num_identical = sum(p == NEW_TOKENS for p in prefixes)
    print(f"# {cpu_name()}")
    print(f"{args.dtype} vs float32, {len(all_prompts)} prompts x {NEW_TOKENS} greedy tokens: "
          f"{num_identical}/{len(all_prompts)} completions identical, mean identical prefix "
          f"{sum(prefixes) / len(prefixes):.1f} tokens")
    if gaps:
        gaps.sort()
        print(f"at the first difference, fp32's log-probability gap between its token and the "
              f"other: median {gaps[len(gaps) // 2]:.3f}, max {gaps[-1]:.3f} "
              f"(inf: not in fp32's top 5)")


if __name__ == "__main__":
    main()
