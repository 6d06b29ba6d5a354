"""`nanoslg bench serve`: load-test a running OpenAI-compatible server, in the manner of `vllm bench serve`.

Each request is streamed so that time to first token (TTFT), inter-token latency (ITL), time per output token
(TPOT) and end-to-end latency (E2E) can be measured on the client side. Results go to stdout (a vLLM-like
table), a JSON file (config, metrics, per-request records) and a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from nanoslg.entrypoints.bench_breakdown import breakdown, format_breakdown, scrape
from nanoslg.entrypoints.bench_clients import client_report, new_client, send_from_processes, send_share
from nanoslg.entrypoints.bench_datasets import (TOKEN_ID_RANGE, BenchRequest, format_turns, make_conversations,
                                                make_requests, range_ratio_arg, run_conversations, ttft_by_turn)


@dataclass
class RequestResult:
    index: int
    input_len: int
    output_len: int
    success: bool = False
    error: str = ""
    start: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between consecutive content chunks
    e2e: float = 0.0  # seconds
    prompt_tokens: int = 0
    output_tokens: int = 0
    generated_text: str = ""
    output_ids: list[int] = field(default_factory=list)  # the generated token ids (the server's return_token_ids)
    turn: int = 0  # multi-turn dataset: the turn of its conversation


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--dataset", choices=["random", "sharegpt-like", "multi-turn"], default="random",
                        help="multi-turn: --num-prompts conversations of --turns turns after a shared system prompt "
                             "(token ids, implies --prompt-ids)")
    parser.add_argument("--prompt-ids", action="store_true",
                        help="send token-id prompts to /v1/completions and read generated ids back "
                             "(return_token_ids): drives a server with dummy weights and no tokenizer")
    parser.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=list(TOKEN_ID_RANGE), metavar=("LOW", "HIGH"),
                        help="token-id prompts (--prompt-ids, multi-turn) are drawn from [LOW, HIGH)")
    parser.add_argument("--system-prompt-len", type=int, default=2000, help="multi-turn: shared system prompt tokens")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (random)")
    parser.add_argument("--random-range-ratio", type=range_ratio_arg, default=0.0,
                        help="random: draw lengths uniformly within +-ratio of --input-len / --output-len (vLLM's)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s with Poisson arrivals (default inf: send all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="send from this many processes (request i from process i %% N), so the client is not "
                             "what limits a fast server; the CPU each one used is reported (not with multi-turn)")
    parser.add_argument("--num-warmups", type=int, default=1,
                        help="unrecorded requests sent first; if all of them fail the run stops (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--result-json", default=None, help="default: bench-serve-<timestamp>.json")
    parser.add_argument("--plot", default=None, help="default: the result JSON's path with .png")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the server to generate exactly max_tokens tokens (default on)")


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: all zero for an infinite rate, else a seeded Poisson process."""
    if math.isinf(rate) or num == 0:
        return [0.0] * num
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=num)
    gaps[0] = 0.0  # the first request goes out immediately, as in vLLM
    return np.cumsum(gaps).tolist()


async def send_request(client, url: str, payload: dict[str, Any], chat: bool, result: RequestResult, t0: float) -> None:
    """Stream one request, filling `result` with its timings; never raises."""
    start = time.perf_counter()
    result.start = start - t0
    chunk_times, texts, usage = [], [], None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    err = event["error"]
                    result.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    return
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    ids = choice.get("token_ids") or []
                    # Only chunks that carry text (or token ids: a model served without a tokenizer) count as
                    # tokens: a chat stream's role-only first chunk and the final finish_reason chunk would
                    # otherwise distort TTFT and ITL.
                    if text or ids:
                        chunk_times.append(time.perf_counter())
                        texts.append(text or "")
                        result.output_ids.extend(ids)
        end = time.perf_counter()
    except Exception as e:  # connection drops, timeouts, malformed events: the request failed, the run goes on
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return
    result.success = True
    result.e2e = end - start
    # With no text at all the whole answer arrived at the end: that is the first-token time too.
    result.ttft = (chunk_times[0] - start) if chunk_times else result.e2e
    result.itl = np.diff(chunk_times).tolist()
    result.generated_text = "".join(texts)
    result.output_tokens = int((usage or {}).get("completion_tokens") or len(chunk_times))
    result.prompt_tokens = int((usage or {}).get("prompt_tokens") or result.input_len)


