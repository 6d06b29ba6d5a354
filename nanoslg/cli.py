"""The `nanoslg` command line. Engine flags follow vLLM's names and map one-to-one onto EngineConfig."""
from __future__ import annotations

import argparse
import sys

from nanoslg.config import ConfigError, EngineConfig
from nanoslg.model_registry import PullError


def add_engine_arguments(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    d = EngineConfig()
    if with_model:
        parser.add_argument("model", nargs="?", default=None,
                            help="HF model folder or pulled model name (default: smollm2-135m-instruct)")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=d.page_size)
    g.add_argument("--num-kv-pages", type=int, default=None, help="fix the KV pool size instead of sizing it")
    g.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb, help="KV budget on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=d.pipeline_parallel_size)
    g.add_argument("--attention-backend", default=d.attention_backend, choices=["auto", "sdpa", "flashinfer"])
    g.add_argument("--enforce-eager", action="store_true", help="run decode steps without CUDA graphs")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="plan each step only after the previous one returned")
    g.add_argument("--cuda-graph-max-batch", type=int, default=d.cuda_graph_max_batch)
    g.add_argument("--log-level", default=d.log_level)


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(
        model=getattr(args, "model", None), tokenizer=args.tokenizer, dtype=args.dtype,
        load_format=args.load_format, seed=args.seed, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size, num_kv_pages=args.num_kv_pages, kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, overlap_schedule=not args.disable_overlap_schedule,
        cuda_graph_max_batch=args.cuda_graph_max_batch, log_level=args.log_level)


def _run_generate(args) -> int:
    from nanoslg.llm import LLM
    from nanoslg.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed)
    cfg = engine_config_from_args(args)
    with LLM(**{f: getattr(cfg, f) for f in cfg.__slots__ if f not in ("model_spec", "run_dir")}) as llm:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outs = llm.generate(list(args.prompt), params)
    for out in outs:
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            continue
        print(out.text)
    return 1 if any(o.error for o in outs) else 0


def build_parser() -> argparse.ArgumentParser:
    from nanoslg.debug_client import add_debug_arguments
    from nanoslg.model_registry import add_pull_arguments

    parser = argparse.ArgumentParser(prog="nanoslg", description="A small, fast LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    add_pull_arguments(sub.add_parser("pull", help="fetch and convert a model into the local cache"))

    gen = sub.add_parser("generate", help="generate completions offline for one or more prompts")
    add_engine_arguments(gen)
    gen.add_argument("--prompt", "-p", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)

    add_debug_arguments(sub.add_parser("debug", help="inspect a running engine's scheduler"))

    from nanoslg.bench_serve import add_bench_serve_arguments
    from nanoslg.bench_throughput import add_bench_throughput_arguments
    from nanoslg.chat_cli import add_chat_arguments
    from nanoslg.server.serve import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API"))
    add_chat_arguments(sub.add_parser("chat", help="chat in the terminal with a running server"))
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    add_bench_serve_arguments(bench.add_parser("serve", help="load-test a running server (like vLLM's)"))
    add_bench_throughput_arguments(bench.add_parser("throughput", help="offline engine throughput"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pull":
            from nanoslg.model_registry import run_pull

            return run_pull(args)
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "chat":
            from nanoslg.chat_cli import run_chat

            return run_chat(args)
        if args.command == "bench":
            if args.bench_command == "serve":
                from nanoslg.bench_serve import run_bench_serve

                return run_bench_serve(args)
            from nanoslg.bench_throughput import run_bench_throughput

            return run_bench_throughput(args)
        if args.command == "serve":
            from nanoslg.server.serve import run_serve

            return run_serve(args)
        if args.command == "debug":
            from nanoslg.debug_client import run_debug

            return run_debug(args)
    except (ConfigError, PullError, ValueError) as e:
        print(f"nanoslg: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
