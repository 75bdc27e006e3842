"""The engine in its own process (the server's default): the same answers as the engine in this
process, refusals that cross the pipe with their field, and every way the process can end: told
to, killed, failing to load, or left behind by a server that died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from engine import EngineConfig, SamplingParams
from tests.handler.server import free_port, serve, wait_until_ready
from tests.polling import eventually
from tests.prompts import MAX_TOKENS, PROMPT


@pytest.fixture(scope="module")
def process_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), served_model_name="tiny",
               engine_process=True) as server:
        yield server


def _wait_for(condition) -> None:
    """Poll until `condition()` (a liveness bound of ~10 s, not a timing assertion)."""
    if not eventually(condition, 10, poll_s=0.02):
        raise AssertionError("the condition never held")


def test_answers_equal_the_offline_engine(process_server, expected_output):
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    plain = httpx.post(process_server.url + "/v1/completions", json=body, timeout=60).json()
    assert plain["choices"][0]["text"] == expected_output.text
    with httpx.stream("POST", process_server.url + "/v1/completions",
                      json={**body, "stream": True}, timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == expected_output.text


def test_logprob_token_texts_are_the_tokenizers(process_server, tiny_offline):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2}
    choice = httpx.post(process_server.url + "/v1/completions", json=body, timeout=60).json()[
        "choices"][0]
    tokenizer = tiny_offline.get_tokenizer()
    expected = tiny_offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4))[0]
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected.token_ids]
    for top in choice["logprobs"]["top_logprobs"]:
        assert len(top) == 2


def test_chat_template_and_refusals_cross_the_pipe(process_server, tiny_offline):
    messages = [{"role": "user", "content": "Hello there"}]
    chat = httpx.post(process_server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 5, "temperature": 0}).json()
    expected = tiny_offline.chat(messages, SamplingParams(temperature=0, max_tokens=5))
    assert chat["choices"][0]["message"]["content"] == expected.text
    bad = httpx.post(process_server.url + "/v1/completions",
                     json={"prompt": [10**7], "max_tokens": 5})
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "prompt"
    too_long = httpx.post(process_server.url + "/v1/completions",
                          json={"prompt": [5] * 100_000, "max_tokens": 5})
    assert too_long.status_code == 422


def test_a_stream_left_early_frees_its_blocks(process_server):
    body = {"prompt": [7] * 40, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", process_server.url + "/v1/completions", json=body,
                      timeout=60) as response:
        for _ in response.iter_lines():
            break

    def is_idle() -> bool:
        stats = process_server.state.loader.stats()
        return stats["num_running"] + stats["num_waiting"] == 0 and (
            stats["num_free_blocks"] == stats["num_blocks"])

    _wait_for(is_idle)
    metrics = httpx.get(process_server.url + "/metrics").text
    assert "llm_num_requests_running 0.0" in metrics


def test_a_killed_engine_ends_streams_and_fails_ping(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), engine_process=True) as server:
        body = {"inputs": "Hello", "stream": True,
                "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/invocations", json=body,
                          headers={"Accept": "application/jsonlines"}, timeout=30) as response:
            records = []
            for line in response.iter_lines():
                if line:
                    records.append(json.loads(line))
                    if len(records) == 1:
                        os.kill(server.state.loader.pid, signal.SIGKILL)
        assert records[-1]["details"]["finish_reason"] == "error"
        assert "exit code -9" in records[-1]["error"]
        ping = httpx.get(server.url + "/ping")
        assert ping.status_code == 500 and "exit code -9" in ping.json()["reason"]
        later = httpx.post(server.url + "/invocations", json={"inputs": "Hi"})
        assert later.status_code == 503


def test_a_failed_load_is_500_with_the_engines_reason(tmp_path):
    missing = tmp_path / "no-such-model"
    with serve(EngineConfig(model=str(missing)), wait_ready=False,
               engine_process=True) as server:
        assert server.state.loader.wait(60)
        ping = httpx.get(server.url + "/ping")
        assert ping.status_code == 500
        assert "no-such-model" in ping.json()["reason"]
        process = server.state.loader
    assert process.pid is not None and not _is_alive(process.pid)


def test_the_engine_stops_with_the_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), engine_process=True) as server:
        pid = server.state.loader.pid
        assert _is_alive(pid)
    assert not _is_alive(pid)


def test_the_engine_exits_when_the_server_is_killed(tiny_llama_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "handler", "--model", tiny_llama_dir, "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server)
        (engine_pid,) = _engines(server.pid)
        server.kill()
        server.wait(10)
        _wait_for(lambda: not _is_alive(engine_pid))
    finally:
        server.kill()


def _start_lazy_server(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "handler", "--model", model, "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning", "--load-on-first-request"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, server)
    return server, url


def _engine_pid(server_pid: int) -> int:
    _wait_for(lambda: _engines(server_pid))
    return _engines(server_pid)[0]


def test_lazy_mode_starts_the_engine_process_and_loads_on_the_first_request(
        tiny_llama_dir, expected_output):
    """With `--load-on-first-request` the engine's process is there (importing the engine)
    before any request, /ping is 200 with nothing loaded, and the first request loads it."""
    server, url = _start_lazy_server(tiny_llama_dir)
    try:
        engine_pid = _engine_pid(server.pid)
        ping = httpx.get(url + "/ping").json()
        assert ping["status"] == "idle" and ping["total_bytes"] == 0
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert answer.json()["choices"][0]["text"] == expected_output.text
        assert httpx.get(url + "/ping").json()["status"] == "ready"
        assert _is_alive(engine_pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        _wait_for(lambda: not _is_alive(engine_pid))
    finally:
        server.kill()


def test_lazy_mode_with_its_idle_engine_killed_fails_ping_and_requests(tiny_llama_dir):
    server, url = _start_lazy_server(tiny_llama_dir)
    try:
        os.kill(_engine_pid(server.pid), signal.SIGKILL)
        _wait_for(lambda: httpx.get(url + "/ping").status_code == 500)
        assert "exit code -9" in httpx.get(url + "/ping").json()["reason"]
        answer = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                            timeout=60)
        assert answer.status_code == 503
        assert "exit code -9" in answer.json()["error"]["message"]
    finally:
        server.kill()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _engines(server_pid: int) -> list[int]:
    """The server's engine process: forked (the server's own command line, as `python -m
    handler` starts it) or spawned (`spawn_main`)."""
    own = _cmdline(server_pid)
    return [pid for pid in _children(server_pid)
            if b"spawn_main" in _cmdline(pid) or _cmdline(pid) == own]


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_ping_tells_the_engines_load_as_it_goes():
    from engine.load_progress import LOAD_PHASES

    with serve(EngineConfig(model="", max_model_len=1024), wait_ready=False,
               engine_process=True) as server:
        answers = []
        for _ in range(3000):  # a liveness bound: the embedded model loads in seconds
            ping = httpx.get(server.url + "/ping", timeout=30)
            answers.append(ping)
            if ping.status_code != 503:
                break
            time.sleep(0.01)
    *loading, ready = answers
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert list(ready.json()["phase_seconds"]) == ["imports", "config", "weights", "tokenizer",
                                                   "kv_cache"]
    assert loading and all(a.json()["status"] == "loading" for a in loading)
    phases = [LOAD_PHASES.index(a.json()["phase"]) for a in loading]
    assert phases == sorted(phases)  # never backwards
    loaded = [a.json()["loaded_bytes"] for a in loading]
    assert loaded == sorted(loaded)


@pytest.mark.parametrize(("setup", "expected"), [
    ("", "fork"),  # the server's start: nothing but its own modules imported
    ("import torch", "spawn"),  # OpenMP's pool: a fork's copy of it would hang
    ("import threading, time; threading.Thread(target=time.sleep, args=(30,), daemon=True)"
     ".start()", "spawn"),
])
def test_the_engine_process_is_forked_only_from_a_process_without_threads(setup, expected):
    script = (f"{setup}\nimport handler.settings\nfrom engine.process_client import "
              "_start_method\nprint(_start_method())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == expected
