"""`python -m engine.weights tensorize SRC DEST [--dtype D] [--s3-endpoint URL]
[--tensor-parallel-size N]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from engine.weights.source import WeightsError
from engine.weights.tensorize import DTYPES, tensorize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.weights")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("tensorize", help="write a tensorizer artifact of a model")
    cmd.add_argument("src", help='a Hugging Face folder, a .gguf file, or "" (embedded SmolLM2)')
    cmd.add_argument("dest", help="a local folder or s3://bucket/prefix")
    cmd.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    cmd.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="cut the weights for N ranks: one model-rank-RRR.tensors each")
    cmd.add_argument(
        "--s3-endpoint",
        default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = tensorize(args.src, args.dest, args.dtype, args.s3_endpoint,
                             args.tensor_parallel_size)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
