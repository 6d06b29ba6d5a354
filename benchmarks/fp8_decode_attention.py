"""Paged decode attention per layer with a bf16 and an FP8 KV cache, through the engine's FlashInfer backend (the
kernels and plans a decode step runs), against the GPU's copy bandwidth: does FP8 KV pay, and how near the bandwidth
does it read? Llama-3.1-8B heads by default (32 query, 8 KV, head_dim 128), pages of 16.

    python benchmarks/fp8_decode_attention.py [--batch 256] [--context 1280]

Prints one line per cache dtype and a ratio; the median of 30 timings of 10 back-to-back runs after 5 warm-ups
(CUDA events)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_workers.attention.base import BatchLayout  # noqa: E402
from gpu_workers.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from gpu_workers.attention.fp8_decode import num_splits, paged_decode_fp8  # noqa: E402
from gpu_workers.attention.xqa_decode import XqaDecodeWrapper  # noqa: E402


def copy_tbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), in TB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_s(lambda: dst.copy_(src)) / 1e12


def median_s(fn, runs: int = 30, warmup: int = 5, batch: int = 10) -> float:
    """Median seconds per call over `runs` timings of `batch` calls back to back (the launches queue behind the
    kernels, so a slow Python launch path is not timed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / batch)
    return sorted(times)[len(times) // 2]


def decode_layer_s(kv_fp8: bool, batch: int, context: int, heads: int, kv_heads: int, head_dim: int,
                   page: int, kernel: str = "flashinfer") -> tuple[float, int]:
    """(seconds per layer of decode attention, KV bytes it reads): FlashInfer's decode as the engine plans it, or
    gpu_workers/attention/fp8_decode.py's Triton kernel (kernel "triton") or XQA's (xqa_decode.py, "xqa"), each
    checked against FlashInfer's output first."""
    device = torch.device("cuda")
    pages_per_seq = -(-context // page)
    os.environ["NANOSLG_FP8_DECODE"] = "flashinfer"  # the row and the reference are FlashInfer's own FP8 decode
    backend = FlashInferBackend(1, batch * pages_per_seq, page, heads, kv_heads, head_dim, torch.bfloat16, device,
                                kv_fp8)
    backend.kv_cache.copy_(torch.randn(backend.kv_cache.shape, device=device).to(backend.kv_cache.dtype))
    tables = torch.randperm(batch * pages_per_seq).view(batch, pages_per_seq).int()
    layout = BatchLayout(torch.ones(batch, dtype=torch.int32), torch.full((batch,), context - 1, dtype=torch.int32),
                         tables, torch.full((batch,), context - 1, device=device),
                         (tables[:, -1].long() * page + (context - 1) % page).to(device))
    plan = backend.plan(layout)
    q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    cache = backend.layer_cache(0)
    def run() -> None:
        plan.decode.run(q, cache, out=out, **backend.scales)
    if kernel != "flashinfer":
        run()
        reference = out.clone()
        if kernel == "triton":
            tables, lens = tables.to(device), torch.full((batch,), context, dtype=torch.int32, device=device)
            splits = num_splits(batch, kv_heads, torch.cuda.get_device_properties(device).multi_processor_count)
            k_rows, v_rows = (c.view(-1, kv_heads, head_dim) for c in cache)
            note = f"{splits} splits"

            def run() -> None:
                paged_decode_fp8(q, k_rows, v_rows, tables, lens, page, backend.scale, backend.k_scale,
                                 backend.v_scale, out, splits)
        else:
            xqa = XqaDecodeWrapper(device, heads, kv_heads, head_dim, page, backend.scale)
            xqa.plan(layout)
            note = "FP8 queries"

            def run() -> None:
                xqa.run(q, cache, out, backend.k_scale, backend.v_scale)
        run()
        error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        print(f"FP8-ATTN {kernel} kernel ({note}) against FlashInfer's output: relative error {error:.2e}")
        if error > 0.05:
            raise SystemExit(f"the {kernel} FP8 decode disagrees with FlashInfer's")
    seconds = median_s(run)
    return seconds, batch * context * 2 * kv_heads * head_dim * backend.kv_cache.element_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1280)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    args = p.parse_args()
    bandwidth = copy_tbps(torch.device("cuda"))
    result = {"gpu": torch.cuda.get_device_name(), "copy_tbps": bandwidth, "batch": args.batch,
              "context": args.context}
    for name, fp8, kernel in (("bf16", False, "flashinfer"), ("fp8", True, "flashinfer"),
                              ("fp8-triton", True, "triton"), ("fp8-xqa", True, "xqa")):
        try:
            seconds, nbytes = decode_layer_s(fp8, args.batch, args.context, args.heads, args.kv_heads, args.head_dim,
                                             args.page_size, kernel)
        except Exception as e:  # XQA compiles on first use; a failed build must not hide the others' numbers
            print(f"FP8-ATTN {name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        result[name] = {"ms": seconds * 1000, "tbps": nbytes / seconds / 1e12,
                        "of_copy_bandwidth": nbytes / seconds / 1e12 / bandwidth}
        print(f"FP8-ATTN {name} KV: {seconds * 1000:.3f} ms per layer, {nbytes / seconds / 1e12:.2f} TB/s "
              f"({100 * nbytes / seconds / 1e12 / bandwidth:.0f} % of the {bandwidth:.2f} TB/s copy bandwidth)")
    speedups = {name: result["bf16"]["ms"] / result[name]["ms"] for name in ("fp8", "fp8-triton", "fp8-xqa")
                if name in result and "bf16" in result}
    result.update({f"{name.replace('-', '_')}_speedup": x for name, x in speedups.items()})
    print("FP8-ATTN speed-up over bf16: " + ", ".join(f"{name} {x:.2f}x" for name, x in speedups.items()) +
          f" ({result['gpu']}, batch {args.batch} x {args.context} tokens)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
