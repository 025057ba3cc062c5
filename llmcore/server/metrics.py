"""Prometheus metrics for the server (one registry per app, every series labelled by model)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# latency buckets for CPU through GPU: 1 ms .. 5 min
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0,
            2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)

#: (name, help) of every metric, for the docs and tests
METRICS = {
    "llmcore_requests_total": "HTTP requests by route, status code and model",
    "llmcore_time_to_first_token_seconds": "Time from request arrival to its first generated token",
    "llmcore_inter_token_latency_seconds": "Time between two consecutive outputs of one request",
    "llmcore_e2e_request_latency_seconds": "Time from request arrival to its last token",
    "llmcore_prompt_tokens_total": "Prompt tokens processed",
    "llmcore_generation_tokens_total": "Tokens generated",
    "llmcore_num_requests_running": "Sequences in the running batch",
    "llmcore_num_requests_waiting": "Sequences waiting for a batch slot or KV blocks",
    "llmcore_num_requests_in_flight": "Requests admitted by the server and not finished",
    "llmcore_kv_blocks_used": "KV-cache blocks in use",
    "llmcore_kv_blocks_total": "KV-cache blocks in the cache",
    "llmcore_prefix_cache_hit_rate": "Share of prompt tokens served from the prefix cache",
    "llmcore_num_preemptions_total": "Sequences preempted (recomputed) because KV blocks ran out",
}


class _EngineCollector(Collector):
    """Reads each engine's stats snapshot at scrape time (never blocks the engine)."""

    def __init__(self, snapshot: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        data = self.snapshot()
        gauges = {
            "llmcore_num_requests_running": "num_running",
            "llmcore_num_requests_waiting": "num_waiting",
            "llmcore_num_requests_in_flight": "in_flight",
            "llmcore_kv_blocks_used": "kv_blocks_used",
            "llmcore_kv_blocks_total": "kv_blocks_total",
            "llmcore_prefix_cache_hit_rate": "prefix_cache_hit_rate",
        }
        for metric, key in gauges.items():
            g = GaugeMetricFamily(metric, METRICS[metric], labels=["model"])
            for model, s in data.items():
                g.add_metric([model], float(s.get(key, 0) or 0))
            yield g
        c = CounterMetricFamily("llmcore_num_preemptions", METRICS["llmcore_num_preemptions_total"], labels=["model"])
        for model, s in data.items():
            c.add_metric([model], float(s.get("num_preemptions", 0) or 0))
        yield c


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llmcore_requests", METRICS["llmcore_requests_total"],
                                ["route", "status", "model"], registry=r)
        self.ttft = Histogram("llmcore_time_to_first_token_seconds", METRICS["llmcore_time_to_first_token_seconds"],
                              ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("llmcore_inter_token_latency_seconds", METRICS["llmcore_inter_token_latency_seconds"],
                             ["model"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("llmcore_e2e_request_latency_seconds", METRICS["llmcore_e2e_request_latency_seconds"],
                             ["model"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("llmcore_prompt_tokens", METRICS["llmcore_prompt_tokens_total"], ["model"], registry=r)
        self.generation_tokens = Counter("llmcore_generation_tokens", METRICS["llmcore_generation_tokens_total"],
                                         ["model"], registry=r)
        r.register(_EngineCollector(snapshot))

    def count_request(self, route: str, status: int | str, model: str = "") -> None:
        """One finished request of any front end (``route``: a path template or an RPC name)."""
        self.requests.labels(route, str(status), model).inc()

    def init_model(self, model: str) -> None:
        """Create the model's series at zero so they are visible before the first request."""
        self.ttft.labels(model)
        self.itl.labels(model)
        self.e2e.labels(model)
        self.prompt_tokens.labels(model)
        self.generation_tokens.labels(model)
