"""`python -m handler --tensor-parallel-size 2`: answers as one rank does; a killed worker makes
/ping 500 naming its rank and requests 503; SIGTERM stops the server and no process outlives it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from engine import SamplingParams
from tests.handler.server import free_port, wait_until_ready
from tests.handler.test_startup import ROOT

pytestmark = pytest.mark.slow


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _spawned(process: psutil.Process) -> list[psutil.Process]:
    """Its children started by multiprocessing: spawned (`spawn_main`), or forked (the server
    forks its engine's process: the same command line)."""
    own = process.cmdline()
    return [p for p in process.children()
            if "spawn_main" in " ".join(p.cmdline()) or p.cmdline() == own]


def _engine_and_workers(pid: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """The server's engine process, and the rank processes it started."""
    (engine,) = _spawned(psutil.Process(pid))
    return engine, _spawned(engine)


@pytest.mark.parametrize("kill_worker", [False, True])
def test_two_ranks_serve_and_stop_with_the_server(tiny_llama_dir, tiny_offline, kill_worker):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "handler", "--model", tiny_llama_dir, "--host", "127.0.0.1",
         "--port", str(port), "--tensor-parallel-size", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        # Ready only once every rank has loaded its share: the wait is a phase of its own.
        assert "ranks" in httpx.get(url + "/ping", timeout=5).json()["phase_seconds"]
        engine, workers = _engine_and_workers(process.pid)
        assert len(workers) == 1
        body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        [expected] = tiny_offline.generate(
            [body["prompt"]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert answer["choices"][0]["text"] == expected.text

        if kill_worker:
            _kill_and_check_the_server_says_so(url, workers[0], body)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert not [p for p in [engine, *workers] if _is_alive(p)]
    finally:
        if process.poll() is None:
            process.kill()


def _kill_and_check_the_server_says_so(url: str, worker: psutil.Process, body: dict) -> None:
    """Kill the worker under a streaming request: the stream ends with an error record (never
    hangs), then /ping is 500 naming the rank and new requests are refused."""
    long_body = {"inputs": "hello", "stream": True,
                 "parameters": {"max_new_tokens": 450, "ignore_eos": True}}
    with httpx.stream("POST", url + "/invocations", json=long_body, timeout=120,
                      headers={"Accept": "application/jsonlines"}) as response:
        lines = response.iter_lines()
        records = [json.loads(next(lines))]  # the request is surely running now
        worker.kill()
        records += [json.loads(line) for line in lines if line]
    assert records[-1]["details"]["finish_reason"] == "error" and records[-1]["error"]
    assert len(records) < 450
    for _ in range(300):  # a liveness bound: the server notices the exit at its next look
        ping = httpx.get(url + "/ping", timeout=5)
        if ping.status_code != 200:
            break
        time.sleep(0.1)
    assert ping.status_code == 500 and "rank 1 exited" in ping.json()["reason"]
    refused = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert refused.status_code == 503 and "rank 1" in refused.json()["error"]["message"]
