"""Prometheus metrics of the server (prometheus-client).

Per-request metrics (counters, histograms) live in each API-server process; with several of them
(`serve --api-server-count`) prometheus-client's multiprocess mode keeps them in files under
$PROMETHEUS_MULTIPROC_DIR, which the first process sets before anything imports prometheus-client, and a scrape
of any process sums every process's files. The engine's figures (KV pages, queues, the scheduler's totals, restarts,
each process's CPU time) are read at scrape time by the process that answers, so they are never summed."""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# scheduler state key -> (metric name, help); the scheduler reports totals since its start
_ENGINE_TOTALS = {
    "prefix_cache_queries": ("nanoslg_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hits": ("nanoslg_prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    "total_preemptions": ("nanoslg_num_preemptions", "Requests preempted (their KV recomputed later)"),
    "engine_busy_s": ("nanoslg_engine_busy_seconds", "Time with a step in flight on the workers"),
    "scheduler_cpu_s": ("nanoslg_scheduler_cpu_seconds", "Scheduler time forming steps and applying their results"),
    "num_steps": ("nanoslg_engine_steps", "Steps (batches) the workers ran"),
}
_ENGINE_GAUGES = {
    "running": ("nanoslg_num_requests_running", "Requests the scheduler is running"),
    "waiting": ("nanoslg_num_requests_waiting", "Requests waiting for the scheduler"),
    "kv_pages_used": ("nanoslg_kv_pages_used", "KV cache pages in use"),
    "kv_pages_cached": ("nanoslg_kv_pages_cached", "KV pages holding a cached prompt prefix"),
}


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a live process, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


class EngineFigures:
    """The engine's figures as of the last scrape, exposed by this process's registry (a custom collector)."""

    def __init__(self, dtypes: tuple[str, str] = ("", "")) -> None:
        self.dtypes = dtypes  # (weights, KV cache)
        self.gauges: dict[str, float] = {}
        self.totals: dict[str, float] = dict.fromkeys(_ENGINE_TOTALS, 0.0)
        self._seen: dict[str, float] = dict.fromkeys(_ENGINE_TOTALS, 0.0)
        self.restarts = 0
        self.pids: dict[str, int] = {}

    def update(self, state: Optional[dict[str, Any]], restarts: int, pids: dict[str, int]) -> None:
        self.restarts, self.pids = restarts, dict(pids)
        if state is None:  # the engine is down: the gauges keep their last values
            return
        for key in _ENGINE_GAUGES:
            self.gauges[key] = state.get(key, 0)
        used, total = state.get("kv_pages_used", 0), state.get("kv_pages_total", 0)
        self.gauges["kv_usage"] = used / total if total else 0.0
        for key in _ENGINE_TOTALS:  # a restarted engine counts from 0 again: carry on from what was counted
            now, seen = state.get(key, 0), self._seen[key]
            self.totals[key] += now - seen if now >= seen else now
            self._seen[key] = now

    def describe(self) -> list[Metric]:
        return []  # generated at scrape time: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        for key, (name, doc) in _ENGINE_GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=self.gauges.get(key, 0))
        yield GaugeMetricFamily("nanoslg_kv_cache_usage_ratio", "Fraction of KV cache pages in use",
                                value=self.gauges.get("kv_usage", 0.0))
        info = GaugeMetricFamily("nanoslg_model_dtype_info", "The dtypes the model's weights and KV cache are stored "
                                 "in (always 1)", labels=["weights", "kv_cache"])
        info.add_metric(list(self.dtypes), 1)
        yield info
        for key, (name, doc) in _ENGINE_TOTALS.items():
            yield CounterMetricFamily(name, doc, value=self.totals[key])
        yield CounterMetricFamily("nanoslg_engine_restarts", "Times the engine was restarted after a process died",
                                  value=self.restarts)
        cpu = CounterMetricFamily("nanoslg_process_cpu_seconds", "CPU time of each of the server's processes "
                                  "(API servers, tokenizer, scheduler, workers), by name", labels=["process"])
        for name, pid in sorted(self.pids.items()):
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                cpu.add_metric([name], seconds)
        yield cpu


class ServerMetrics:
    def __init__(self, dtypes: tuple[str, str] = ("", "")) -> None:
        self.registry = CollectorRegistry()  # what /metrics renders
        shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if shared:
            MultiProcessCollector(self.registry)  # every API-server process's files, summed
        r = None if shared else self.registry  # shared: the values live in files, collected above
        self.requests = Counter("nanoslg_requests", "Finished HTTP generation requests by outcome", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("nanoslg_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("nanoslg_generation_tokens", "Tokens generated", registry=r)
        self.aborts = Counter("nanoslg_request_aborts", "Requests ended before they finished, by reason", ["reason"],
                              registry=r)
        self.ttft = Histogram("nanoslg_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("nanoslg_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.queue_time = Histogram("nanoslg_request_queue_time_seconds", "Time a request waited in the "
                                    "scheduler's queue before its first step", registry=r, buckets=_LATENCY_BUCKETS)
        self.prefill_time = Histogram("nanoslg_request_prefill_time_seconds", "Time from a request's first step "
                                      "to its first token", registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("nanoslg_e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.engine = EngineFigures(dtypes)
        self.registry.register(self.engine)

    def observe_request(self, status: str, start: float, first_token: float | None, end: float,
                        prompt_tokens: int, output_tokens: int) -> None:
        self.requests.labels(status=status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e.observe(end - start)
        if first_token is not None:
            self.ttft.observe(first_token - start)
            if output_tokens > 1:
                self.tpot.observe((end - first_token) / (output_tokens - 1))

    def observe_first_token(self, queue_time: float, prefill_time: float) -> None:
        self.queue_time.observe(queue_time)
        self.prefill_time.observe(prefill_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
