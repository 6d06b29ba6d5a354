"""The per-step cost of constrained decoding at a batch of constrained sequences: filling the token bitmask on the
host (xgrammar's batch matcher, the worker's threads), advancing every matcher by one token, and on a GPU copying
the bitmask over and applying it to the logits. This is the work gpu_workers/grammar.py adds to a step; the worker
does the host part while the device runs the step's forward pass.

    python3 benchmarks/grammar_bitmask.py [--batch 256] [--vocab 128256] [--steps 64] [--threads 4]

Each matcher advances by a random allowed token (what dummy weights do), from a fixed seed; the schemas are the
offline benchmark's (a list of strings, bench_throughput.BENCH_SCHEMA) and an object of typed fields.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import xgrammar  # noqa: E402

from gpu_workers.grammar import synthetic_vocab  # noqa: E402
from nanoslg.entrypoints.bench_throughput import BENCH_SCHEMA  # noqa: E402

RECORD = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "active"]}


def measure(schema: dict, args, info, device) -> dict:
    compiler = xgrammar.GrammarCompiler(info, max_threads=args.threads)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    compile_s = time.perf_counter() - start
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(args.batch)]
    batch = xgrammar.BatchGrammarMatcher(max_threads=args.threads)
    bitmask = torch.empty((args.batch, -(-args.vocab // 32)), dtype=torch.int32, pin_memory=device.type == "cuda")
    logits = torch.randn(args.batch, args.vocab, device=device)
    shifts = torch.arange(32, dtype=torch.int32)
    rng = random.Random(0)
    fill, accept, apply = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, bitmask)
        t1 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            mask = bitmask.to(device, non_blocking=True)
            xgrammar.apply_token_bitmask_inplace(logits, mask, vocab_size=args.vocab)
            torch.cuda.synchronize()
            apply.append(time.perf_counter() - t2)
        else:
            t2 = time.perf_counter()
            xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=args.vocab)
            apply.append(time.perf_counter() - t2)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :args.vocab]
        tokens = []
        for row in allowed:  # a random allowed token per row, as random weights would pick
            ids = row.nonzero().flatten()
            tokens.append(int(ids[rng.randrange(len(ids))]))
        t3 = time.perf_counter()
        for m, tok in zip(matchers, tokens):
            m.accept_token(tok)
            if m.is_terminated():
                m.reset()
        accept.append(time.perf_counter() - t3)
        fill.append(t1 - t0)

    def ms(xs: list) -> dict:
        return {"median_ms": 1e3 * statistics.median(xs), "p90_ms": 1e3 * sorted(xs)[int(0.9 * len(xs))]}

    return {"compile_s": compile_s, "fill": ms(fill), "accept": ms(accept), "apply": ms(apply)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256, help="Llama 3's vocabulary (synthetic tokens)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = xgrammar.TokenizerInfo(synthetic_vocab(args.vocab), vocab_size=args.vocab, stop_token_ids=[args.vocab - 1])
    out = {"batch": args.batch, "vocab": args.vocab, "threads": args.threads, "device": str(device),
           "cpu_count": os.cpu_count(), "schemas": {}}
    for name, schema in (("bench-list-of-strings", BENCH_SCHEMA), ("record", RECORD)):
        r = measure(schema, args, info, device)
        out["schemas"][name] = r
        print(f"{name:<22} compile {r['compile_s']:.2f} s | per step at {args.batch} sequences: fill "
              f"{r['fill']['median_ms']:.2f} ms (p90 {r['fill']['p90_ms']:.2f}), accept "
              f"{r['accept']['median_ms']:.2f} ms, apply on {device.type} {r['apply']['median_ms']:.2f} ms")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
