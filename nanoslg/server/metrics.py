"""Prometheus metrics of the server (prometheus-client), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanoslg_requests", "Finished HTTP generation requests by outcome", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("nanoslg_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("nanoslg_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("nanoslg_num_requests_running", "Requests the scheduler is running", registry=r)
        self.waiting = Gauge("nanoslg_num_requests_waiting", "Requests waiting for the scheduler", registry=r)
        self.kv_pages_used = Gauge("nanoslg_kv_pages_used", "KV cache pages in use", registry=r)
        self.prefix_queries = Counter("nanoslg_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("nanoslg_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=r)
        self.kv_pages_cached = Gauge("nanoslg_kv_pages_cached", "KV pages holding a cached prompt prefix",
                                     registry=r)
        self.preemptions = Counter("nanoslg_num_preemptions", "Requests preempted (their KV recomputed later)",
                                   registry=r)
        self.busy = Counter("nanoslg_engine_busy_seconds", "Time with a step in flight on the workers", registry=r)
        self.scheduler_cpu = Counter("nanoslg_scheduler_cpu_seconds", "Scheduler time forming steps and applying "
                                     "their results", registry=r)
        self.steps = Counter("nanoslg_engine_steps", "Steps (batches) the workers ran", registry=r)
        # scheduler state key -> the counter that follows it; the scheduler reports totals since its start
        self._totals = {"prefix_cache_queries": self.prefix_queries, "prefix_cache_hits": self.prefix_hits,
                        "total_preemptions": self.preemptions, "engine_busy_s": self.busy,
                        "scheduler_cpu_s": self.scheduler_cpu, "num_steps": self.steps}
        self._seen = dict.fromkeys(self._totals, 0)
        self.aborts = Counter("nanoslg_request_aborts", "Requests ended before they finished, by reason", ["reason"],
                              registry=r)
        self.restarts = Counter("nanoslg_engine_restarts", "Times the engine was restarted after a process died",
                                registry=r)
        self.kv_usage = Gauge("nanoslg_kv_cache_usage_ratio", "Fraction of KV cache pages in use", registry=r)
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

    def update_engine_state(self, state: dict) -> None:
        self.running.set(state.get("running", 0))
        self.waiting.set(state.get("waiting", 0))
        used, total = state.get("kv_pages_used", 0), state.get("kv_pages_total", 0)
        self.kv_pages_used.set(used)
        self.kv_usage.set(used / total if total else 0.0)
        self.kv_pages_cached.set(state.get("kv_pages_cached", 0))
        # The scheduler reports totals since its start; a restarted engine starts again from 0.
        for key, counter in self._totals.items():
            self._advance(key, counter, state.get(key, 0))

    def count_restarts(self, total: int) -> None:
        self._advance("engine_restarts", self.restarts, total)

    def _advance(self, key: str, counter: Counter, total: int) -> None:
        """Moves counter on to a total counted elsewhere since its start."""
        seen = self._seen.get(key, 0)
        counter.inc(total - seen if total >= seen else total)
        self._seen[key] = total

    def observe_first_token(self, queue_time: float, prefill_time: float) -> None:
        self.queue_time.observe(queue_time)
        self.prefill_time.observe(prefill_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