async def run_requests(args, model: str, requests: list[BenchRequest], headers: dict[str, str],
                       conversations: Optional[tuple[list[int], list[list[list[int]]]]] = None
                       ) -> tuple[list[RequestResult], float, str, dict[str, Any], list[float]]:
    """(per-request results, benchmark duration in s, warm-up error or "", the server's breakdown). With
    conversations (system prompt ids, user turns), those run instead of requests, which then only serve the
    warm-up."""
    import httpx

    chat = args.endpoint == "chat"
    url = args.base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    offsets = arrival_offsets(len(requests), args.request_rate, args.seed)
    results = [RequestResult(i, r.input_len, r.output_len) for i, r in enumerate(requests)]
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    def payload(req: BenchRequest) -> dict[str, Any]:
        body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if args.prompt_ids:
            body["return_token_ids"] = True
        if args.ignore_eos:
            body["ignore_eos"] = True
        if chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    async with new_client(headers, args.max_concurrency) as client:
        # The client's first request pays one-off setup (lazy imports, first connection) that would otherwise
        # land on the first benchmark request's TTFT; a cheap GET absorbs it.
        with contextlib.suppress(httpx.HTTPError):
            await client.get(args.base_url.rstrip("/") + "/v1/models")
        # Unrecorded warm-up requests take a fresh server's one-off costs (first kernels, allocations) out of
        # the numbers and, like vLLM's initial test run, stop a misconfigured run before it sends everything.
        warmups = [RequestResult(-1, 0, 0) for _ in range(min(args.num_warmups, len(requests)))]
        await asyncio.gather(*(send_request(client, url, payload(requests[i]), chat, w, 0.0)
                               for i, w in enumerate(warmups)))
        if warmups and not any(w.success for w in warmups):
            return results, 0.0, warmups[0].error, {}, []
        server_before = await scrape(client, args.base_url)
        t0, cpu0 = time.perf_counter(), time.process_time()
        if conversations is not None:
            results = await _conversations(args, conversations, client, url, payload, limit, t0)
            cpu = [time.process_time() - cpu0]
        elif args.client_processes > 1:
            _, cpu = await asyncio.to_thread(send_from_processes, args.client_processes, url,
                                             [payload(r) for r in requests], offsets, results, headers,
                                             args.max_concurrency, chat, send_request)
        else:
            cpu = [await send_share(client, url, [payload(r) for r in requests], offsets, results,
                                    args.max_concurrency, chat, t0, send_request)]
        duration = time.perf_counter() - t0
        server_after = await scrape(client, args.base_url)
    ok_ttfts = [r.ttft for r in results if r.success]
    mean_ttft_ms = 1000 * sum(ok_ttfts) / len(ok_ttfts) if ok_ttfts else 0.0
    return results, duration, "", breakdown(server_before, server_after, duration, mean_ttft_ms), cpu


async def _conversations(args, conversations: tuple[list[int], list[list[list[int]]]], client, url: str, payload,
                         limit, t0: float) -> list[RequestResult]:
    system, users = conversations

    async def send(prompt: list[int], result: RequestResult) -> None:
        async with (limit or contextlib.nullcontext()):
            await send_request(client, url, payload(BenchRequest(prompt, len(prompt), args.output_len)), False,
                               result, t0)

    return await run_conversations(system, users, arrival_offsets(len(users), args.request_rate, args.seed), send,
                                   lambda i, n: RequestResult(i, n, args.output_len))


def _tpot_s(r) -> float:
    """Seconds per output token after the first (vLLM's TPOT); defined for requests with 2+ output tokens."""
    return (r.e2e - r.ttft) / (r.output_tokens - 1)


