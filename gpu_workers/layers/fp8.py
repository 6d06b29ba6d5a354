"""FP8 (e4m3) arithmetic: quantizing weights per output channel and activations per token, dequantizing the scale
layouts checkpoints ship, and the GEMM on Hopper's (SM89+) FP8 tensor cores. Values are clamped to +-448 before
every cast (a cast of a larger value is NaN on some devices) and scales never reach 0 (an all-zero row keeps a tiny
scale, so dividing by it stays finite)."""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from nanoslg.quantization import FP8_MAX

FP8 = torch.float8_e4m3fn
MIN_SCALE = 1e-12
# Up to this many rows, a Triton GEMV reads the FP8 weight and multiplies bf16 activations (weight-only FP8):
# _scaled_mm reads FP8 weights at half the bandwidth at M=1 (../shared/probes/fp8-h100.md). 0 turns it off.
GEMV_MAX_ROWS = int(os.environ.get("NANOSLG_FP8_GEMV_MAX_ROWS", "16"))
log = logging.getLogger("nanoslg.worker")

try:  # Triton comes with CUDA builds of torch; the CPU build runs the torch-op versions below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def fp8_kernels_supported(device: torch.device) -> bool:
    """Whether this device runs the FP8 Triton kernels here: Triton has e4m3 (fp8e4nv) from SM89 on."""
    return device.type == "cuda" and triton is not None and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm_supported(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(supported, why): FP8 GEMMs need an SM89+ GPU whose torch build runs a row-wise scaled GEMM (tried once),
    Triton, and a bf16 model."""
    if device.type != "cuda":
        return False, f"the device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"SM{major}{minor} has no FP8 tensor cores (SM89+)"
    if dtype != torch.bfloat16:
        return False, f"row-wise FP8 GEMMs write bf16 and the model runs {dtype}"
    if triton is None:
        return False, "Triton (the activation quantizer) does not import"
    why = _scaled_mm_fails(device.index if device.index is not None else torch.cuda.current_device())
    if why:
        return False, f"torch's row-wise _scaled_mm does not run here ({why})"
    return True, f"SM{major}{minor} FP8 tensor cores"


@functools.lru_cache(maxsize=None)
def _scaled_mm_fails(device_index: int) -> str:
    """'' where a 16x16 row-wise scaled GEMM runs on the device, else the error."""
    device = torch.device("cuda", device_index)
    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
        return ""
    except Exception as e:  # an unsupported kernel or layout surfaces as RuntimeError or NotImplementedError
        return f"{type(e).__name__}: {e}"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as e4m3, float32 scale per row [rows]) with x ~= q * scale[:, None]: each row's largest magnitude maps
    to 448."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def to_fp8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x / scale as e4m3, clamped (a per-tensor scale)."""
    xf = x.float() if scale == 1.0 else x.float() / scale
    return xf.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


def expand_block_rows(scale: torch.Tensor, first_row: int, rows: int, block_rows: int) -> torch.Tensor:
    """Rows [first_row, first_row + rows) of a weight, each given its block row of `scale` [row blocks, column
    blocks] (the grid starts at row 0 of `scale`, which covers row block first_row // block_rows)."""
    index = torch.arange(first_row, first_row + rows) // block_rows - first_row // block_rows
    return scale.float().index_select(0, index.to(scale.device))


def dequantize_blocks(q: torch.Tensor, row_scales: torch.Tensor, block_cols: int) -> torch.Tensor:
    """float32 weight of q [rows, cols] whose block scales are given per row [rows, ceil(cols / block_cols)] (a
    partial last block included)."""
    cols = q.shape[1]
    per_col = row_scales.float().repeat_interleave(block_cols, dim=1)[:, :cols]
    return q.float() * per_col


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantization: (e4m3 [M, K], float32 scales [M, 1]). One fused kernel on CUDA
    (as torch ops it costs more than the FP8 GEMM saves: ../shared/probes/fp8-h100.md)."""
    if fp8_kernels_supported(x.device):
        return _quantize_tokens_triton(x)
    q, scale = quantize_rows(x)
    return q, scale[:, None]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [.., K] (bf16) times an e4m3 weight [N, K] with float32 scales [1, N]: activations quantized per token
    (or with a static per-tensor input_scale), the GEMM on FP8 tensor cores, bf16 out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] <= GEMV_MAX_ROWS and triton is not None and input_scale is None:
        y = _fp8_gemv_triton(x2, weight, weight_scale)
        if bias is not None:
            y.add_(bias)
        return y.view(*shape[:-1], weight.shape[0])
    if input_scale is None:
        xq, xs = quantize_tokens(x2)
    else:
        xq = (x2.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        xs = input_scale.expand(x2.shape[0], 1).contiguous()
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale, out_dtype=x.dtype)
    if bias is not None:
        y.add_(bias)
    return y.view(*shape[:-1], weight.shape[0])


if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, cols, x_stride, q_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows x stride passes 2^31 in a large prefill
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * q_stride + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)


if triton is not None:
    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, rows, n, k, x_stride, w_stride, y_stride,
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
        acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < n, other=0.0)[None, :]
        tl.store(y_ptr + offs_m[:, None] * y_stride + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < rows) & (offs_n[None, :] < n))


if triton is not None:
    @triton.jit
    def _fp8_gemv1_kernel(x_ptr, w_ptr, s_ptr, y_ptr, n, k, w_stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row of x: products on the CUDA cores, reduced once at the end (no tensor-core tile to pad to 16)."""
        offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k, mask=offs_k < k, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * w_stride + offs_k[None, :],
                        mask=(offs_n[:, None] < n) & (offs_k[None, :] < k), other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=offs_n < n, other=0.0)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < n)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV (M > 1) and of its one-row kernel (M = 1; BLOCK_N 0 sends
# one row to the first): the best of benchmarks/fp8_kernel_sweep.py on an H100 (BENCHMARKS.md)
GEMV_TILES = tuple(int(v) for v in os.environ.get("NANOSLG_FP8_GEMV_TILES", "32,256,4,4").split(","))
GEMV1_TILES = tuple(int(v) for v in os.environ.get("NANOSLG_FP8_GEMV1_TILES", "8,1024,4,2").split(","))


def _fp8_gemv_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     tiles: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """x [M, K] (bf16) times the e4m3 weight [N, K] scaled per output channel, without quantizing x: for M <= 16
    one program reads BLOCK_N rows of the weight once, so the weight bytes set the time (weight-only FP8)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 1 and (tiles or GEMV1_TILES)[0] and (tiles is None or len(tiles) == 5):
        block_n, block_k, warps, stages = (tiles or GEMV1_TILES)[:4]
        _fp8_gemv1_kernel[(triton.cdiv(n, block_n),)](x, weight, weight_scale, y, n, k, weight.stride(0),
                                                       BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                                       num_stages=stages)
        return y
    block_n, block_k, warps, stages = (tiles or GEMV_TILES)[:4]
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, 16))
    _fp8_gemv_kernel[grid](x, weight, weight_scale, y, rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
                           BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """k / k_scale and v / v_scale (rows [T, kv heads, head dim]) as e4m3 into cache rows `slots` of the FP8 caches
    [slots, kv heads, head dim]: one Triton kernel on CUDA (the quantization fused into the KV write), torch ops
    elsewhere (written as bytes: index_copy_ has no float8 kernel on the CPU)."""
    if fp8_kernels_supported(k.device):
        # each row's heads side by side (a view of the QKV projection is), rows anywhere
        k, v = (t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous() for t in (k, v))
        rows, width = k.shape[0], k.shape[1] * k.shape[2]
        if rows:
            block = triton.next_power_of_2(width)
            _store_kv_kernel[(rows,)](k, v, k_cache, v_cache, slots, width, k.stride(0), v.stride(0), 1.0 / k_scale,
                                      1.0 / v_scale, BLOCK=block, num_warps=min(8, max(1, block // 256)))
        return
    k_cache.view(torch.uint8).index_copy_(0, slots, to_fp8(k, k_scale).view(torch.uint8))
    v_cache.view(torch.uint8).index_copy_(0, slots, to_fp8(v, v_scale).view(torch.uint8))


if triton is not None:
    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, width, k_stride, v_stride, k_inv, v_inv,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        k = tl.load(k_ptr + row * k_stride + offs, mask=mask, other=0.0).to(tl.float32) * k_inv
        v = tl.load(v_ptr + row * v_stride + offs, mask=mask, other=0.0).to(tl.float32) * v_inv
        k = tl.minimum(tl.maximum(k, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        tl.store(kc_ptr + slot * width + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * width + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _quantize_tokens_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        _quantize_rows_kernel[(rows,)](x, q, scale, cols, x.stride(0), q.stride(0), BLOCK=block,
                                       num_warps=min(16, max(1, block // 512)))
    return q, scale
