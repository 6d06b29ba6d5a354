"""`nanoslg bench throughput`: offline throughput of the engine fed token ids directly (no HTTP, no tokenizer),
reported against the compute-bound optimum: peak matmul FLOP/s / (2 x parameters), counting prompt + output tokens.

    nanoslg bench throughput --model llama-3.1-8b --load-format dummy --input-len 1024 --output-len 512
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

from nanoslg.engine_args import add_engine_arguments, engine_config_from_args, engine_fields
from nanoslg.entrypoints.bench_datasets import range_ratio_arg
from nanoslg.entrypoints.roofline import RankCosts, breakdown, difference, format_breakdown

BREAKDOWN_EVERY = 16  # steps between two whose operation classes are timed

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                            "configs")


def add_bench_throughput_arguments(parser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", default="random", choices=["random", "sharegpt-like"])
    g.add_argument("--input-len", type=int, default=1024)
    g.add_argument("--output-len", type=int, default=512)
    g.add_argument("--random-range-ratio", type=range_ratio_arg, default=0.0,
                   help="random: draw each prompt and output length uniformly within +-ratio of --input-len and "
                        "--output-len (vLLM's)")
    g.add_argument("--workloads", nargs="+", type=workload_arg, default=None, metavar="SPEC",
                   help="run several workloads one after another on one engine, each reported on its own: "
                        "random:IN:OUT:N[:RATIO] or sharegpt-like:N (instead of --dataset/--input-len/...)")
    g.add_argument("--breakdown", action="store_true",
                   help="report where the GPU's time went: by step kind and by operation class against its "
                        "roofline (operation classes are timed on every 16th step), and the serial ceiling")
    g.add_argument("--json-schema", action="store_true",
                   help="every request under a JSON schema that its output never completes (constrained decoding "
                        "at the same token counts; in --workloads, append +json to a workload)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--dataset-seed", type=int, default=0)
    g.add_argument("--warmup-prompts", type=int, default=16)
    g.add_argument("--no-peak", action="store_true", help="skip measuring the GPU's matmul peak")
    g.add_argument("--decode-latency", action="store_true",
                   help="batch-1 decode: time per output token of one prompt, against the weight-read floor")
    g.add_argument("--output-json", default=None)


def _median_s(fn, runs: int, warmup: int) -> float:
    """Median seconds of fn() on the device over `runs` runs, after `warmup` untimed ones."""
    import torch

    times = []
    for i in range(warmup + runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def _matmul_tflops(n: int, reps: int) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n ** 3 / _median_s(lambda: a @ b, reps, warmup=3) / 1e12


def _copy_tbps() -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_s(lambda: dst.copy_(src), 6, warmup=2) / 1e12


def measure_matmul_peak(n: int = 8192, reps: int = 10) -> dict[str, Any]:
    """Median bf16 TFLOP/s of n x n x n products and device copy bandwidth (read + write), on this GPU now."""
    import torch

    result = {"matmul_tflops": _matmul_tflops(n, reps), "copy_tbps": _copy_tbps(),
              "gpu": torch.cuda.get_device_name()}
    torch.cuda.empty_cache()
    return result


def _peak_or_none(args, cfg) -> dict[str, Any] | None:
    """This GPU's measured peaks, unless asked not to or there is no GPU."""
    if args.no_peak or cfg.device == "cpu":
        return None
    import torch

    return measure_matmul_peak() if torch.cuda.is_available() else None


def _write_json(args, result: dict[str, Any]) -> None:
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


def resolve_model_arg(model: str | None) -> str | None:
    """A shape kept in the repo (llama-3.1-8b, llama-3-70b) by name, else the argument as given."""
    if model and os.path.isdir(os.path.join(REPO_CONFIGS, model)):
        return os.path.join(REPO_CONFIGS, model)
    return model


def _decode_latency(llm, prompt: list[int], output_len: int, reps: int = 3) -> float:
    """Seconds per output token at batch 1: (time for output_len tokens - time for 1 token) / (output_len - 1),
    so the prefill and per-request overheads cancel out."""
    from nanoslg.sampling_params import SamplingParams

    def timed(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - start

    timed(output_len)  # warm-up
    one = min(timed(1) for _ in range(reps))
    full = min(timed(output_len) for _ in range(reps))
    return (full - one) / (output_len - 1)


@dataclass
class Workload:
    dataset: str
    input_len: int
    output_len: int
    num_prompts: int
    range_ratio: float = 0.0
    json_schema: bool = False  # every request under BENCH_SCHEMA

    @property
    def name(self) -> str:
        constrained = " json_schema" if self.json_schema else ""
        if self.dataset != "random":
            return f"{self.dataset} x {self.num_prompts}{constrained}"
        ratio = f" +-{self.range_ratio:g}" if self.range_ratio else ""
        return f"{self.input_len}/{self.output_len}{ratio} x {self.num_prompts}{constrained}"


# Structured-output load: a JSON object holding a list of strings, which no request completes within its output
# length (minItems), so a constrained run makes as many tokens as a free one and the two compare as they are.
BENCH_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"},
                                                           "minItems": 100000}}, "required": ["items"]}


