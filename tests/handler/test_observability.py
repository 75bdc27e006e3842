"""Logs that help and metrics that count: one log line per failed or aborted request (status,
reason, request id), no stack trace for a client's doing; /metrics has the KV blocks, the
preemptions and the requests ended by reason."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import socket
import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig, SpeculativeConfig
from tests.handler.server import serve


def _aborted_upload(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 5000\r\n\r\n{\"inputs\": \"hel")


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def _counting_ends(metrics, reason: str, num: int) -> threading.Event:
    """An event set once `num` requests have ended for `reason`."""
    reached, counts, real = threading.Event(), {"n": 0}, metrics.request_ended

    def request_ended(ended_reason: str) -> None:
        real(ended_reason)
        if ended_reason == reason:
            counts["n"] += 1
            if counts["n"] >= num:
                reached.set()

    metrics.request_ended = request_ended
    return reached


def test_one_log_line_per_failed_request_and_no_stack_traces(tiny_llama_dir, caplog):
    with serve(EngineConfig(model=tiny_llama_dir)) as server, caplog.at_level(logging.INFO):
        caplog.clear()
        all_gone = _counting_ends(server.state.metrics, "client_gone", 200)
        for _ in range(200):
            _aborted_upload(server.url)
        bad = [httpx.post(server.url + "/invocations", json={"inputs": 5}) for _ in range(20)]
        assert {r.status_code for r in bad} == {422}
        ok = httpx.post(server.url + "/invocations", json={"inputs": "Hi"})
        assert ok.status_code == 200
        server.wait_idle()
        # the disconnects are noticed as their reads end, in their own time
        assert all_gone.wait(30), "not every aborted upload was counted"
        metrics = _samples(server.url)
    records = [r for r in caplog.records if r.name.startswith(("handler", "uvicorn", "engine"))]
    assert not [r for r in records if r.exc_info], "a client's doing logged a stack trace"
    failed = [r.getMessage() for r in records if r.getMessage().startswith("request ")]
    assert len(failed) == 220
    assert sum(": 499 the client disconnected" in m for m in failed) == 200
    assert sum(": 422 inputs" in m for m in failed) == 20
    assert len(records) <= 220 + 10  # start-up lines aside, nothing else per request
    ended = {labels: v for (name, labels), v in metrics.items()
             if name == "llm_requests_ended_total"}
    assert ended == {(("reason", "client_gone"),): 200, (("reason", "refused"),): 20,
                     (("reason", "finished"),): 1, (("reason", "error"),): 0}


def test_metrics_have_the_kv_blocks_and_preemptions(tiny_llama_dir):
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 tokens, 2 kv heads, d 16, fp32
    with serve(EngineConfig(model=tiny_llama_dir, kv_cache_memory=12 * block_bytes)) as server:
        body = {"prompt": [5] * 60, "max_tokens": 100, "ignore_eos": True}
        with httpx.Client(timeout=60) as client, cf.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: client.post(
                server.url + "/v1/completions", json=body).status_code, range(4)))
        assert statuses == [200] * 4
        server.wait_idle()
        m = _samples(server.url)
    assert m[("llm_kv_cache_total_blocks", ())] == 12
    assert m[("llm_kv_cache_free_blocks", ())] == 12
    assert m[("llm_num_preemptions_total", ())] > 0  # 4 x 10 blocks cannot fit in 12
    assert m[("llm_model_load_phase", (("phase", "ready"),))] == 1


def test_metrics_count_draft_tokens_scored_and_kept(tiny_llama_dir):
    speculative = SpeculativeConfig(num_speculative_tokens=4)
    with serve(EngineConfig(model=tiny_llama_dir, speculative=speculative)) as server:
        body = {"prompt": [7, 8, 9] * 20, "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert answer.json()["choices"][0]["text"] is not None
        server.wait_idle()
        m = _samples(server.url)
        speculator = server.state.loader.engine.core.speculator
    assert m[("llm_spec_decode_num_draft_tokens_total", ())] == speculator.num_draft_tokens > 0
    assert (m[("llm_spec_decode_num_accepted_tokens_total", ())]
            == speculator.num_accepted_tokens)
