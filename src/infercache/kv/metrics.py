"""Prometheus metrics for the controller: the engine's per-tier counters and request latencies.

Engine counters are read from `engine.stats()` at scrape time (no double bookkeeping); request
counts and latency histograms are recorded by the server. Every metric lives in a registry of
its own, so several controllers in one process (tests, embedding) don't collide.

Exported names (all labelled `kv_instance`, the engine's instance id, and for engine figures `tier`;
not `instance`, which Prometheus sets to the scrape target):
  infercache_kv_hits_total, infercache_kv_misses_total, infercache_kv_stores_total,
  infercache_kv_evictions_total, infercache_kv_errors_total, infercache_kv_bytes,
  infercache_kv_requests_total{route,method,status}, infercache_kv_request_duration_seconds{route},
  infercache_kv_moves_total{outcome}, infercache_kv_pending_moves.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TIER_COUNTERS = {
    "hits": "Chunk lookups served by this tier.",
    "misses": "Chunk lookups this tier could not serve.",
    "stores": "Chunks written to this tier.",
    "evictions": "Chunks evicted from this tier.",
    "errors": "Failures inside this tier (counted, never raised to callers).",
}


class ControllerMetrics:
    """The collectors of one controller; `render()` gives the Prometheus text exposition."""

    def __init__(self, instance_id: str, engine_stats: Callable[[], Any], pending_moves: Callable[[], int],
                 move_outcomes: Callable[[], dict[str, int]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.instance_id = instance_id
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "infercache_kv_requests", "Controller HTTP requests by route, method and status.",
            ["kv_instance", "route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "infercache_kv_request_duration_seconds", "Controller request latency by route.",
            ["kv_instance", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineCollector(instance_id, engine_stats, pending_moves, move_outcomes))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(self.instance_id, route, method, str(status)).inc()
        self.latency.labels(self.instance_id, route).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    """Reads engine.stats() on each scrape; a failing engine yields an error count, not a failed scrape."""

    def __init__(self, instance_id: str, engine_stats: Callable[[], Any], pending_moves: Callable[[], int],
                 move_outcomes: Callable[[], dict[str, int]]) -> None:
        self.instance_id = instance_id
        self.engine_stats = engine_stats
        self.pending_moves = pending_moves
        self.move_outcomes = move_outcomes
        self.scrape_errors = 0

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        tiers: dict[str, Any] = {}
        try:
            stats = self.engine_stats()
            data = stats.to_json() if hasattr(stats, "to_json") else dict(stats)
            tiers = dict(data.get("tiers") or {})
        except Exception as exc:
            self.scrape_errors += 1
            log.warning("engine stats unavailable for /metrics: %s", exc)
        for key, help_text in _TIER_COUNTERS.items():
            family = CounterMetricFamily(f"infercache_kv_{key}", help_text, labels=["kv_instance", "tier"])
            for tier, figures in tiers.items():
                family.add_metric([self.instance_id, tier], float((figures or {}).get(key, 0) or 0))
            yield family
        size = GaugeMetricFamily("infercache_kv_bytes", "Bytes of KV held by this tier.",
                                 labels=["kv_instance", "tier"])
        for tier, figures in tiers.items():
            size.add_metric([self.instance_id, tier], float((figures or {}).get("bytes", 0) or 0))
        yield size
        moves = CounterMetricFamily("infercache_kv_moves", "Background moves by outcome.",
                                    labels=["kv_instance", "outcome"])
        outcomes = self.move_outcomes()
        for outcome in ("finished", "failed"):
            moves.add_metric([self.instance_id, outcome], float(outcomes.get(outcome, 0)))
        yield moves
        pending = GaugeMetricFamily("infercache_kv_pending_moves", "Moves not finished yet.", labels=["kv_instance"])
        pending.add_metric([self.instance_id], float(self.pending_moves()))
        yield pending
        errors = CounterMetricFamily("infercache_kv_stats_errors", "Scrapes where engine stats failed.",
                                     labels=["kv_instance"])
        errors.add_metric([self.instance_id], float(self.scrape_errors))
        yield errors
