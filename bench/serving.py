"""This server against llama.cpp's llama-server (or transformers), side by side in one run.

The workload of the speed issue: the embedded SmolLM2-135M-Instruct, prompts of 128 tokens (token
ids, distinct per request), 128 new tokens with EOS suppressed, greedy, streamed from OpenAI
`/v1/completions`, at 1, 8 and 32 concurrent clients. Prints one table: tok/s, TTFT p50/p99,
inter-token latency p50, and the ratio to llama-server.

    make bench-serving                                   # this server vs transformers
    make bench-serving LLAMA_SERVER=~/.cache/sagemaker-llm/llama.cpp/build/bin
    .venv/bin/python bench/serving.py --clients 1 2 4 8 16 32 64 --dtype bfloat16 \\
        --llama-server DIR --llama-types F32 BF16 Q4_1
    .venv/bin/python bench/serving.py --dtype float32 bfloat16+int8 ...  # int8 weights

The llama.cpp binaries come from `scripts/bench/build_llama_server.sh` (sources from the
`llama-cpp-python` sdist on PyPI, built into a cache outside the repo).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_TOKENS = 128
NEW_TOKENS = 128
CACHE = Path(os.environ.get("SM_LLM_BENCH_CACHE", Path.home() / ".cache/sagemaker-llm/bench"))


def cpu_name() -> str:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor())
    return (f"{model}, {os.cpu_count()} vCPUs, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, path: str = "/ping",
               text: str = "") -> None:
    """Until `path` answers 200 (with `text` in its body, if given)."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            response = httpx.get(url + path, timeout=5)
            if response.status_code == 200 and text in response.text:
                return
        time.sleep(0.3)


@contextlib.contextmanager
def running(name: str, cmd: list[str], path: str, env: dict | None = None,
            pids: list[int] | None = None) -> Iterator[str]:
    """The server of `cmd` started on a free port, its output in the cache's `name`.log; its pid
    appended to `pids`, if given."""
    port = free_port()
    cmd = [part.replace("{port}", str(port)) for part in cmd]
    CACHE.mkdir(parents=True, exist_ok=True)
    log = open(CACHE / f"{name.replace(' ', '-')}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    if pids is not None:
        pids.append(process.pid)
    try:
        wait_ready(url, process, path)
        if "--compile-decode" in cmd:  # time the compiled step, not the eager one before it
            wait_ready(url, process, "/metrics", "llm_compiled_decode_ready 1.0")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


# -- the workload -----------------------------------------------------------------------------


@functools.cache
def prompts(num: int, first: int = 0) -> list[list[int]]:
    """Distinct 128-token prompts cut from a real text (the embedded model's tokenizer), the
    `first`-th onwards: each round takes new ones, so no server answers from its prompt cache."""
    ids = _text_ids()
    while len(ids) < PROMPT_TOKENS + (first + num) * 7:
        ids += ids
    return [ids[i * 7 : i * 7 + PROMPT_TOKENS] for i in range(first, first + num)]


@functools.cache
def _text_ids() -> list[int]:
    from transformers import AutoTokenizer

    from engine.weights import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Result:
    num_tokens: int = 0
    wall_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.num_tokens / self.wall_s


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], result: Result,
                      model: str) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    last = None
    num = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or "[DONE]" in line:
                continue
            chunk = json.loads(line[5:])
            if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttfts.append(now - start)
            else:
                result.itls.append(now - last)
            last = now
            num += 1
    result.num_tokens += NEW_TOKENS  # EOS suppressed: every request makes exactly this many


def num_load_prompts(num_clients: int, requests_per_client: int) -> int:
    return num_clients * requests_per_client + 1  # and a warm-up request's


async def run_load(url: str, num_clients: int, requests_per_client: int, model: str,
                   first_prompt: int = 0) -> Result:
    """`first_prompt`: where this load's prompts start among the text's windows; each load and
    round takes new ones (`main`), and every server the same ones."""
    all_prompts = prompts(num_load_prompts(num_clients, requests_per_client), first_prompt)
    result = Result()
    # A new connection per request: llama-server closes idle keep-alive connections, and a
    # request sent on one just as it closes fails. Loopback connections cost nothing here.
    limits = httpx.Limits(max_connections=num_clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, all_prompts[-1], Result(), model)  # warm-up

        async def client_loop(i: int) -> None:
            for r in range(requests_per_client):
                prompt = all_prompts[i * requests_per_client + r]
                await one_request(client, url, prompt, result, model)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(num_clients)))
        result.wall_s = time.perf_counter() - start
    return result


