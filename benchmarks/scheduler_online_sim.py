"""The scheduler alone under Poisson arrivals, with a stand-in worker whose step takes a + b x tokens (no model, no
processes): per-request TPOT against the mean step, and how often a decoding request is left out of a plan.

    python benchmarks/scheduler_online_sim.py --rate 96 --num-prompts 1000

The H200's KV pool for the Llama-3.1-8B shape (53,493 pages of 16) and the GPU defaults (1,024 sequences, 8,192
tokens) stand in for the server of BENCHMARKS.md's online runs; two steps in flight, as with overlap scheduling."""
from __future__ import annotations

import argparse
import collections

import numpy as np

from nanoslg.entrypoints.bench_datasets import make_requests
from nanoslg.sampling_params import SamplingParams
from nanoslg.protocol import StepResult, TokenizedRequest, token_ids
from scheduler_proc.request import Status
from scheduler_proc.scheduler import Scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=96.0)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--step-base-ms", type=float, default=5.5, help="a: a step's fixed time (weights read)")
    ap.add_argument("--step-us-per-token", type=float, default=16.5, help="b: each token's share of a step")
    args = ap.parse_args()
    reqs = make_requests("sharegpt-like", "completions", args.num_prompts, 0, 0, 0, 8192)
    arrive = np.cumsum(np.random.default_rng(1).exponential(1 / args.rate, len(reqs)))
    s = Scheduler(num_pages=53493, page_size=16, max_num_seqs=1024, max_num_batched_tokens=8192, max_model_len=8192,
                  overlap=True, enable_prefix_caching=True)
    now, gpu_free, sent = 0.0, 0.0, 0
    in_flight: collections.deque = collections.deque()
    first, last, tokens = {}, {}, collections.Counter()
    steps, rows, left_out = [], [], []
    while sent < len(reqs) or s.requests or in_flight:
        while sent < len(reqs) and arrive[sent] <= now:
            r = reqs[sent]
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            s.add(TokenizedRequest(f"r{sent}", token_ids(r.prompt), params, []))
            sent += 1
        while len(in_flight) < 2:
            plan = s.schedule()
            if plan is None:
                break
            planned = {c.rid for c in plan.seqs}
            decoding = [r for r in s.running if r.status is Status.RUNNING and r.num_computed >= len(r.prompt_ids)]
            left_out.append(sum(r.rid not in planned for r in decoding) / max(1, len(decoding)))
            took = (args.step_base_ms + args.step_us_per_token / 1000 * sum(len(c.token_ids) + c.pending
                                                                              for c in plan.seqs)) / 1000
            gpu_free = max(gpu_free, now) + took
            in_flight.append((plan, gpu_free))
            steps.append(took)
            rows.append(sum(c.sample for c in plan.seqs))
        if not in_flight:
            now = arrive[sent] if sent < len(reqs) else now + 0.001
            continue
        plan, done = in_flight.popleft()
        now = max(now, done)
        sampled = [c.rid for c in plan.seqs if c.sample]
        for u in s.on_result(StepResult(plan.step_id, sampled, token_ids([7] * len(sampled)))):
            if len(u.token_ids):
                first.setdefault(u.rid, now)
                last[u.rid] = now
                tokens[u.rid] += len(u.token_ids)
    tpot = [(last[r] - first[r]) / (tokens[r] - 1) for r in tokens if tokens[r] > 1]
    weighted = sum(t * n for t, n in zip(steps, rows)) / max(1, sum(rows))
    print(f"rate {args.rate:g} req/s, {len(reqs)} prompts, {now:.1f} s: {len(steps)} steps, mean step "
          f"{1000 * np.mean(steps):.1f} ms, mean step per sampled row {1000 * weighted:.1f} ms; TPOT P50 "
          f"{1000 * np.median(tpot):.1f} P99 {1000 * np.percentile(tpot, 99):.1f} ms; decoding requests left out of "
          f"a plan {100 * np.mean(left_out):.1f} %")


if __name__ == "__main__":
    main()
