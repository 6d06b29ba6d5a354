"""CPU benchmark (issue P7): SmolLM2-135M, N prompts x M generated tokens, nanoslg LLM.generate against Hugging
Face generate() in the same script. Prints tokens/s of each and the ratio; writes JSON with --out.

    python benchmarks/cpu_vs_hf.py --num-prompts 32 --output-len 128
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum about rivers mountains "
         "and old books in the library of a small village near the sea").split()


def make_prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 40))) for _ in range(n)]


def bench_nanoslg(model: str, prompts: list, output_len: int, dtype: str) -> dict:
    from nanoslg import LLM, SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    with LLM(model, dtype=dtype, max_model_len=1024) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def bench_hf(model: str, prompts: list, output_len: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hf.generate(**tok(prompts[:2], return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        out = hf.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - t
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * len(prompts)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the pulled smollm2-135m-instruct")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from nanoslg.model_registry import resolve_model_path

    model = resolve_model_path(args.model)
    prompts = make_prompts(args.num_prompts, args.seed)
    ours = bench_nanoslg(model, prompts, args.output_len, args.dtype)
    hf = bench_hf(model, prompts, args.output_len, args.dtype)
    result = {"model": model, "dtype": args.dtype, "num_prompts": args.num_prompts, "output_len": args.output_len,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "nanoslg": ours, "hf_generate": hf, "speedup": ours["output_tokens_per_s"] / hf["output_tokens_per_s"]}
    print(f"nanoslg LLM.generate : {ours['output_tokens_per_s']:8.1f} output tok/s ({ours['elapsed_s']:.1f} s)")
    print(f"HF generate()        : {hf['output_tokens_per_s']:8.1f} output tok/s ({hf['elapsed_s']:.1f} s)")
    print(f"speedup              : {result['speedup']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
