"""The `nanoslg` command line. Engine flags follow vLLM's names and map one-to-one onto EngineConfig."""
from __future__ import annotations

import argparse
import sys

from nanoslg.engine_args import add_engine_arguments, engine_config_from_args, engine_fields
from nanoslg.model_registry import DEFAULT_MODEL, PULLABLE, PullError, pull
from nanoslg.model_spec import ConfigError


def _run_generate(args) -> int:
    from nanoslg.launcher import run_worker_node
    from nanoslg.llm import LLM
    from nanoslg.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed)
    cfg = engine_config_from_args(args)
    if cfg.node_rank > 0:
        return run_worker_node(cfg)
    with LLM(**engine_fields(cfg)) as llm:
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


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help=f"model to pull (default {DEFAULT_MODEL}; pullable: {', '.join(PULLABLE)})")
    parser.add_argument("--gguf", metavar="FILE", help="convert this local GGUF file instead (needs --name)")
    parser.add_argument("--name", dest="gguf_name", metavar="NAME", help="name to store the --gguf model under")
    parser.add_argument("--force", action="store_true", help="convert again even if already pulled")
    # run_pull only gets the namespace, but needs the parser to report a usage error the argparse way.
    parser.set_defaults(_pull_parser=parser)


def run_pull(args: argparse.Namespace) -> int:
    if args.gguf and not args.gguf_name:
        args._pull_parser.error("--gguf needs --name NAME to store the converted model under")
    if args.gguf_name and args.name and args.gguf_name != args.name:
        args._pull_parser.error(f"two different names given: {args.name!r} and --name {args.gguf_name!r}")
    try:
        path = pull(args.gguf_name or args.name, gguf=args.gguf, force=args.force)
    except PullError as e:
        print(f"nanoslg pull: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nanoslg.entrypoints.debug import add_debug_arguments

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

    from nanoslg.entrypoints.bench_quality import add_bench_quality_arguments
    from nanoslg.entrypoints.bench_serve import add_bench_serve_arguments
    from nanoslg.entrypoints.bench_throughput import add_bench_throughput_arguments
    from nanoslg.entrypoints.chat import add_chat_arguments
    from nanoslg.entrypoints.serve import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API"))
    add_chat_arguments(sub.add_parser("chat", help="chat in the terminal with a running server"))
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    add_bench_serve_arguments(bench.add_parser("serve", help="load-test a running server (like vLLM's)"))
    add_bench_throughput_arguments(bench.add_parser("throughput", help="offline engine throughput"))
    add_bench_quality_arguments(bench.add_parser("quality", help="perplexity and KL divergence of a quantized "
                                                 "model against the unquantized one"))
    from nanoslg.entrypoints.tune import add_tune_arguments

    add_tune_arguments(sub.add_parser("tune", help="measure this machine and write the engine's tuned config "
                                                    "(global batch, nano-batching, layout)"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):  # the commands that run an engine log as its processes do, from the start
        from nanoslg.logs import setup_logging

        setup_logging(args.log_level, getattr(args, "log_format", "text"))
    try:
        if args.command == "pull":
            return run_pull(args)
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "chat":
            from nanoslg.entrypoints.chat import run_chat

            return run_chat(args)
        if args.command == "bench":
            if args.bench_command == "serve":
                from nanoslg.entrypoints.bench_serve import run_bench_serve

                return run_bench_serve(args)
            if args.bench_command == "quality":
                from nanoslg.entrypoints.bench_quality import run_bench_quality

                return run_bench_quality(args)
            from nanoslg.entrypoints.bench_throughput import run_bench_throughput

            return run_bench_throughput(args)
        if args.command == "serve":
            from nanoslg.entrypoints.serve import run_serve

            return run_serve(args)
        if args.command == "tune":
            from nanoslg.entrypoints.tune import run_tune

            return run_tune(args)
        if args.command == "debug":
            from nanoslg.entrypoints.debug import run_debug

            return run_debug(args)
    except (ConfigError, PullError, ValueError) as e:
        print(f"nanoslg: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