def compute_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    ms = lambda xs: [1000.0 * x for x in xs]  # noqa: E731
    ttfts = ms([r.ttft for r in ok])
    tpots = ms([_tpot_s(r) for r in ok if r.output_tokens > 1])
    itls = ms([gap for r in ok for gap in r.itl])
    e2es = ms([r.e2e for r in ok])
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    metrics = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2es)):
        arr = np.asarray(values, dtype=float)
        metrics[f"mean_{name}_ms"] = float(arr.mean()) if arr.size else 0.0
        metrics[f"median_{name}_ms"] = float(np.median(arr)) if arr.size else 0.0
        metrics[f"p99_{name}_ms"] = float(np.percentile(arr, 99)) if arr.size else 0.0
    return metrics


def format_summary(m: dict[str, Any]) -> str:
    def row(label, value):
        return f"{label:<40}{value:.2f}" if isinstance(value, float) else f"{label:<40}{value}"

    def section(title, key, unit_name):
        return [f"{title:-^50}"] + [row(f"{stat} {unit_name} (ms):", m[f"{k}_{key}_ms"])
                                    for stat, k in (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))]

    lines = [f"{' Serving Benchmark Result ':=^50}",
             row("Successful requests:", m["completed"]), row("Failed requests:", m["failed"]),
             row("Benchmark duration (s):", m["duration_s"]),
             row("Total input tokens:", m["total_input_tokens"]),
             row("Total generated tokens:", m["total_output_tokens"]),
             row("Request throughput (req/s):", m["request_throughput"]),
             row("Output token throughput (tok/s):", m["output_throughput"]),
             row("Total token throughput (tok/s):", m["total_token_throughput"])]
    lines += section("Time to First Token", "ttft", "TTFT")
    lines += section("Time per Output Token (excl. 1st token)", "tpot", "TPOT")
    lines += section("Inter-token Latency", "itl", "ITL")
    lines += section("End-to-end Latency", "e2el", "E2EL")
    lines.append("=" * 50)
    return "\n".join(lines)


