"""Resident memory against the KV cache's size, by hand (`make bench-memory`): in the README.

The server (the embedded SmolLM2, as `bench/serving.py` runs it) is started with each
`--kv-cache-memory` in turn, per dtype. Read from /proc for the server's process and its
children (the engine's): the proportional set size (PSS: a page mapped by both counts half in
each) once ready and its background work done, then after a load of 32 streaming clients (128 +
128 tokens each), and the peak resident size (VmHWM) over the whole run. The KV cache is reserved
at start and its pages become resident as blocks are first written, so what a cache costs is
what the load has touched. llama-server, with the context `bench/serving.py` gives it, is
measured the same way for scale.

    .venv/bin/python bench/memory.py [--kv-mib 256 1024 4096] [--dtype float32 bfloat16+int8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import cpu_name, llama_server, ours, run_load, running  # noqa: E402

SETTLE_S = 5.0  # after ready: the weights' packing and move into huge pages finish
NUM_CLIENTS = 32


def _pids(root: int) -> list[int]:
    """`root` and its descendants."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                queue += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            pass
    return pids


def _field_kib(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def memory_mib(root: int) -> tuple[float, float]:
    """(PSS now, peak RSS) of `root` and its descendants, MiB."""
    pids = _pids(root)
    pss = sum(_field_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    peak = sum(_field_kib(f"/proc/{p}/status", "VmHWM") for p in pids)
    return pss / 1024, peak / 1024


def measure(name: str, cmd: list[str], path: str, env: dict) -> dict[str, float]:
    pids: list[int] = []
    with running(name, cmd, path, env, pids) as url:
        time.sleep(SETTLE_S)
        pid = pids[0]
        ready_pss, _ = memory_mib(pid)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        result = asyncio.run(run_load(url, NUM_CLIENTS, 1, model))
        loaded_pss, peak = memory_mib(pid)
    return {"ready": ready_pss, "after": loaded_pss, "peak": peak, "tok_s": result.tok_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-mib", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16+int8"])
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--llama-types", nargs="+", default=["F32", "Q8_0"])
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}; {NUM_CLIENTS} clients, 128 + 128 "
          "tokens each; MiB, the server's processes together")
    print("| server | KV cache reserved | PSS ready | PSS after the load | peak RSS | tok/s |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtype:
        for kv_mib in args.kv_mib:
            cmd, path, env = ours(dtype, ["--kv-cache-memory", str(kv_mib << 20)])
            m = measure(f"memory {dtype} {kv_mib}", cmd, path, env)
            print(f"| this server {dtype} | {kv_mib} | {m['ready']:.0f} | {m['after']:.0f} | "
                  f"{m['peak']:.0f} | {m['tok_s']:.1f} |", flush=True)
    if args.llama_server:
        for kind in args.llama_types:
            cmd, path, env = llama_server(args.llama_server, kind, os.cpu_count() or 1)
            m = measure(f"memory llama {kind}", cmd, path, env)
            print(f"| llama-server {kind} (-c {cmd[cmd.index('-c') + 1]}, f16 KV) | | "
                  f"{m['ready']:.0f} | {m['after']:.0f} | {m['peak']:.0f} | "
                  f"{m['tok_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
