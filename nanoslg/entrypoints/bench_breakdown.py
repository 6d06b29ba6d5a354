"""Where a `bench serve` run's time went, from nanoslg's /metrics read before and after the run: the client's TTFT
split into HTTP (client to API server and back), tokenizer and message passing, the scheduler's queue and the
prefill, plus how busy the workers were, the scheduler's own cost per step and how busy each of the server's
processes kept its CPU (the one at 100 % is the one that limits the server). A server that is not nanoslg (no
such metrics) gives no breakdown."""
from __future__ import annotations

from typing import Any, Optional

_WANTED = ("nanoslg_time_to_first_token_seconds_sum", "nanoslg_time_to_first_token_seconds_count",
           "nanoslg_request_queue_time_seconds_sum", "nanoslg_request_queue_time_seconds_count",
           "nanoslg_request_prefill_time_seconds_sum", "nanoslg_request_prefill_time_seconds_count",
           "nanoslg_engine_busy_seconds_total", "nanoslg_scheduler_cpu_seconds_total", "nanoslg_engine_steps_total",
           "nanoslg_num_preemptions_total")


_PROCESS_CPU = 'nanoslg_process_cpu_seconds_total{process="'


async def scrape(client, base_url: str) -> Optional[dict[str, float]]:
    """The unlabelled nanoslg totals of GET /metrics (client: an httpx.AsyncClient), or None when the server has
    none."""
    import httpx

    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics")
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    values = {}
    for line in resp.text.splitlines():
        name, _, value = line.partition(" ")
        if name in _WANTED:
            values[name] = float(value)
        elif name.startswith(_PROCESS_CPU):  # nanoslg_process_cpu_seconds_total{process="tokenizer"} 1.5
            values["cpu:" + name[len(_PROCESS_CPU):].strip('"}')] = float(value)
    return values if all(name in values for name in _WANTED) else None


def breakdown(before: Optional[dict[str, float]], after: Optional[dict[str, float]], duration_s: float,
              mean_ttft_ms: float) -> dict[str, Any]:
    """Mean milliseconds per request of each part of the TTFT, and the workers' load, over the run."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in _WANTED}
    # a process restarted during the run counts from 0 again: no figure for it
    busy = {k[4:]: (after[k] - before[k]) / duration_s for k in after
            if k.startswith("cpu:") and k in before and after[k] >= before[k] and duration_s}

    def mean_ms(metric: str) -> float:
        count = d[f"{metric}_count"]
        return 1000 * d[f"{metric}_sum"] / count if count else 0.0

    server_ttft = mean_ms("nanoslg_time_to_first_token_seconds")
    queue = mean_ms("nanoslg_request_queue_time_seconds")
    prefill = mean_ms("nanoslg_request_prefill_time_seconds")
    steps = d["nanoslg_engine_steps_total"]
    return {
        "ttft_http_ms": mean_ttft_ms - server_ttft,  # client to API server and back
        "ttft_tokenizer_ipc_ms": server_ttft - queue - prefill,  # API -> tokenizer -> scheduler, tokens back
        "ttft_queue_ms": queue,
        "ttft_prefill_ms": prefill,
        "workers_busy_fraction": d["nanoslg_engine_busy_seconds_total"] / duration_s if duration_s else 0.0,
        "step_ms": 1000 * d["nanoslg_engine_busy_seconds_total"] / steps if steps else 0.0,
        "scheduler_cpu_per_step_ms": 1000 * d["nanoslg_scheduler_cpu_seconds_total"] / steps if steps else 0.0,
        "steps": int(steps),
        "preemptions": int(d["nanoslg_num_preemptions_total"]),
        "process_cpu_busy": busy,
    }


def format_breakdown(b: dict[str, Any]) -> str:
    if not b:
        return ""
    return "\n".join([
        f"{' Where the time goes (server /metrics) ':-^50}",
        f"{'Mean TTFT: HTTP (ms):':<40}{b['ttft_http_ms']:<10.2f}",
        f"{'Mean TTFT: tokenizer + IPC (ms):':<40}{b['ttft_tokenizer_ipc_ms']:<10.2f}",
        f"{'Mean TTFT: scheduler queue (ms):':<40}{b['ttft_queue_ms']:<10.2f}",
        f"{'Mean TTFT: prefill on the workers (ms):':<40}{b['ttft_prefill_ms']:<10.2f}",
        f"{'Workers busy (fraction of the run):':<40}{b['workers_busy_fraction']:<10.3f}",
        f"{'Mean step on the workers (ms):':<40}{b['step_ms']:<10.2f}",
        f"{'Scheduler CPU per step (ms):':<40}{b['scheduler_cpu_per_step_ms']:<10.3f}",
        f"{'Steps / preemptions:':<40}{b['steps']} / {b['preemptions']}",
        f"{'CPU busy by process:':<40}" + ", ".join(f"{name} {frac:.0%}" for name, frac in
                                                    sorted(b.get("process_cpu_busy", {}).items())),
    ])
