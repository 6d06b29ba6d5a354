"""Scheduler CPU time per step with many running sequences: forming the plan, encoding it for the workers, and
applying the step's result. Pure CPU; no model.

    python benchmarks/scheduler_step.py --running 256
"""
from __future__ import annotations

import argparse
import json
import time

from nanoslg import protocol
from nanoslg.sampling_params import SamplingParams
from nanoslg.protocol import StepResult, TokenizedRequest, token_ids
from scheduler_proc.scheduler import Scheduler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.running
    s = Scheduler(num_pages=n * 257, page_size=16, max_num_seqs=n, max_num_batched_tokens=n * args.prompt_len,
                  max_model_len=4096, running_target=n)  # every request runs: the decode step at n
    for i in range(n):
        s.add(TokenizedRequest(f"req-{i}", token_ids(range(args.prompt_len)), SamplingParams(max_tokens=2000), [2]))

    def step():
        plan = s.schedule()
        frame = protocol.encode(plan)
        rids = [c.rid for c in plan.seqs if c.sample]
        s.on_result(StepResult(plan.step_id, rids, token_ids([7] * len(rids))))
        return plan, frame

    for _ in range(1000):  # the prefill steps: the global batch admits the requests in dense steps
        plan, _ = step()
        if len(plan.seqs) == n and all(len(c.token_ids) <= 1 for c in plan.seqs):
            break
    assert len(plan.seqs) == n, f"only {len(plan.seqs)} of {n} requests decode"
    t = time.process_time()
    for _ in range(args.steps):
        plan, frame = step()
    per_step_ms = (time.process_time() - t) / args.steps * 1000
    assert all(len(c.token_ids) == 1 for c in plan.seqs)
    result = {"running": n, "steps": args.steps, "cpu_ms_per_step": per_step_ms, "plan_bytes": len(frame)}
    print(f"{n} running decode sequences: {per_step_ms:.3f} ms scheduler CPU per step "
          f"(schedule + encode plan + apply result), plan {len(frame)} bytes")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