def workload_arg(spec: str) -> Workload:
    """random:IN:OUT:N[:RATIO] or sharegpt-like:N, +json for every request under a JSON schema (argparse type of
    --workloads)."""
    base, constrained = (spec[:-5], True) if spec.endswith("+json") else (spec, False)
    parts = base.split(":")
    try:
        if parts[0] == "random" and len(parts) in (4, 5):
            return Workload("random", int(parts[1]), int(parts[2]), int(parts[3]),
                            range_ratio_arg(parts[4]) if len(parts) == 5 else 0.0, constrained)
        if parts[0] == "sharegpt-like" and len(parts) == 2:
            return Workload("sharegpt-like", 0, 0, int(parts[1]), json_schema=constrained)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected random:IN:OUT:N[:RATIO] or sharegpt-like:N, each optionally +json, "
                                     f"got {spec!r}")


def run_bench_throughput(args) -> int:
    from nanoslg.launcher import run_worker_node
    from nanoslg.llm import LLM

    if args.decode_latency and args.output_len < 2:
        print("nanoslg bench throughput: --decode-latency needs --output-len of at least 2", file=sys.stderr)
        return 2
    args.model = resolve_model_arg(args.model)
    cfg = engine_config_from_args(args)
    if cfg.node_rank > 0:
        return run_worker_node(cfg)
    fields = engine_fields(cfg)
    if args.breakdown:
        fields["op_timing_every"] = BREAKDOWN_EVERY
    workloads = args.workloads or [Workload(args.dataset, args.input_len, args.output_len, args.num_prompts,
                                            args.random_range_ratio, args.json_schema)]
    results = []
    with LLM(**fields) as llm:
        for i, w in enumerate(workloads):
            result = _run_workload(args, llm, w, warmup=args.warmup_prompts if i == 0 else 0)
            if result is None:
                return 1
            if args.decode_latency:
                return _report_decode_latency(args, llm.config, llm.config.model_spec, result)
            # a line as soon as it ends (the full summary, with the peak measured after the engine, comes last)
            print(f"{result['workload']}: {result['total_tokens_per_s']:.1f} tok/s in {result['elapsed_s']:.1f} s, "
                  f"{result['preemptions']} preemptions", flush=True)
            results.append(result)
    peak = _peak_or_none(args, cfg)
    for result in results:
        if peak is not None:
            # every GPU of the run contributes its peak (the protocol's "% of the optimum per GPU")
            optimum = cfg.world_size * peak["matmul_tflops"] * 1e12 / (2 * result["params"])
            result.update(peak, optimum_tokens_per_s=optimum,
                          percent_of_optimum=100 * result["total_tokens_per_s"] / optimum)
        print(format_summary(result))
        if args.breakdown:
            result["breakdown"] = _breakdown(result, llm.config, *result.pop("_stats"))
            print(format_breakdown(result["breakdown"]))
        result.pop("_stats", None)
    _write_json(args, results[0] if len(results) == 1 else {"runs": results})
    return 0


