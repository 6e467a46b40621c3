"""Prometheus metrics: request outcomes and latency from this process, cache and queue state from SQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Names of the shared counters (mlxq.repos.counters) behind mlxq_requests_total and mlxq_generated_tokens_total.
REQUESTS = "requests"
# The `endpoint` label of a generation request, whether it is streamed or not: its route's in the dialect registry
# (api.dialects.registry: `Route.label`, and `endpoint_labels()` by path for requests refused before they have an
# outcome, which api.errors counts).
Endpoint = str


def request_counter(endpoint: str, status: int, cache: str) -> str:
    return f"{REQUESTS}:{endpoint}:{status}:{cache}"


GENERATED_TOKENS = "generated_tokens"


class _Snapshot(Collector):
    """Reads the same snapshot as /health at scrape time, so both always agree."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        cache = snap["cache"]
        for name, help_text in (
            ("hits", "Response-cache hits"),
            ("misses", "Response-cache misses"),
            ("bypass", "Requests that bypassed the response cache"),
            ("cached_items", "Entries in the response cache"),
            ("bytes", "Bytes of cached results"),
        ):
            yield GaugeMetricFamily(f"mlxq_cache_{name}", help_text, value=cache[name])
        yield GaugeMetricFamily("mlxq_cache_hit_rate", "hits / (hits + misses)", value=cache["hit_rate"])
        for name, value in snap["prefix_cache"].items():
            yield GaugeMetricFamily(f"mlxq_prefix_cache_{name}", f"Worker prefix KV cache: {name}", value=value)
        requests = CounterMetricFamily(
            "mlxq_requests",
            "Generation requests by endpoint, HTTP status and cache outcome (none for a refused request)",
            labels=["endpoint", "status", "cache"],
        )
        for name, value in snap["counters"].items():
            parts = name.split(":")
            if parts[0] == REQUESTS and len(parts) == 4:
                requests.add_metric(parts[1:], value)
        yield requests
        yield CounterMetricFamily(
            "mlxq_generated_tokens",
            "Tokens generated (cache hits excluded)",
            value=snap["counters"].get(GENERATED_TOKENS, 0),
        )
        yield GaugeMetricFamily("mlxq_queue_depth", "Jobs waiting for the worker", value=snap["queue_depth"])
        jobs = GaugeMetricFamily("mlxq_jobs", "Jobs by state (kept for MLXQ_JOB_RETENTION_S)", labels=["status"])
        for status, count in snap["jobs"].items():
            jobs.add_metric([status], count)
        yield jobs
        for name, value in snap["batch"].items():
            yield GaugeMetricFamily(
                f"mlxq_batch_{name}", f"Engine batch: {name} (workers' last heartbeat)", value=value
            )
        yield GaugeMetricFamily("mlxq_workers_alive", "Workers with a recent heartbeat", value=snap["worker"]["count"])
        yield GaugeMetricFamily(
            "mlxq_model_loaded", "1 when a live worker holds the model", value=1 if snap["model_loaded"] else 0
        )
        labels = ["worker", "model"]
        per_worker = {
            "load": GaugeMetricFamily(
                "mlxq_worker_load", "Sequences a worker decodes and holds waiting", labels=labels
            ),
            "prefix_entries": GaugeMetricFamily(
                "mlxq_worker_prefix_entries", "Entries in a worker's prefix cache", labels=labels
            ),
            "routed": GaugeMetricFamily(
                "mlxq_worker_routed_jobs", "Jobs routed to a worker (of those kept)", labels=labels
            ),
            "routed_to_cache": GaugeMetricFamily(
                "mlxq_worker_routed_to_cache_jobs",
                "Jobs routed to a prefix a worker held (of those kept)",
                labels=labels,
            ),
        }
        for worker in snap["workers"]:
            values = {**worker, "load": worker["load"]["active"] + worker["load"]["waiting"]}
            for name, family in per_worker.items():
                family.add_metric([worker["id"], worker["model"]], values[name])
        yield from per_worker.values()
        memory = GaugeMetricFamily(
            "mlxq_worker_memory_bytes",
            "A worker's memory budget and each part: its limits, what each holds, MLX's counts and the RSS",
            labels=[*labels, "part"],
        )
        for worker in snap["workers"]:
            for part, value in (worker.get("memory") or {}).items():
                memory.add_metric([worker["id"], worker["model"], part], value)
        yield memory


class Metrics:
    """Counters and gauges come from the database (the same in every api process and replica: scrape any);
    the latency histogram is this process's own."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "mlxq_request_seconds",
            "Time to answer a generation request",
            ["endpoint", "cache"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.registry.register(_Snapshot(snapshot))

    def observe(self, endpoint: str, cache: str, seconds: float) -> None:
        self.latency.labels(endpoint, cache).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
