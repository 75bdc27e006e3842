"""What the HTTP layer costs, by hand; results go in the README.

SmolLM2-135M fp32 (the embedded model). Prints: p50/p99 latency of /invocations for a 1-token
generation against the engine called directly; /ping requests per second (and its p99 while the
engine is busy); and the throughput benchmark's workload sent by 32 concurrent streaming clients
against the same workload through the offline API.

    .venv/bin/python bench/handler_overhead.py
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import workload  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

OPTIONS = dict(max_model_len=2048, max_num_batched_tokens=512)


@contextlib.contextmanager
def server_process() -> Iterator[str]:
    """The real server in its own process, so the load generator does not share its GIL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "handler", "--model", "default", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "2048", "--max-num-batched-tokens", "512",
         "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/ping").status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {statistics.median(samples) * 1e3:7.2f} ms  p99 {p99 * 1e3:7.2f} ms"


def one_token_direct(llm: LLM, n: int = 100) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=1)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        llm.generate(["The capital of France is"], params)
        times.append(time.perf_counter() - start)
    return times


def one_token_http(url: str, n: int = 100) -> list[float]:
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 1}}
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            client.post(url + "/invocations", json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


async def ping_rate(url: str, seconds: float = 3.0, concurrency: int = 8) -> tuple[float, list]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await client.get(url + "/ping")
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return len(latencies) / seconds, latencies


async def streamed_workload(url: str, prompts, output_lens) -> tuple[float, int]:
    async def one(client: httpx.AsyncClient, prompt, n) -> int:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        tokens = 0
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"usage"' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
        return tokens

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        counts = await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, output_lens,
                                                                      strict=True)))
    return time.perf_counter() - start, sum(counts)


async def ping_while_busy(url: str, prompts, output_lens) -> tuple[tuple[float, int], list]:
    work = asyncio.create_task(streamed_workload(url, prompts, output_lens))
    latencies = []
    async with httpx.AsyncClient(timeout=10) as client:
        while not work.done():
            start = time.perf_counter()
            await client.get(url + "/ping")
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
    return await work, latencies


def main() -> None:
    prompts, output_lens = workload(32)
    llm = LLM("", **OPTIONS)
    llm.generate(["warm up"], SamplingParams(max_tokens=2))
    print(f"1-token generation, engine direct: {percentiles(one_token_direct(llm))}")
    start = time.perf_counter()
    outputs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                     for n in output_lens])
    offline_s = time.perf_counter() - start
    offline_tokens = sum(len(o.token_ids) for o in outputs)
    del llm
    with server_process() as url:
        one_token_http(url, 5)
        print(f"1-token generation, /invocations:  {percentiles(one_token_http(url))}")
        rate, latencies = asyncio.run(ping_rate(url))
        print(f"/ping: {rate:.0f} requests/s (8 clients), idle {percentiles(latencies)}")
        (http_s, http_tokens), busy = asyncio.run(ping_while_busy(url, prompts, output_lens))
        print(f"/ping while serving the workload: {percentiles(busy)}")
    print(f"workload offline API: {offline_tokens} tokens in {offline_s:.1f} s = "
          f"{offline_tokens / offline_s:.1f} tok/s")
    print(f"workload over HTTP, 32 streaming clients: {http_tokens} tokens in {http_s:.1f} s = "
          f"{http_tokens / http_s:.1f} tok/s")


if __name__ == "__main__":
    main()
