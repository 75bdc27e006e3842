"""The server protects itself: slow headers and bodies are cut off, idle connections make room
for new ones past the cap, a cap of busy connections answers a clear 503, and 1,000 idle or slow
connections leave /ping answering. No assertion here is on a duration: each waits for the
server's behaviour (a close, a status) with a generous bound."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from engine import EngineConfig
from tests.handler.server import serve

GENEROUS = 30.0  # seconds to wait for a behaviour; never asserted as a latency


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=GENEROUS)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + GENEROUS
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_thousand_idle_and_slow_connections_leave_ping_answering(tiny_server):
    sockets = []
    try:
        for i in range(1000):
            sock = _connect(tiny_server.url)
            if i % 2:  # half of them start a request and never finish its headers
                sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        ping = httpx.get(tiny_server.url + "/ping", timeout=GENEROUS)
        assert ping.status_code == 200
        ok = httpx.post(tiny_server.url + "/invocations", timeout=GENEROUS,
                        json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert ok.status_code == 200
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def guarded_server(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), max_connections=16,
               timeout_request_headers=0.5, timeout_request_body=0.5,
               timeout_keep_alive=0.5) as server:
        yield server


def test_past_the_cap_idle_connections_make_room(guarded_server):
    sockets = [_connect(guarded_server.url) for _ in range(40)]
    try:
        assert httpx.get(guarded_server.url + "/ping", timeout=GENEROUS).status_code == 200
        assert guarded_server.server.config.http.guard.num_evicted > 0
    finally:
        for sock in sockets:
            sock.close()


def test_slow_headers_are_cut_off(guarded_server):
    sock = _connect(guarded_server.url)
    sock.sendall(b"POST /invocations HTTP/1.1\r\n")
    closed = threading.Event()

    def trickle():  # a header byte every 0.1 s, as a slowloris client sends them
        try:
            while not closed.is_set():
                sock.sendall(b"X")
                time.sleep(0.1)
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    answer = _read_until_closed(sock)
    closed.set()
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "took too long" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_a_slow_body_gets_408(guarded_server):
    sock = _connect(guarded_server.url)
    sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"inputs\":")
    answer = _read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"took more than" in answer


def test_idle_keep_alive_connections_are_closed(guarded_server):
    sock = _connect(guarded_server.url)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _read_until_closed(sock)  # the answer, then the close after the keep-alive timeout
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200")


def test_when_every_connection_is_busy_a_new_one_gets_503(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir), max_connections=8) as server:
        engine = server.state.loader.engine
        held, release = threading.Event(), threading.Event()
        real_step = engine.step

        def held_step():
            held.set()
            release.wait(GENEROUS)
            return real_step()

        engine.step = held_step
        guard = server.server.config.http.guard
        all_busy, real_set_idle = threading.Event(), guard.set_idle

        def counting_set_idle(connection, is_idle: bool) -> None:
            real_set_idle(connection, is_idle)
            if sum(since is None for since in guard.idle_since.values()) >= 8:
                all_busy.set()

        guard.set_idle = counting_set_idle
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(httpx.post(
            server.url + "/invocations", json=body, timeout=GENEROUS).status_code))
            for _ in range(8)]
        for worker in workers:
            worker.start()
        try:
            assert held.wait(GENEROUS)
            assert all_busy.wait(GENEROUS), "the 8 requests never all held a connection"
            refused = httpx.get(server.url + "/ping", timeout=GENEROUS)
            assert refused.status_code == 503
            assert "too many connections" in refused.json()["error"]["message"]
        finally:
            release.set()
            for worker in workers:
                worker.join(GENEROUS)
        assert results == [200] * 8
        assert httpx.get(server.url + "/ping", timeout=GENEROUS).status_code == 200


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    lowered = 256
    code = ("import resource; from handler.connections import raise_open_files_limit; "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard)),
    ).stdout.split()
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert int(out[0]) == int(out[1]) == expected > lowered
