"""Prometheus metrics of the HTTP server, kept in a registry of their own.

Engine gauges (requests running and waiting, KV blocks, prefix cache hit rate, preemptions) are
read from ``AsyncEngine.stats()`` when /metrics is scraped; per-request latencies and token
counts are recorded by the server as each request ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)

FINISH_REASONS = ("stop", "length", "abort", "error")
ERROR_KINDS = (
    "invalid_request", "context_length_exceeded", "model_not_found", "unauthorized", "body_too_large",
    "queue_full", "timeout", "aborted", "unavailable", "internal",
)


class _PreemptionCollector:
    """Exposes the engine's own preemption count as a counter (it only grows)."""

    def __init__(self, metrics: "ServerMetrics"):
        self._metrics = metrics

    def collect(self):
        c = CounterMetricFamily("kiln_preemptions", "sequences preempted by the scheduler")
        c.add_metric([], float(self._metrics.stats.get("preemptions", 0)))
        yield c


class ServerMetrics:
    def __init__(self, model_name: str, stats_fn=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self._stats_fn = stats_fn
        self.stats: dict = {}
        r = self.registry
        self.running = Gauge("kiln_requests_running", "requests being generated", registry=r)
        self.waiting = Gauge("kiln_requests_waiting", "requests waiting to be scheduled", registry=r)
        self.kv_used = Gauge("kiln_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("kiln_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_usage = Gauge("kiln_kv_cache_usage", "fraction of KV cache blocks in use", registry=r)
        self.hit_rate = Gauge("kiln_prefix_cache_hit_rate", "prefix cache hit rate", registry=r)
        self.engine_steps = Gauge("kiln_engine_steps", "engine steps run", registry=r)
        self.http_inflight = Gauge("kiln_http_requests_in_flight", "generation requests the server is handling", registry=r)
        r.register(_PreemptionCollector(self))
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kiln_time_per_output_token_seconds", "time per output token after the first", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "request latency, arrival to finish", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("kiln_request_success", "finished completions by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("kiln_request_errors", "failed requests by kind", ["kind"], registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(finish_reason=reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)

    def refresh(self) -> None:
        if self._stats_fn is None:
            return
        s = self._stats_fn() or {}
        self.stats = s
        self.running.set(s.get("running", 0))
        self.waiting.set(s.get("waiting", 0))
        used, free = s.get("kv_blocks_used", 0), s.get("kv_blocks_free", 0)
        total = s.get("kv_blocks_total") or (used + free)
        self.kv_used.set(used)
        self.kv_free.set(free)
        self.kv_usage.set(used / total if total else 0.0)
        self.hit_rate.set(s.get("prefix_cache_hit_rate", 0.0) or 0.0)
        self.engine_steps.set(s.get("steps", 0))

    def observe_request(self, out) -> None:
        """Records a finished RequestOutput: latencies, tokens and finish reasons."""
        m = out.metrics or {}
        arrival, first, finish = m.get("arrival"), m.get("first_token"), m.get("finish")
        n_out = sum(len(c.token_ids) for c in out.outputs)
        if arrival is not None and first is not None:
            self.ttft.observe(max(0.0, first - arrival))
        if first is not None and finish is not None and out.outputs:
            steps = max(len(c.token_ids) for c in out.outputs) - 1
            if steps > 0:
                self.tpot.observe(max(0.0, finish - first) / steps)
        if arrival is not None and finish is not None:
            self.e2e.observe(max(0.0, finish - arrival))
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(n_out)
        for c in out.outputs:
            reason = c.finish_reason if c.finish_reason in FINISH_REASONS else "error"
            self.finished.labels(finish_reason=reason).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind if kind in ERROR_KINDS else "internal").inc()

    def render(self) -> tuple[bytes, str]:
        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics", "FINISH_REASONS", "ERROR_KINDS"]