def _run_workload(args, llm, w: Workload, warmup: int):
    """One workload on the running engine: its result dict, the decode latency (float) with --decode-latency, or
    None when requests failed."""
    from nanoslg.entrypoints.bench_datasets import make_requests
    from nanoslg.entrypoints.debug import DebugClient
    from nanoslg.sampling_params import SamplingParams

    spec, limit = llm.config.model_spec, llm.config.max_model_len
    requests = make_requests(w.dataset, "completions", w.num_prompts, w.input_len, w.output_len,
                             args.dataset_seed, limit, w.range_ratio)
    # token ids folded into the vocabulary, prompts cut so prompt + output fit max_model_len
    ids = [cast("list[int]", r.prompt) for r in requests]  # completions prompts are token ids
    prompts = [[t % spec.vocab_size for t in p[:limit - 1 - min(r.output_len, limit - 2)]]
               for r, p in zip(requests, ids)]
    structured = {"json": BENCH_SCHEMA} if w.json_schema else None
    params = [SamplingParams(max_tokens=max(1, min(r.output_len, limit - len(p))), temperature=0, ignore_eos=True,
                             structured_outputs=structured) for r, p in zip(requests, prompts)]
    if args.decode_latency:
        return _decode_latency(llm, prompts[0], w.output_len)
    if warmup:
        llm.generate(prompts[:warmup], SamplingParams(max_tokens=8, ignore_eos=True))
    if structured:  # the grammar's first compile (the vocabulary's too) is a one-time cost, not the workload's
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True, structured_outputs=structured))
    with DebugClient(llm.config.run_dir) as debug:
        before = debug.state()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        after = debug.state()
    failed = [o for o in outs if o.error]
    if failed:
        print(f"nanoslg bench throughput: {len(failed)} requests failed, e.g. {failed[0].error}", file=sys.stderr)
        return None
    resolved = llm.config
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(o.token_ids) for o in outs)
    return {
        "model": resolved.model, "params": spec.num_params, "workload": w.name, "dataset": w.dataset,
        "num_prompts": len(prompts), "input_len": w.input_len, "output_len": w.output_len,
        "random_range_ratio": w.range_ratio, "elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
        "engine": dict(llm.engine.info.get("worker0", {})),
        "config": {k: getattr(resolved, k) for k in engine_fields(resolved) if k != "model"},
        "tuned_config": resolved.tuned_config_path or None,
        "preemptions": after["total_preemptions"] - before["total_preemptions"],
        "steps": after["num_steps"] - before["num_steps"],
        "_stats": (before, after, elapsed),
    }


def _breakdown(result: dict[str, Any], cfg, before: dict[str, Any], after: dict[str, Any], elapsed: float
               ) -> dict[str, Any]:
    engine = result["engine"]
    dtype_bytes = 1 if engine.get("kv_cache") == "fp8" else 4 if "float32" in engine.get("dtype", "") else 2
    costs = RankCosts.of(cfg.model_spec, cfg.tensor_parallel_size, cfg.pipeline_parallel_size, dtype_bytes)
    stats = difference(after["step_stats"], before["step_stats"])
    return breakdown(stats, costs, result.get("matmul_tflops"), result.get("copy_tbps"), elapsed,
                     result.get("optimum_tokens_per_s"))


def _report_decode_latency(args, cfg, spec, tpot: float) -> int:
    result = {"model": cfg.model, "params": spec.num_params, "input_len": args.input_len,
              "output_len": args.output_len, "tpot_ms": tpot * 1000}
    line = f"TPOT {tpot * 1000:.2f} ms"
    peak = _peak_or_none(args, cfg)
    if peak is not None:
        # bf16 weights (FP8 projections: one byte each) read once per token; tensor-parallel ranks read their shards
        # side by side, pipeline stages one after another
        weight_bytes = 2 * spec.num_params - (spec.linear_params if cfg.quantization else 0)
        floor = weight_bytes / (peak["copy_tbps"] * 1e12) / cfg.tensor_parallel_size
        result.update(peak, weight_read_floor_ms=floor * 1000, ratio_to_floor=tpot / floor)
        line += f" = {tpot / floor:.2f} x the weight-read floor ({floor * 1000:.2f} ms at " \
                f"{peak['copy_tbps']:.2f} TB/s, {peak['gpu']})"
    _write_json(args, result)
    print(line)
    return 0


def format_summary(r: dict[str, Any]) -> str:
    lines = ["=" * 20 + " nanoslg offline throughput " + "=" * 20,
             f"{'Model params:':<34}{r['params'] / 1e9:.2f} B",
             f"{'Workload:':<34}{r['workload']}",
             f"{'Weights / KV cache:':<34}{r['engine'].get('weights', '?')} / {r['engine'].get('kv_cache', '?')}"
             + (f" ({r['engine']['fp8_compute']})" if r["engine"].get("fp8_compute") else ""),
             f"{'Elapsed (s):':<34}{r['elapsed_s']:.2f}",
             f"{'Request throughput (req/s):':<34}{r['requests_per_s']:.2f}",
             f"{'Output token throughput (tok/s):':<34}{r['output_tokens_per_s']:.1f}",
             f"{'Total token throughput (tok/s):':<34}{r['total_tokens_per_s']:.1f}",
             f"{'Steps / preemptions:':<34}{r['steps']} / {r['preemptions']}",
             f"{'Tuned config:':<34}{r['tuned_config'] or 'none'}"]
    if "percent_of_optimum" in r:
        lines += [f"{'Matmul peak (TFLOP/s):':<34}{r['matmul_tflops']:.1f} ({r['gpu']})",
                  f"{'Compute-bound optimum (tok/s):':<34}{r['optimum_tokens_per_s']:.1f}",
                  f"{'% of optimum:':<34}{r['percent_of_optimum']:.1f} %"]
    return "\n".join(lines)