async def warm_up(url: str, model: str) -> None:
    """One request of ids no timed load sends (the text's windows): no prompt cache helps one."""
    prompt = list(range(1000, 1000 + PROMPT_TOKENS))
    async with httpx.AsyncClient(timeout=600) as client:
        await one_request(client, url, prompt, Result(), model)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the servers ------------------------------------------------------------------------------


SETTLE_S = 5.0  # idle after the warm-up: the engine's background work done (`main`)
NGRAM_CONFIG = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'


def ours(dtype: str, extra: list[str], threads: int | None = None) -> tuple[list[str], str, dict]:
    """`dtype` may name options too: "bfloat16+int8" is `--dtype bfloat16 --quantization int8`,
    "float32+thread" is `--no-engine-process` (the engine on a thread of the server),
    "float32+ngram" speculative decoding by prompt lookup (4 draft tokens a step).
    `threads`: the step's OpenMP threads (`OMP_NUM_THREADS`; default: one per core)."""
    model = Path(__file__).resolve().parents[1] / ".cache/models/smollm2"
    dtype, *options = dtype.split("+")
    flags = {"thread": ["--no-engine-process"],
             "ngram": ["--speculative-config", NGRAM_CONFIG]}
    for option in options:
        extra = [*flags.get(option, ["--quantization", option]), *extra]
    cmd = [sys.executable, "-m", "handler", "--model", str(model), "--host", "127.0.0.1",
           "--port", "{port}", "--max-model-len", str(max(2048, PROMPT_TOKENS + NEW_TOKENS)),
           "--max-num-seqs", "64",
           "--dtype", dtype, "--log-level", "warning", *extra]
    return cmd, "/ping", {"OMP_NUM_THREADS": str(threads)} if threads else {}


def gguf_of(llama_bin: Path, kind: str) -> Path:
    """The embedded Q4_1 GGUF requantized (dequantized) by llama-quantize into `kind`."""
    from engine.weights import default_model_path

    source = default_model_path()
    if kind == "Q4_1":
        return source
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"smollm2-135m-{kind.lower()}.gguf"
    if not target.exists():
        subprocess.run([str(llama_bin / "llama-quantize"), "--allow-requantize", str(source),
                        str(target), kind], check=True, capture_output=True)
    return target


# llama-server's own prompt lookup, sized as ours (NGRAM_CONFIG): 3-token lookup, 4-token drafts
LLAMA_NGRAM = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
               "--spec-ngram-simple-size-m", "4"]


def llama_server(llama_bin: Path, kind: str, threads: int) -> tuple[list[str], str, dict]:
    """`kind`: a GGUF type (F32, BF16, Q8_0, Q4_1), "+ngram" for speculative decoding,
    "+norepack" for no weight repacking (`-nr`: no AMX or AVX repacked matmuls; on a Sapphire
    Rapids VM, 2026-12-03, this build's AMX Q8_0 path crashed at start with SIGSEGV)."""
    kind, *options = kind.split("+")
    cmd = [str(llama_bin / "llama-server"), "-m", str(gguf_of(llama_bin, kind)), "--host",
           "127.0.0.1", "--port", "{port}", "-np", "32", "-cb", "-no-kvu", "-t", str(threads),
           "-c", str(32 * (PROMPT_TOKENS + NEW_TOKENS + 16)), "--no-warmup",
           *(LLAMA_NGRAM if "ngram" in options else []),
           *(["-nr"] if "norepack" in options else [])]
    return cmd, "/health", {"LD_LIBRARY_PATH": str(llama_bin)}


