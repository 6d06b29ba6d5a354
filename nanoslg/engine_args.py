"""The engine's command-line flags, one per EngineConfig field, with vLLM's (or SGLang's, for multi-node) names.
Every entry point that starts an engine (serve, generate, bench throughput) adds these."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from nanoslg.config import DTYPES, EngineConfig
from nanoslg.quantization import KV_CACHE_DTYPES, QUANTIZATIONS
from nanoslg.tuned_config import NANO_OVERLAPS


def add_engine_arguments(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    d = EngineConfig()
    if with_model:
        parser.add_argument("model", nargs="?", default=None,
                            help="HF model folder or pulled model name (default: smollm2-135m-instruct)")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    g.add_argument("--quantization", "-q", default=None, choices=QUANTIZATIONS,
                   help="fp8: quantize a bf16 checkpoint's linear layers to FP8 at load (FP8 GEMMs on SM89+, "
                        "weights dequantized elsewhere); FP8 checkpoints are detected without it")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="fp8: an e4m3 KV cache, half the bytes per token of bf16 (default auto: the model's dtype)")
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in a step, per micro-batch with pipeline parallelism (default: the tuned "
                        "config's, else 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in a step (default: the tuned config's, else 2048)")
    g.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=d.page_size)
    g.add_argument("--num-kv-pages", type=int, default=None, help="fix the KV pool size instead of sizing it")
    g.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb, help="KV budget on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--attention-backend", default=d.attention_backend, choices=["auto", "sdpa", "flashinfer"])
    g.add_argument("--enforce-eager", action="store_true", help="run decode steps without CUDA graphs")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="plan each step only after the previous one returned")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                   help="reuse the KV pages of prompt prefixes seen before (--no-enable-prefix-caching: off)")
    g.add_argument("--cuda-graph-max-batch", type=int, default=d.cuda_graph_max_batch,
                   help="largest decode batch replayed from a whole-step CUDA graph")
    g.add_argument("--cuda-graph-max-tokens", type=int, default=d.cuda_graph_max_tokens,
                   help="largest other step (prefill, mixed, bigger decode) replayed from CUDA graphs of everything "
                        "but the attention (0: eager); with one nano-batch, FlashInfer's backend, and without "
                        "sequence parallelism in the steps it takes")
    n = parser.add_argument_group("global batch and nano-batching (NanoFlow; `nanoslg tune` finds these)")
    n.add_argument("--running-target", type=int, default=None,
                   help="requests kept running, the global batch's target (default: the tuned config's, else "
                        "--max-num-seqs)")
    n.add_argument("--dense-batch-tokens", type=int, default=None,
                   help="tokens each step carries: every running decode plus prefill chunks filling the rest "
                        "(default: the tuned config's, else running target x (1 + mean prompt / mean output))")
    n.add_argument("--nano-batches", default="auto", type=_auto_or_int,
                   help="split each step's batch in N nano-batches whose operations overlap (auto: the tuned "
                        "config's, else 1)")
    n.add_argument("--nano-overlap", default=None, choices=NANO_OVERLAPS,
                   help="which operations of one nano-batch run beside the others' GEMMs, on their own CUDA stream "
                        "(default: the tuned config's, else network with TP, memory without)")
    n.add_argument("--sequence-parallel", default=None, action=argparse.BooleanOptionalAction,
                   help="with TP: norms and residual adds on 1/TP of the tokens, each all-reduce a reduce-scatter "
                        "and an all-gather (default: the tuned config's, else off)")
    n.add_argument("--tuned-config", default=None, metavar="PATH",
                   help="use this tuned config instead of the one `nanoslg tune` wrote for this model, GPU and "
                        "layout")
    n.add_argument("--no-tuned-config", dest="use_tuned_config", action="store_false",
                   help="ignore tuned configs: built-in defaults for whatever is not set")
    g.add_argument("--log-level", default=d.log_level)
    g.add_argument("--log-format", default=d.log_format, choices=["text", "json"],
                   help="json: one JSON object per log line, in every process")
    p = parser.add_argument_group("parallelism")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=d.pipeline_parallel_size)
    p.add_argument("--nnodes", type=int, default=d.nnodes, help="nodes the tp x pp workers are spread over")
    p.add_argument("--node-rank", type=int, default=d.node_rank,
                   help="this node's index; node 0 runs the server, tokenizer and scheduler, the others workers")
    p.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                   help="node 0's address: torch.distributed uses PORT, nanoslg's control links the next "
                        "ports (tcp, CURVE-encrypted)")
    p.add_argument("--node-join-timeout", dest="node_join_timeout_s", type=float, default=d.node_join_timeout_s,
                   help="seconds node 0 waits for every other node to connect")
    p.add_argument("--cluster-secret-file", default=None,
                   help="file holding the secret every node shares (default: $NANOSLG_CLUSTER_SECRET)")


def _auto_or_int(value: str):
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {value!r}")
    return n


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(
        model=getattr(args, "model", None), tokenizer=args.tokenizer, dtype=args.dtype,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        load_format=args.load_format, seed=args.seed, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size, num_kv_pages=args.num_kv_pages, kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, nnodes=args.nnodes, node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr, node_join_timeout_s=args.node_join_timeout_s,
        cluster_secret_file=args.cluster_secret_file, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, overlap_schedule=not args.disable_overlap_schedule,
        enable_prefix_caching=args.enable_prefix_caching, cuda_graph_max_batch=args.cuda_graph_max_batch,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
        log_level=args.log_level, log_format=args.log_format, running_target=args.running_target,
        dense_batch_tokens=args.dense_batch_tokens, nano_batches=args.nano_batches, nano_overlap=args.nano_overlap,
        sequence_parallel=args.sequence_parallel,
        tuned_config=args.tuned_config, use_tuned_config=args.use_tuned_config)


def engine_fields(cfg: EngineConfig) -> dict[str, Any]:
    """The user-set fields of cfg, as keyword arguments for LLM(...)."""
    resolved = ("model_spec", "run_dir", "device_name", "tuned_config_path")
    # fields(), not __slots__: a subclass's __slots__ (ResolvedConfig's) need not list the fields its base holds
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in resolved}