def save_plot(path: str, results: list[RequestResult], metrics: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; also safe if pyplot was imported elsewhere first
    import matplotlib.pyplot as plt

    # x is the request's rank by start time: readable both for a burst (all starts ~0) and for Poisson arrivals.
    order = {r.index: rank for rank, r in enumerate(sorted(results, key=lambda r: r.start))}
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    fig, (ax_ttft, ax_e2e, ax_tpot) = plt.subplots(1, 3, figsize=(16, 4.8))
    xs = [order[r.index] for r in ok]
    ax_ttft.scatter(xs, [1000 * r.ttft for r in ok], s=12)
    ax_ttft.set(xlabel="request (by start time)", ylabel="TTFT (ms)", title="Time to first token per request")
    ax_e2e.scatter(xs, [1000 * r.e2e for r in ok], s=12, label="ok")
    if failed:  # failures sit on the x axis so they are visible without a latency
        ax_e2e.scatter([order[r.index] for r in failed], [0] * len(failed), marker="x", color="red", label="failed")
        ax_e2e.legend()
    ax_e2e.set(xlabel="request (by start time)", ylabel="E2E latency (ms)", title="End-to-end latency per request")
    for ax in (ax_ttft, ax_e2e):
        ax.set_ylim(bottom=0)
    tpots = [1000 * _tpot_s(r) for r in ok if r.output_tokens > 1]
    ax_tpot.hist(tpots, bins=min(30, max(5, len(tpots))))
    ax_tpot.set(xlabel="TPOT (ms)", ylabel="requests", title="Time per output token")
    fig.suptitle(f"{title}\n{metrics['completed']} ok / {metrics['failed']} failed, "
                 f"{metrics['request_throughput']:.2f} req/s, {metrics['output_throughput']:.1f} output tok/s, "
                 f"median TTFT {metrics['median_ttft_ms']:.1f} ms, median TPOT {metrics['median_tpot_ms']:.2f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _query_server(base_url: str, headers: dict[str, str]) -> tuple[Optional[str], Optional[int]]:
    """(first model id or None, max_model_len or None); raises httpx errors for the caller to report."""
    import httpx

    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30.0)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        return None, None
    return models[0].get("id"), models[0].get("max_model_len")


def run_bench_serve(args) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model_id, max_model_len = _query_server(args.base_url, headers)
    except httpx.HTTPStatusError as e:
        if args.model is None:  # without a model name there is nothing to send
            print(f"error: GET /v1/models failed with HTTP {e.response.status_code}", file=sys.stderr)
            return 1
        model_id, max_model_len = None, None  # a server without /v1/models can still be benchmarked
    except (httpx.HTTPError, ValueError) as e:
        print(f"error: cannot reach server at {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    model = args.model or model_id
    if not model:
        print("error: the server lists no models; pass --model", file=sys.stderr)
        return 1

    if args.client_processes < 1 or (args.client_processes > 1 and args.dataset == "multi-turn") or \
            (args.max_concurrency and args.max_concurrency < args.client_processes):
        print("error: --client-processes must be >= 1, at most --max-concurrency, and 1 with the multi-turn dataset "
              "(a conversation's turns wait for each other)", file=sys.stderr)
        return 2
    conversations = None
    if args.dataset == "multi-turn":  # token ids through /v1/completions; the first turns make the warm-up
        args.prompt_ids, args.endpoint = True, "completions"
        system, users = conversations = make_conversations(args.num_prompts, args.turns, args.system_prompt_len,
                                                           args.input_len,
                                           args.seed, tuple(args.token_id_range))
        requests = [BenchRequest(system + u[0], args.system_prompt_len + args.input_len, args.output_len)
                    for u in users]
    else:
        requests = make_requests(args.dataset, args.endpoint, args.num_prompts, args.input_len, args.output_len,
                                 args.seed, max_model_len, args.random_range_ratio, tuple(args.token_id_range))
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    print(f"Benchmarking {model} at {args.base_url} ({args.endpoint}): {len(requests)} {args.dataset} prompts, "
          f"request rate {rate}, max concurrency {args.max_concurrency or 'unlimited'}", flush=True)
    results, duration, warmup_error, server, client_cpu = asyncio.run(run_requests(args, model, requests, headers,
                                                                                   conversations))
    if warmup_error:
        print(f"error: the warm-up request failed: {' '.join(warmup_error.split())}", file=sys.stderr)
        return 1
    metrics = compute_metrics(results, duration)
    metrics["client_busy"], saturated = client_report(client_cpu, duration)
    print(format_summary(metrics), flush=True)
    print(f"Client processes busy: {', '.join(f'{b:.0%}' for b in metrics['client_busy'])}", flush=True)
    if saturated:
        print(saturated, file=sys.stderr, flush=True)
    metrics["server_breakdown"] = server
    if server:
        print(format_breakdown(server), flush=True)
    if args.dataset == "multi-turn":
        metrics["ttft_by_turn"] = ttft_by_turn(results)
        print(format_turns(metrics["ttft_by_turn"]), flush=True)

    result_json = args.result_json or time.strftime("bench-serve-%Y%m%d-%H%M%S.json")
    plot = args.plot or (result_json[:-5] if result_json.endswith(".json") else result_json) + ".png"
    config = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()
              if k not in ("api_key", "func") and not callable(v)}  # never write the key to disk
    config.update(model=model, max_model_len=max_model_len)
    with open(result_json, "w") as f:
        json.dump({"config": config, "metrics": metrics, "requests": [asdict(r) for r in results]}, f, indent=1)
    try:
        save_plot(plot, results, metrics,
                  f"nanoslg bench serve: {model} ({args.endpoint}, {args.dataset}, rate {rate})")
        print(f"Wrote {result_json} and {plot}")
    except ImportError as e:  # matplotlib is optional: the numbers are in the JSON
        print(f"Wrote {result_json} (no plot: {e})")

    if not metrics["completed"]:
        first_error = " ".join(next((r.error for r in results if r.error), "no requests were sent").split())
        print(f"error: all {len(results)} requests failed; first error: {first_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoslg bench serve", description=__doc__.splitlines()[0])
    add_bench_serve_arguments(parser)
    return run_bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