def transformers_generate(batch_size: int) -> float:
    """transformers `generate` on the same weights: tok/s at one static batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.weights import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    ids = torch.tensor(prompts(batch_size))
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return batch_size * NEW_TOKENS / (time.perf_counter() - start)


def main() -> None:
    global PROMPT_TOKENS  # the workload's prompt length, set once from the command line
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", nargs="*", default=["float32"])
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMA_SERVER"),
                        help="folder with llama-server and llama-quantize")
    parser.add_argument("--llama-types", nargs="+", default=["F32"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="compute threads of every server (llama-server -t, ours "
                        "OMP_NUM_THREADS)")
    parser.add_argument("--requests-per-client", type=int, default=0,
                        help="requests each client sends one after another, per round "
                        "(default 2: a second wave arrives while the first decodes)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each load is run this many times per server, the servers taking "
                        "turns, so a slow minute of the machine falls on all of them alike")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags for this server")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                        help="prompt length (TTFT against prompt length)")
    args = parser.parse_args()
    PROMPT_TOKENS = args.prompt_tokens
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}")
    print(f"# prompts {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, greedy, streamed; "
          f"medians of {args.rounds} rounds, servers taking turns; {args.threads} threads")
    servers = [(f"this server {d}", *ours(d, args.extra, args.threads)) for d in args.dtype]
    if args.llama_server:
        servers += [(f"llama-server {k}", *llama_server(args.llama_server, k, args.threads))
                    for k in args.llama_types]
    # rows[server][clients]: one Result per round
    rows: dict[str, dict[int, list[Result]]] = {name: {} for name, *_ in servers}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(running(name, cmd, path, env))
                for name, cmd, path, env in servers}
        models = {name: httpx.get(url + "/v1/models").json()["data"][0]["id"]
                  for name, url in urls.items()}
        # Each server warm before anything is timed: this one packs and moves its weights after
        # its first steps and times its kernels when idle next (~3 s of both cores), which would
        # otherwise fall in its own first load or in the next server's turn.
        for name, url in urls.items():
            asyncio.run(warm_up(url, models[name]))
        time.sleep(SETTLE_S)
        first_prompt = 0  # no load reuses another's prompts: no prompt cache helps anyone
        for n in args.clients:
            per_client = args.requests_per_client or 2
            for round_index in range(args.rounds):
                for name, url in urls.items():
                    r = asyncio.run(run_load(url, n, per_client, models[name], first_prompt))
                    rows[name].setdefault(n, []).append(r)
                    print(f"  {name}, {n} clients, round {round_index + 1}: {r.tok_s:.1f} tok/s",
                          file=sys.stderr)
                first_prompt += num_load_prompts(n, per_client)
    print_table(rows, args.clients)


def print_table(rows: dict[str, dict[int, list[Result]]], clients: list[int]) -> None:
    reference = next((n for n in rows if n.startswith("llama-server")), None)
    peers = [n for n in rows if n.startswith("llama-server")]
    print("\n| server | clients | tok/s | TTFT p50 | TTFT p99 | ITL p50 | vs "
          f"{reference or 'transformers'} | vs the best llama-server |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = {}
    if reference is None:
        baseline = {n: transformers_generate(min(n, 32)) for n in clients}
        for n, tok_s in baseline.items():
            print(f"| transformers generate (batch {min(n, 32)}) | {n} | {tok_s:.1f} | | | | | |")
    for name, by_clients in rows.items():
        for n, results in by_clients.items():
            # the ratio of each round, then their median: the servers ran side by side
            ratios = [r.tok_s / (rows[reference][n][i].tok_s if reference else baseline[n])
                      for i, r in enumerate(results)]
            # in each round, against the fastest llama-server of that round
            best = [r.tok_s / max(rows[p][n][i].tok_s for p in peers)
                    for i, r in enumerate(results)] if peers else [float("nan")]
            ttfts = [t for r in results for t in r.ttfts]
            itls = [t for r in results for t in r.itls]
            print(f"| {name} | {n} | {statistics.median(r.tok_s for r in results):.1f} | "
                  f"{percentile(ttfts, 0.5) * 1e3:.0f} ms | {percentile(ttfts, 0.99) * 1e3:.0f} ms"
                  f" | {percentile(itls, 0.5) * 1e3:.1f} ms | {statistics.median(ratios):.2f}x | "
                  f"{statistics.median(best):.2f}x |")


if __name__ == "__main__":
    main()
