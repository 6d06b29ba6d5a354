"""Triton GEMVs for GEMMs of a few rows, where the weight's bytes set the time: x [M, K] (bf16) times a weight
[N, K] (e4m3 with a float32 scale per output row, or bf16), out in x's dtype, x never quantized. One row runs on the
CUDA cores (each program reduces BLOCK_N weight rows once, at the end); 2-16 rows on tensor-core tiles of 16 rows.
cuBLAS reads bf16 at ~88 % of the copy bandwidth at M = 1 and `_scaled_mm` FP8 at half of it (BENCHMARKS.md); the
tiles are the best of benchmarks/fp8_kernel_sweep.py on an H100."""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # Triton comes with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def _tiles(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(v) for v in os.environ.get(name, default).split(","))


# (BLOCK_N, BLOCK_K, num_warps, num_stages) for FP8 weights over 2-16 rows and one row, and bf16 weights on one row;
# a one-row BLOCK_N of 0 runs one row on the tensor-core tiles (every M then sums in one order: batch-invariant)
FP8_TILES = _tiles("NANOSLG_FP8_GEMV_TILES", "32,256,4,4")
FP8_ROW_TILES = _tiles("NANOSLG_FP8_GEMV1_TILES", "8,1024,4,2")
BF16_ROW_TILES = _tiles("NANOSLG_BF16_GEMV1_TILES", "8,512,4,2")
# A bf16 weight's one-row GEMMs on the Triton kernel instead of cuBLAS (batch-1 decode): off until measured faster
BF16_ROW = os.environ.get("NANOSLG_BF16_GEMV", "0") == "1"


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
         tiles: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """x [M, K] times weight [N, K] (times scale [1, N] float32 when given), M up to 16 for speed (any M works).
    tiles: (BLOCK_N, BLOCK_K, num_warps, num_stages), a fifth element 1 for the one-row kernel (benchmarks)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if tiles is None:
        row_tiles = FP8_ROW_TILES if scale is not None else BF16_ROW_TILES
        one_row = rows == 1 and row_tiles[0] > 0  # BLOCK_N 0: one row on the tensor-core tiles too
        tiles = row_tiles if one_row else FP8_TILES
    else:
        one_row = len(tiles) == 5 and tiles[4] == 1
    if one_row and rows != 1:
        raise ValueError(f"the one-row GEMV tiles {tiles} got {rows} rows")
    block_n, block_k, warps, stages = tiles[:4]
    scale_arg = scale if scale is not None else y  # never read without HAS_SCALE
    if one_row:
        _gemv_row_kernel[(triton.cdiv(n, block_n),)](x, weight, scale_arg, y, n, k, weight.stride(0),
                                                     HAS_SCALE=scale is not None, BLOCK_N=block_n,
                                                     BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        return y
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, 16))
    _gemv_kernel[grid](x, weight, scale_arg, y, rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
                       HAS_SCALE=scale is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                       num_stages=stages)
    return y


if triton is not None:
    @triton.jit
    def _gemv_row_kernel(x_ptr, w_ptr, s_ptr, y_ptr, n, k, w_stride, HAS_SCALE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k, mask=offs_k < k, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * w_stride + offs_k[None, :],
                        mask=(offs_n[:, None] < n) & (offs_k[None, :] < k), other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:
            y = y * tl.load(s_ptr + offs_n, mask=offs_n < n, other=0.0)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < n)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, rows, n, k, x_stride, w_stride, y_stride, HAS_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT: tl.constexpr = tl.bfloat16):
        offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :],
                        mask=(offs_m[:, None] < rows) & (offs_k[None, :] < k), other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * w_stride + offs_k[None, :],
                        mask=(offs_n[:, None] < n) & (offs_k[None, :] < k), other=0.0)
            acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)))  # DOT: float32 only in Triton's interpreter
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < n, other=0.0)[None, :]
        tl.store(y_ptr + offs_m[:, None] * y_stride + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < rows) & (offs_n[None, :] < n))
