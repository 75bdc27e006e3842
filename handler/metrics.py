"""Prometheus metrics: request latencies observed by the handler, engine counters read from the
engine at scrape time (so they are never out of step with it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine import RequestOutput
from engine.load_progress import LOAD_PHASES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=self.registry)

        self.time_to_first_token = histogram(
            "llm_time_to_first_token_seconds", "Arrival to first generated token.",
            LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "llm_inter_token_latency_seconds", "Time between a request's streamed steps.",
            TOKEN_BUCKETS)
        self.e2e_latency = histogram(
            "llm_e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        self.queue_time = histogram(
            "llm_request_queue_time_seconds", "Arrival to first scheduled step.", LATENCY_BUCKETS)
        self.request_success = Counter(
            "llm_request_success", "Finished sequences by finish reason.", ["finished_reason"],
            registry=self.registry)
        self.requests_ended = Counter(
            "llm_requests_ended", "HTTP requests by how they ended: finished, client_gone, "
            "error (failed in the engine or cut by a deadline or shutdown), refused (4xx, 429, "
            "503 before running).", ["reason"], registry=self.registry)
        for reason in ("finished", "client_gone", "error", "refused"):
            self.requests_ended.labels(reason)
        self._collector = _EngineCollector()
        self.registry.register(self._collector)

    def watch(self, stats: Callable[[], dict[str, Any] | None],
              load_status: Callable[[], dict[str, Any]]) -> None:
        self._collector.stats, self._collector.load_status = stats, load_status

    def request_ended(self, reason: str) -> None:
        self.requests_ended.labels(reason).inc()

    def record_finished(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            self.request_success.labels(completion.finish_reason or "unknown").inc()
        m = output.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.time_to_first_token.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.finished_time is not None:
            self.e2e_latency.observe(m.finished_time - m.arrival_time)


class _EngineCollector:
    def __init__(self) -> None:
        self.stats: Callable[[], dict[str, Any] | None] = lambda: None
        self.load_status: Callable[[], dict[str, Any]] = dict

    def describe(self) -> list[Metric]:
        return []  # collected fresh each scrape

    def collect(self) -> Iterator[Metric]:
        load = self.load_status()
        yield _gauge("llm_model_load_seconds", "Seconds the model load took (so far).",
                     load.get("elapsed_s", 0.0))
        yield _gauge("llm_model_load_bytes", "Weight bytes loaded.", load.get("loaded_bytes", 0))
        yield _gauge("llm_model_ready", "1 once the model serves.",
                     1.0 if load.get("status") == "ready" else 0.0)
        phase = GaugeMetricFamily("llm_model_load_phase", "1 for the phase the load is in.",
                                  labels=["phase"])
        seconds = GaugeMetricFamily("llm_model_load_phase_seconds",
                                    "Seconds the load spent in each phase (so far).",
                                    labels=["phase"])
        phase_seconds = load.get("phase_seconds", {})
        for name in LOAD_PHASES:
            phase.add_metric([name], 1.0 if load.get("phase") == name else 0.0)
            if name in phase_seconds:
                seconds.add_metric([name], phase_seconds[name])
        yield phase
        yield seconds
        stats = self.stats()
        if not stats:
            return
        yield _gauge("llm_num_requests_running", "Sequences in the running batch.",
                     stats["num_running"])
        yield _gauge("llm_num_requests_waiting", "Sequences waiting to be scheduled.",
                     stats["num_waiting"])
        yield _gauge("llm_kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).",
                     stats["kv_cache_usage"])
        yield _gauge("llm_kv_cache_free_blocks", "KV-cache blocks free.",
                     stats["num_free_blocks"])
        yield _gauge("llm_kv_cache_total_blocks", "KV-cache blocks in all.", stats["num_blocks"])
        yield _gauge("llm_compiled_decode_ready",
                     "1 once the compiled one-sequence decode step serves (--compile-decode).",
                     float(stats["compiled_decode_ready"]))
        counters = {
            "llm_prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                                         "prefix_cache_query_tokens"),
            "llm_prefix_cache_hits": ("Prompt tokens served by the prefix cache.",
                                      "prefix_cache_hit_tokens"),
            "llm_prompt_tokens": ("Prompt tokens computed.", "prompt_tokens"),
            "llm_generation_tokens": ("Tokens generated.", "generation_tokens"),
            "llm_num_preemptions": ("Sequences preempted.", "num_preemptions"),
            "llm_spec_decode_num_draft_tokens": ("Draft tokens scored (--speculative-config).",
                                                 "spec_decode_draft_tokens"),
            "llm_spec_decode_num_accepted_tokens": ("Draft tokens kept.",
                                                    "spec_decode_accepted_tokens"),
        }
        for name, (doc, key) in counters.items():
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], stats[key])
            yield counter


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc)
    gauge.add_metric([], value)
    return gauge
