"""Tile sweeps of the two FP8 Triton kernels whose speed decides an FP8 target, each checked for correctness first:

- the paged FP8 decode attention (gpu_workers/attention/fp8_decode.py) at batch 256 x 1280 tokens, Llama-8B heads,
  against FlashInfer's bf16 decode of the same cache (issue 26: >= 1.7x);
- the GEMVs of gpu_workers/layers/gemv.py on one Llama-8B layer's four GEMMs: FP8 weights at M = 1 (the one-row
  kernel, tiles ending in 1) and M = 8 (tensor-core tiles), bf16 weights at M = 1, against bf16 torch.mm (cuBLAS)
  and row-wise _scaled_mm (batch-1 decode reads the weights: a GEMV must read them near the bandwidth).

Every time is a CUDA graph of 10 launches (Triton's Python launch costs more than these kernels run), median of 15.

    python benchmarks/fp8_kernel_sweep.py [decode] [gemv]

Prints SWEEP lines, best first, and the best tiles as the environment variables that select them."""
from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_workers.attention.fp8_decode import paged_decode_fp8, split_buffers  # noqa: E402
from gpu_workers.layers import fp8, gemv  # noqa: E402

LAYER_GEMMS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def graph_s(fn: Callable[[], object], launches: int = 10, runs: int = 15) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `launches` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / launches)
    return sorted(times)[len(times) // 2]


def sweep_decode(batch: int = 256, context: int = 1280, heads: int = 32, kv_heads: int = 8, dim: int = 128,
                 page: int = 16) -> dict:
    from benchmarks.fp8_decode_attention import copy_tbps, decode_layer_s

    device = torch.device("cuda")
    bf16_s, _ = decode_layer_s(False, batch, context, heads, kv_heads, dim, page)
    pages = -(-context // page)
    slots = batch * pages * page
    k = (torch.randn(slots, kv_heads, dim, device=device) * 2).to(fp8.FP8)
    v = torch.randn(slots, kv_heads, dim, device=device).to(fp8.FP8)
    table = torch.randperm(batch * pages, device=device).view(batch, pages).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
    kv_bytes = 2 * batch * context * kv_heads * dim
    reference = torch.empty_like(q)
    paged_decode_fp8(q, k, v, table, lens, page, dim ** -0.5, 1.0, 1.0, reference, 1, tiles=(64, 4, 1, 0))
    results = []
    # the first sweep (H100): 128 keys, 4 warps, 2 stages won; 8 warps and a one-program-per-sequence variant lost
    # (tiles: keys, warps, stages, fp16; then splits)
    candidates = [(b, 4, st, fp16, sp) for b, st, fp16, sp in itertools.product((64, 128, 256), (2, 3), (0, 1), (1, 2))]
    candidates += [(256, 8, 2, fp16, 1) for fp16 in (0, 1)]
    for *tiles, splits in candidates:
        out = torch.empty_like(q)
        buffers = split_buffers(batch, heads, splits, dim, device)
        try:
            def run() -> None:
                paged_decode_fp8(q, k, v, table, lens, page, dim ** -0.5, 1.0, 1.0, out, splits, buffers=buffers,
                                 tiles=tiles)
            run()
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            seconds = graph_s(run)
        except Exception as e:  # a tile too large for shared memory or registers
            print(f"SWEEP decode {tiles} splits {splits}: {type(e).__name__} {str(e)[:80]}")
            continue
        results.append(dict(tiles=tiles, splits=splits, ms=seconds * 1e3, tbps=kv_bytes / seconds / 1e12,
                            speedup=bf16_s / seconds, rel_error=err))
    results.sort(key=lambda r: r["ms"])
    bandwidth = copy_tbps(device)
    for r in results[:8]:
        print(f"SWEEP decode tiles {r['tiles']} splits {r['splits']}: {r['ms']:.3f} ms {r['tbps']:.2f} TB/s "
              f"({r['tbps'] / bandwidth:.0%} of copy) = {r['speedup']:.2f}x FlashInfer bf16 ({bf16_s * 1e3:.3f} ms), "
              f"error {r['rel_error']:.1e}")
    best = results[0]
    print(f"SWEEP decode best: NANOSLG_FP8_DECODE_TILES={','.join(map(str, best['tiles']))} splits {best['splits']}")
    return dict(bf16_ms=bf16_s * 1e3, copy_tbps=bandwidth, results=results)


def sweep_gemv(rows: int, candidates: list, weights: str = "fp8") -> dict:
    """One layer's four GEMMs at `rows` rows on gemv.gemv with each candidate tile, FP8 or bf16 weights, against bf16
    torch.mm (cuBLAS) and, for FP8, row-wise _scaled_mm."""
    device = torch.device("cuda")
    layer = {}
    for name, (n, k) in LAYER_GEMMS.items():
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        wq, scale = fp8.quantize_rows(w)
        layer[name] = (w, wq, scale.reshape(1, -1).contiguous())
    x = {name: torch.randn(rows, k, device=device, dtype=torch.bfloat16) for name, (_, k) in LAYER_GEMMS.items()}
    weight_bytes = sum(n * k for n, k in LAYER_GEMMS.values()) * (1 if weights == "fp8" else 2)

    def layer_s(gemm: Callable[[str], object]) -> float:
        return graph_s(lambda: [gemm(name) for name in LAYER_GEMMS])

    def operands(name: str) -> tuple:
        w, wq, scale = layer[name]
        return (wq, scale) if weights == "fp8" else (w, None)

    bf16_s = layer_s(lambda name: torch.mm(x[name], layer[name][0].t()))
    scaled_s = layer_s(lambda name: torch._scaled_mm(
        x[name].to(fp8.FP8), layer[name][1].t(), scale_a=torch.ones(rows, 1, device=device),
        scale_b=layer[name][2], out_dtype=torch.bfloat16))
    results = []
    for tiles in candidates:
        try:
            y = gemv.gemv(x["o"], *operands("o"), tiles=tiles)
            w, scale = operands("o")
            full = fp8.dequantize_rows(w, scale, torch.float32) if scale is not None else w.float()
            ref = x["o"].float() @ full.t()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            seconds = layer_s(lambda name: gemv.gemv(x[name], *operands(name), tiles=tiles))
        except Exception as e:
            print(f"SWEEP gemv {weights} {tiles}: {type(e).__name__} {str(e)[:80]}")
            continue
        results.append(dict(tiles=tiles, us=seconds * 1e6, tbps=weight_bytes / seconds / 1e12, rel_error=err,
                            vs_bf16=bf16_s / seconds))
    results.sort(key=lambda r: r["us"])
    print(f"SWEEP gemv {weights} M={rows}: one layer's GEMMs bf16 torch.mm {bf16_s * 1e6:.0f} us "
          f"({2 * sum(n * k for n, k in LAYER_GEMMS.values()) / bf16_s / 1e12:.2f} TB/s of bf16), "
          f"_scaled_mm {scaled_s * 1e6:.0f} us")
    for r in results[:6]:
        print(f"SWEEP gemv {weights} M={rows} tiles {r['tiles']}: {r['us']:.0f} us, weights at {r['tbps']:.2f} "
              f"TB/s, {r['vs_bf16']:.2f}x torch.mm, error {r['rel_error']:.1e}")
    best = results[0]["tiles"]
    name = {("fp8", 5): "FP8_GEMV1", ("fp8", 4): "FP8_GEMV", ("bf16", 5): "BF16_GEMV1"}.get((weights, len(best)))
    print(f"SWEEP gemv {weights} M={rows} best: NANOSLG_{name}_TILES={','.join(map(str, best[:4]))}")
    return dict(rows=rows, weights=weights, bf16_us=bf16_s * 1e6, scaled_mm_us=scaled_s * 1e6, results=results)


def main() -> None:
    which = sys.argv[1:] or ["decode", "gemv"]
    report = {"gpu": torch.cuda.get_device_name()}
    if "decode" in which:
        report["decode"] = sweep_decode()
    if "gemv" in which:
        # the first sweep (H100): one row 8 x 1024 (4 warps, 2 stages) won, tensor-core tiles 32 x 256 (4, 4)
        one_row = [t + (1,) for t in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (2, 3))]
        dot = list(itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4, 5)))
        report["gemv"] = [sweep_gemv(1, one_row), sweep_gemv(8, dot), sweep_gemv(1, one_row, "bf16")]
    out = os.environ.get("SWEEP_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
