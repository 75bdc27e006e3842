"""Many streams at once, clients that vanish mid-stream, metrics that match the work done, and an
engine loop that dies."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineConfig
from tests.handler.server import serve


async def _stream_tokens(client: httpx.AsyncClient, url: str, body: dict) -> list[dict]:
    records = []
    async with client.stream("POST", url + "/invocations", json=body,
                             headers={"Accept": "application/jsonlines"}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                records.append(json.loads(line))
    return records


def test_256_concurrent_streams_none_lost(tiny_server):
    async def run():
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            bodies = [{"inputs": f"Hello {i}", "stream": True,
                       "parameters": {"max_new_tokens": 4 + i % 5, "ignore_eos": True}}
                      for i in range(256)]
            return await asyncio.gather(*(_stream_tokens(client, tiny_server.url, b)
                                          for b in bodies))

    results = asyncio.run(run())
    for i, records in enumerate(results):
        assert len(records) == 4 + i % 5
        assert records[-1]["details"]["finish_reason"] == "length"
        assert records[-1]["generated_text"] == "".join(r["token"]["text"] for r in records)
    tiny_server.wait_idle()
    free, total = tiny_server.free_blocks()
    assert free == total


def test_100_clients_disconnecting_mid_stream_hold_no_blocks(tiny_server):
    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": [5 + i % 50] * 40, "max_tokens": 400, "stream": True,
                "ignore_eos": True}
        async with client.stream("POST", tiny_server.url + "/v1/completions",
                                 json=body) as response:
            async for _ in response.aiter_lines():
                break  # one record, then hang up

    async def run():
        limits = httpx.Limits(max_connections=120)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(100)))

    asyncio.run(run())
    tiny_server.wait_idle(timeout=20)
    engine = tiny_server.state.loader.engine
    assert not engine.has_unfinished_requests()
    free, total = tiny_server.free_blocks()
    assert free == total


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_metrics_match_the_work_done(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir)) as server:
        for n in (3, 5, 7):
            httpx.post(server.url + "/invocations",
                       json={"prompt": [4] * 20, "max_tokens": n, "ignore_eos": True})
        m = _samples(server.url)
        assert m[("llm_generation_tokens_total", ())] == 15
        assert m[("llm_request_success_total", (("finished_reason", "length"),))] == 3
        assert m[("llm_time_to_first_token_seconds_count", ())] == 3
        assert m[("llm_e2e_request_latency_seconds_count", ())] == 3
        assert m[("llm_request_queue_time_seconds_count", ())] == 3
        assert m[("llm_inter_token_latency_seconds_count", ())] == 2 + 4 + 6
        # 20 prompt tokens, then the same prompt hits the cache: 16 of them, twice
        assert m[("llm_prefix_cache_queries_total", ())] == 60
        assert m[("llm_prefix_cache_hits_total", ())] == 32
        assert m[("llm_prompt_tokens_total", ())] == 20 + 4 + 4
        assert m[("llm_num_requests_running", ())] == 0
        assert m[("llm_model_ready", ())] == 1
        assert m[("llm_model_load_bytes", ())] > 0


def _fail_after(engine, num_steps: int, held_until=lambda: True) -> None:
    """Make the engine's step raise, as a device fault would, after `num_steps` good steps
    taken once `held_until()` holds (the engine thread waits for it, so no request can finish
    or be refused before the test has them all in flight)."""
    real_step, calls = engine.step, {"n": 0}

    def failing_step():
        deadline = time.monotonic() + 30
        while not held_until() and time.monotonic() < deadline:
            time.sleep(0.01)
        calls["n"] += 1
        if calls["n"] > num_steps:
            raise RuntimeError("simulated device fault")
        return real_step()

    engine.step = failing_step


def test_engine_death_fails_ping_and_open_streams(tiny_llama_dir):
    with serve(EngineConfig(model=tiny_llama_dir)) as server:
        _fail_after(server.state.loader.engine, num_steps=3,
                    held_until=lambda: server.state.service.llm.num_pending >= 2)
        body = {"inputs": "Hello", "stream": True,
                "parameters": {"max_new_tokens": 50, "ignore_eos": True}}
        waiting: dict = {}
        plain = threading.Thread(target=lambda: waiting.update(response=httpx.post(
            server.url + "/invocations", timeout=30,
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 50, "ignore_eos": True}})))
        plain.start()
        with httpx.stream("POST", server.url + "/invocations", json=body,
                          headers={"Accept": "application/jsonlines"}, timeout=30) as response:
            records = [json.loads(line) for line in response.iter_lines() if line]
        assert response.status_code == 200
        assert records[-1]["details"]["finish_reason"] == "error"
        assert "simulated device fault" in records[-1]["error"]
        plain.join(30)
        assert waiting["response"].status_code == 503  # a waiting request fails, never hangs
        assert "simulated device fault" in waiting["response"].json()["error"]["message"]
        ping = httpx.get(server.url + "/ping")
        assert ping.status_code == 500 and "simulated device fault" in ping.json()["reason"]
        later = httpx.post(server.url + "/invocations", json={"inputs": "Hi"})
        assert later.status_code == 503


def test_response_stream_failure_is_a_model_stream_error(tiny_llama_dir):
    import boto3
    import pytest
    from botocore.exceptions import EventStreamError

    with serve(EngineConfig(model=tiny_llama_dir)) as server:
        _fail_after(server.state.loader.engine, num_steps=3,
                    held_until=lambda: server.state.service.llm.num_pending >= 1)
        runtime = boto3.client("sagemaker-runtime", endpoint_url=server.url,
                               region_name="us-east-1", aws_access_key_id="x",
                               aws_secret_access_key="x")
        response = runtime.invoke_endpoint_with_response_stream(
            EndpointName="e", ContentType="application/json",
            Body=json.dumps({"inputs": "Hello", "stream": True,
                             "parameters": {"max_new_tokens": 50, "ignore_eos": True}}))
        parts = []
        with pytest.raises(EventStreamError) as info:
            for event in response["Body"]:
                parts.append(event["PayloadPart"]["Bytes"])
        assert info.value.response["Error"]["Code"] == "ModelStreamError"
        assert "simulated device fault" in info.value.response["Error"]["Message"]
        assert parts  # the tokens before the failure, and the final "error" record, arrived
