"""Prometheus metrics of the HTTP server, kept in a registry of their own.

Engine gauges (requests running and waiting, KV blocks, prefix cache hit rate, preemptions, steps,
the engine core's busy time) come from the engine's stats when /metrics is scraped: the engine
core process sends them with every output frame and on request. Per-request latencies, token
counts and errors are recorded by the API server as each request ends. With several API server
processes, ``kiln serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` and every process's counters are
summed on each scrape, whichever process answers it.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)

FINISH_REASONS = ("stop", "length", "abort", "error")
ERROR_KINDS = (
    "invalid_request", "context_length_exceeded", "model_not_found", "unauthorized", "body_too_large",
    "queue_full", "timeout", "aborted", "unavailable", "internal",
)


_ENGINE_GAUGES = (
    ("kiln_requests_running", "requests being generated", "running"),
    ("kiln_requests_waiting", "requests waiting to be scheduled", "waiting"),
    ("kiln_kv_blocks_used", "KV cache blocks in use", "kv_blocks_used"),
    ("kiln_kv_blocks_free", "KV cache blocks free", "kv_blocks_free"),
    ("kiln_prefix_cache_hit_rate", "prefix cache hit rate", "prefix_cache_hit_rate"),
    ("kiln_engine_steps", "engine steps run", "steps"),
    ("kiln_spec_acceptance_rate", "share of speculative proposals that stood", "spec_acceptance_rate"),
)
_ENGINE_COUNTERS = (
    ("kiln_preemptions", "sequences preempted by the scheduler", "preemptions"),
    ("kiln_engine_busy_seconds", "seconds the engine core spent in steps", "core_busy_s"),
    ("kiln_engine_gathered_steps", "steps planned after a prefill step in flight ended, to take the requests that "
                                   "arrived meanwhile", "core_gathered_steps"),
    ("kiln_spec_proposed_tokens", "speculative tokens proposed", "spec_proposed_tokens"),
    ("kiln_spec_accepted_tokens", "speculative tokens that stood", "spec_accepted_tokens"),
    ("kiln_spec_budget_cut_tokens", "speculative proposals the step token budget left out", "spec_budget_cut_tokens"),
)


class _EngineCollector:
    """The engine's stats as gauges and (for the counts that only grow) counters."""

    def __init__(self, metrics: "ServerMetrics"):
        self._metrics = metrics

    def collect(self):
        s = self._metrics.stats
        for name, doc, key in _ENGINE_GAUGES:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s.get(key, 0) or 0))
            yield g
        used, free = s.get("kv_blocks_used", 0), s.get("kv_blocks_free", 0)
        total = s.get("kv_blocks_total") or (used + free)
        g = GaugeMetricFamily("kiln_kv_cache_usage", "fraction of KV cache blocks in use")
        g.add_metric([], used / total if total else 0.0)
        yield g
        for name, doc, key in _ENGINE_COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0) or 0))
            yield c
        host = s.get("host_s")
        if isinstance(host, dict) and host:
            c = CounterMetricFamily("kiln_engine_host_seconds", "host seconds of the engine core by phase of its step loop",
                                    labels=["phase"])
            for phase, v in sorted(host.items()):
                c.add_metric([str(phase)], float(v or 0))
            yield c


class ServerMetrics:
    def __init__(self, model_name: str, stats_fn=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self._stats_fn = stats_fn
        self.stats: dict = {}
        self.multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        r = self.registry
        self.http_inflight = Gauge("kiln_http_requests_in_flight", "generation requests the server is handling", registry=r,
                                   multiprocess_mode="livesum")
        self._engine = _EngineCollector(self)
        r.register(self._engine)
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
        self.stats = self._stats_fn() or {}

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
        if self.multiproc_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiproc_dir)
        merged.register(self._engine)
        return generate_latest(merged), CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics", "FINISH_REASONS", "ERROR_KINDS"]
